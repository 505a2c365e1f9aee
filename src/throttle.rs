//! The one log throttle: hostile or broken input must cost counters, not log
//! volume. Depends on no other module; time is a parameter.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets one log line per key through per interval and counts the ones it held
/// back. Shared by reference across tasks (the state sits behind a lock).
#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    slots: Mutex<HashMap<&'static str, (Option<Instant>, u64)>>,
}

impl LogThrottle {
    /// A throttle letting one line per key through every `interval`.
    pub fn new(interval: Duration) -> Self {
        LogThrottle {
            interval,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed_since_last_line)` if a line for `key` may be logged at `now`.
    pub fn check(&self, now: Instant, key: &'static str) -> Option<u64> {
        // A poisoned lock only means another task panicked mid-update of plain data.
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let (last, suppressed) = slots.entry(key).or_insert((None, 0));
        match last {
            Some(t) if now.saturating_duration_since(*t) < self.interval => {
                *suppressed += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_per_key_and_the_rest_counted() {
        let rl = LogThrottle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(rl.check(t0, "bad_tag"), Some(0));
        for i in 1..=5 {
            assert_eq!(rl.check(t0 + Duration::from_secs(i), "bad_tag"), None);
        }
        // Keys are independent.
        assert_eq!(rl.check(t0 + Duration::from_secs(1), "stale"), Some(0));
        assert_eq!(rl.check(t0 + Duration::from_secs(10), "bad_tag"), Some(5));
        assert_eq!(rl.check(t0 + Duration::from_secs(11), "bad_tag"), None);
    }
}
