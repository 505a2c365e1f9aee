//! The gossip seal's opener (src/gossip/seal.rs) on sequences of (now, datagram).
//!
//! Each input picks a replay configuration (small caches, so eviction, the floor and the
//! future bands are reached within a few dozen datagrams) and then a script of steps: move the
//! clock forward, deliver garbage, deliver a datagram sealed by the real keyring at an
//! arbitrary stamp inside or outside the window, replay or mutate one captured earlier, or
//! deliver an honest datagram stamped a little behind our clock.
//!
//! Checked:
//! - no panic; the cache never holds more than its bound;
//! - nothing opens unless the keyring sealed exactly those bytes, and the payload is the one
//!   sealed;
//! - a datagram accepted once is never accepted again (the clock only moves forward here: the
//!   opener's promise is per receiver with a monotonic clock, see docs/gossip.md);
//! - finding 5 (gossip deafness): an honest datagram stamped `t` with `now - t <= max_age` and a
//!   fresh nonce opens, unless more datagrams stamped within `[t, now]` were accepted than the
//!   part of the cache for stamps at or before our clock holds. That is exactly what
//!   docs/gossip.md promises ("to refuse an honest datagram that spent δ in flight, a flood must
//!   deliver more than that many datagrams within δ"); hostile datagrams stamped ahead of our
//!   clock, however many, never count towards it.
#![no_main]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use meshsec::gossip::seal::{Keyring, OpenError, Opener, ReplayConfig, OVERHEAD};

const NOW: u64 = 1_790_000_000_000;

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        let mut v = [0u8; 8];
        for b in &mut v {
            *b = self.u8();
        }
        u64::from_le_bytes(v)
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn duration(b: &mut Bytes) -> Duration {
    match b.u8() % 4 {
        0 => Duration::from_secs(60),
        1 => Duration::ZERO,
        _ => Duration::from_millis(u64::from(b.u16())),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let ring = Arc::new(Keyring::new([[7u8; 32], [8u8; 32]]).unwrap());
    let other = Keyring::new([[8u8; 32]]).unwrap(); // the second key of our ring seals here
    let foreign = Keyring::new([[9u8; 32]]).unwrap();
    let config = ReplayConfig {
        max_age: duration(&mut b),
        max_future_skew: duration(&mut b),
        max_remembered: usize::from(b.u8() % 65),
    };
    let max_age = config.max_age.as_millis() as u64;
    let max_future = config.max_future_skew.as_millis() as u64;
    // The part of the cache for stamps at or before our clock (see `Opener`).
    let past_bound = (config.max_remembered - config.max_remembered / 4).max(1);
    let mut o = Opener::new(ring.clone(), config);
    let mut now = match b.u8() % 4 {
        0 => 0,
        1 => b.u64() % (1 << 48),
        _ => NOW,
    };

    // Every datagram a key of ours sealed, with its stamp and payload.
    let mut sealed: Vec<(Vec<u8>, u64, Vec<u8>)> = Vec::new();
    let mut accepted: HashSet<Vec<u8>> = HashSet::new();
    // Stamps of every accepted datagram.
    let mut accepted_at: Vec<u64> = Vec::new();

    let mut steps = 0;
    while !b.is_empty() && steps < 400 {
        steps += 1;
        let datagram = match b.u8() % 9 {
            0 => {
                now = now.saturating_add(u64::from(b.u16()));
                continue;
            }
            1 => {
                now = now.saturating_add(u64::from(b.u8()) * 1_000);
                continue;
            }
            2 => {
                let n = b.u8() as usize;
                b.take(n).to_vec()
            }
            3 | 4 => {
                // Sealed by the real keyring (or its second key), stamped anywhere around now.
                let how = b.u8();
                let offset = i64::from(b.u16() as i16) * if how & 1 == 1 { 1 } else { 8 };
                let stamp = if how & 2 == 2 {
                    b.u64()
                } else {
                    now.saturating_add_signed(offset)
                };
                let payload = b.take(usize::from(how >> 4)).to_vec();
                let d = if how & 4 == 4 {
                    other.seal(stamp, &payload)
                } else {
                    ring.seal(stamp, &payload)
                };
                sealed.push((d.clone(), stamp, payload));
                d
            }
            5 => {
                // A replay of one captured earlier.
                if sealed.is_empty() {
                    continue;
                }
                let i = b.u8() as usize % sealed.len();
                sealed[i].0.clone()
            }
            6 => {
                // A captured datagram with one byte changed, or cut short.
                if sealed.is_empty() {
                    continue;
                }
                let i = b.u8() as usize % sealed.len();
                let mut d = sealed[i].0.clone();
                let pos = b.u16() as usize % d.len();
                match b.u8() {
                    0 => d.truncate(pos),
                    x => d[pos] ^= x,
                }
                d
            }
            7 => foreign.seal(now, b"foreign"),
            _ => {
                // Honest: stamped `lag` behind our clock, fresh nonce.
                let lag = u64::from(b.u16()) % (max_age + 1);
                let Some(stamp) = now.checked_sub(lag) else {
                    continue;
                };
                let d = ring.seal(stamp, b"honest");
                sealed.push((d.clone(), stamp, b"honest".to_vec()));
                let result = o.open(now, &d);
                if result.is_err() {
                    let flood = accepted_at
                        .iter()
                        .filter(|&&t| t >= stamp && t <= now)
                        .count();
                    assert!(
                        result == Err(OpenError::Replayed) && flood > past_bound,
                        "honest datagram stamped {lag} ms behind refused ({result:?}) after only \
                         {flood} accepted datagrams stamped since (bound {past_bound}), {config:?}"
                    );
                } else {
                    accepted.insert(d);
                    accepted_at.push(stamp);
                }
                assert!(o.remembered() <= config.max_remembered.max(1));
                continue;
            }
        };
        let result = o.open(now, &datagram);
        match result {
            Ok(payload) => {
                let Some((_, stamp, want)) = sealed.iter().find(|(d, _, _)| *d == datagram) else {
                    panic!("opened a datagram nobody sealed: {datagram:02x?}");
                };
                assert_eq!(&payload, want);
                assert!(*stamp <= now.saturating_add(max_future));
                assert!(*stamp >= now.saturating_sub(max_age));
                assert!(
                    accepted.insert(datagram),
                    "a datagram opened twice (stamp {stamp}, now {now}, {config:?})"
                );
                accepted_at.push(*stamp);
            }
            Err(OpenError::TooShort) => assert!(datagram.len() < OVERHEAD),
            Err(_) => {}
        }
        assert!(o.remembered() <= config.max_remembered.max(1));
    }
});
