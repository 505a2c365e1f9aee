//! Token buckets driven by a caller-supplied clock.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, at most `burst` stored.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(now: Instant, rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            tokens: burst,
            last: now,
            rate: f64::from(rate),
            burst,
        }
    }

    fn refill(&mut self, now: Instant) {
        // A clock that steps backwards (callers pass `now`) must not mint tokens.
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        if now > self.last {
            self.last = now;
        }
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    /// Takes one token if available.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Refills at the old rate up to `now`, then refills at `rate` from then on.
    fn set_rate(&mut self, now: Instant, rate: f64) {
        self.refill(now);
        self.rate = rate;
    }

    /// Lowers (or restores, up to `max`) the burst; tokens above it are dropped.
    fn set_burst(&mut self, now: Instant, burst: f64) {
        self.refill(now);
        self.burst = burst.max(1.0);
        self.tokens = self.tokens.min(self.burst);
    }

    /// A bucket holding `tokens` (at least one, at most `burst`), filling
    /// up to `burst` at `rate`.
    fn starting_with(now: Instant, rate: u32, burst: u32, tokens: f64) -> Self {
        let b = TokenBucket::new(now, rate, burst);
        TokenBucket {
            tokens: tokens.clamp(1.0, b.burst),
            ..b
        }
    }

    /// Whether the bucket has refilled completely (its state is then indistinguishable from new).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// One bucket per key (source prefix, static key), bounded in memory; optionally with a
/// global budget that all keys share fairly.
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    buckets: HashMap<K, TokenBucket>,
    rate: u32,
    burst: u32,
    max_keys: usize,
    last_prune: Instant,
    shared: Option<TokenBucket>,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// Empty limiter.
    pub fn new(now: Instant, rate: u32, burst: u32, max_keys: usize) -> Self {
        KeyedLimiter {
            buckets: HashMap::new(),
            rate,
            burst,
            max_keys: max_keys.max(1),
            last_prune: now,
            shared: None,
        }
    }

    /// Like [`KeyedLimiter::new`], and every take also needs a token from `shared`, a global
    /// budget. Shared fairly: with `n` keys tracked, each key's bucket refills at
    /// `min(rate, shared rate / n)`, so the keys' refill rates sum to at most the global one
    /// and `n - 1` busy keys cannot take all of it from the `n`-th (proto/handshake.md §8).
    pub fn with_shared_budget(
        now: Instant,
        rate: u32,
        burst: u32,
        max_keys: usize,
        shared: TokenBucket,
    ) -> Self {
        KeyedLimiter {
            shared: Some(shared),
            ..KeyedLimiter::new(now, rate, burst, max_keys)
        }
    }

    /// Takes a token from `key`'s bucket. When the table is full of busy keys, new keys are
    /// refused: callers only reach this limiter with a source address proven by a cookie, so
    /// the table cannot be filled with spoofed addresses.
    ///
    /// With a shared budget the key's token is spent even when the global budget then refuses:
    /// a key that keeps asking while the budget is dry cannot hoard tokens for later.
    pub fn take(&mut self, now: Instant, key: &K) -> bool {
        if !self.buckets.contains_key(key) {
            if self.buckets.len() >= self.max_keys
                || now.saturating_duration_since(self.last_prune) > Duration::from_secs(1)
            {
                self.last_prune = now;
                self.buckets.retain(|_, b| !b.is_full(now));
            }
            if self.buckets.len() >= self.max_keys {
                return false;
            }
            // Under a shared budget a new key starts with what a full
            // bucket holds at its fair share (see below): a full burst per
            // new key would let many keys hold a reservoir the size of the
            // table, and fewer would make a key that idled (and was pruned)
            // come back poorer than one that stayed (proto/handshake.md §8).
            let b = if let Some(shared) = &self.shared {
                let n = (self.buckets.len() + 1) as f64;
                TokenBucket::starting_with(now, self.rate, self.burst, shared.burst / n)
            } else {
                TokenBucket::new(now, self.rate, self.burst)
            };
            self.buckets.insert(key.clone(), b);
        }
        let n = self.buckets.len();
        let Some(b) = self.buckets.get_mut(key) else {
            return false;
        };
        match &mut self.shared {
            None => b.take(now),
            Some(shared) => {
                // Rate and burst both split fairly: the keys' refill rates sum
                // to at most the shared rate, and what they can hold back to
                // at most max(n, shared burst) (one token each at least).
                // usize -> f64 is exact for any table size that fits in memory.
                b.set_rate(now, f64::from(self.rate).min(shared.rate / n as f64));
                b.set_burst(now, f64::from(self.burst).min(shared.burst / n as f64));
                b.take(now) && shared.take(now)
            }
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_at_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0, 10, 2);
        assert!(b.take(t0));
        assert!(b.take(t0));
        assert!(!b.take(t0));
        assert!(!b.take(t0 + Duration::from_millis(50)));
        assert!(b.take(t0 + Duration::from_millis(101)));
        // Going back in time mints nothing.
        assert!(!b.take(t0));
    }

    #[test]
    fn keyed_limiter_is_bounded() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(t0, 1, 1, 2);
        assert!(l.take(t0, &1));
        assert!(!l.take(t0, &1));
        assert!(l.take(t0, &2));
        assert!(!l.take(t0, &3), "table full of busy keys");
        assert!(l.take(t0 + Duration::from_secs(2), &3), "idle keys pruned");
        assert!(l.len() <= 2);
    }
}
