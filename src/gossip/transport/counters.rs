//! The sealed transport's counters: live atomics updated by the pumps, and the plain snapshot
//! `meshsec status` reports.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::gossip::pieces::{PieceError, ReassemblyCounts};
use crate::gossip::seal::OpenError;

/// Live counters of the sealed transport, shared with whoever reports status.
#[derive(Debug, Default)]
pub struct GossipCounters {
    pub(super) sealed_out_datagrams: AtomicU64,
    pub(super) sealed_out_bytes: AtomicU64,
    pub(super) opened_in_datagrams: AtomicU64,
    pub(super) opened_in_bytes: AtomicU64,
    pub(super) dropped_in_bytes: AtomicU64,
    dropped: [AtomicU64; OpenError::ALL.len()],
    pub(super) dropped_oversize: AtomicU64,
    pub(super) dropped_unmapped: AtomicU64,
    pub(super) send_errors: AtomicU64,
    pub(super) recv_errors: AtomicU64,
    pub(super) proxies_opened: AtomicU64,
    pub(super) proxies_closed: AtomicU64,
    pub(super) loopback_drops: AtomicU64,
    pub(super) dropped_syn_too_large: AtomicU64,
    pub(super) dropped_syn_malformed: AtomicU64,
    pub(super) digest_bytes: AtomicU64,
    pub(super) pieced_out_messages: AtomicU64,
    pub(super) pieced_in_reassembled: AtomicU64,
    pub(super) pieced_in_timed_out: AtomicU64,
    pub(super) pieced_in_evicted: AtomicU64,
    dropped_piece: [AtomicU64; PieceError::ALL.len()],
    clocks: Mutex<HashMap<SocketAddr, ClockSample>>,
}

/// Most source addresses whose clock offset is remembered; beyond this the least recently
/// heard is forgotten. Only authentic datagrams (sealed with a cluster secret) are recorded,
/// so the table holds cluster members, not whoever sends garbage.
pub const MAX_CLOCK_SAMPLES: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct ClockSample {
    offset_ms: i64,
    at_unix_ms: u64,
}

/// The last clock offset measured for one gossip source address: the sender's sealed
/// timestamp minus our clock when the datagram arrived (positive: the sender's clock is
/// ahead; the one-way network delay is included, so it reads a few ms low).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClockOffset {
    /// The sender's gossip address (as members list it).
    pub addr: SocketAddr,
    /// Sender's clock minus ours, in milliseconds.
    pub offset_ms: i64,
    /// How long ago that datagram arrived, in milliseconds.
    pub age_ms: u64,
}

/// A point-in-time copy of [`GossipCounters`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GossipCountersSnapshot {
    /// Sealed datagrams sent to peers.
    pub sealed_out_datagrams: u64,
    /// Bytes of sealed datagrams sent (UDP payload).
    pub sealed_out_bytes: u64,
    /// Datagrams that opened and were handed to chitchat.
    pub opened_in_datagrams: u64,
    /// Bytes of those datagrams as received (UDP payload).
    pub opened_in_bytes: u64,
    /// Bytes of received datagrams that were dropped.
    pub dropped_in_bytes: u64,
    /// Dropped: shorter than a sealed datagram.
    pub dropped_too_short: u64,
    /// Dropped: unknown seal version.
    pub dropped_bad_version: u64,
    /// Dropped: sealed under a key we do not hold.
    pub dropped_unknown_key: u64,
    /// Dropped: authentication failed.
    pub dropped_bad_tag: u64,
    /// Dropped: outside the freshness window.
    pub dropped_stale: u64,
    /// Dropped: already received.
    pub dropped_replayed: u64,
    /// Dropped: stamped ahead of our clock while the replay cache's share for datagrams that far
    /// ahead was full. Absent from older agents' status, hence the default.
    #[serde(default)]
    pub dropped_future_full: u64,
    /// Outbound datagrams too large to send once sealed.
    pub dropped_oversize: u64,
    /// Inbound envelopes whose loopback source no longer maps to a peer (proxy just evicted).
    pub dropped_unmapped: u64,
    /// Errors sending on the network socket.
    pub send_errors: u64,
    /// Errors receiving on the network or proxy sockets.
    pub recv_errors: u64,
    /// Peer proxies opened so far.
    pub proxies_opened: u64,
    /// Peer proxies closed so far (idle or evicted).
    pub proxies_closed: u64,
    /// Opened datagrams the kernel dropped on the private loopback because chitchat was not
    /// reading fast enough (the namespace's UDP RcvbufErrors, refreshed every few seconds).
    pub loopback_drops: u64,
    /// SYNs not handed to chitchat because answering them would have crashed it: our digest
    /// would have left less than 100 bytes of a datagram for the delta (docs/scale.md).
    #[serde(default)]
    pub dropped_syn_too_large: u64,
    /// SYNs not handed to chitchat because their digest did not decode.
    #[serde(default)]
    pub dropped_syn_malformed: u64,
    /// Size of our own gossip digest in bytes, as last measured (a SYN sent or answered); SYNs
    /// are refused past [`super::digest::GUARD_LIMIT`] (64,379).
    #[serde(default)]
    pub digest_bytes: u64,
    /// Messages sent in pieces (larger than one 1,400-byte datagram once sealed); each piece
    /// counts in `sealed_out_datagrams`.
    #[serde(default)]
    pub pieced_out_messages: u64,
    /// Messages put back together from received pieces (each piece counts in
    /// `opened_in_datagrams`).
    #[serde(default)]
    pub pieced_in_reassembled: u64,
    /// Incomplete messages dropped 2 s after their first piece (a piece was lost).
    #[serde(default)]
    pub pieced_in_timed_out: u64,
    /// Incomplete messages dropped to keep reassembly within its bounds.
    #[serde(default)]
    pub pieced_in_evicted: u64,
    /// Pieces dropped: malformed header.
    #[serde(default)]
    pub dropped_piece_malformed: u64,
    /// Pieces dropped: that piece of the message was already held.
    #[serde(default)]
    pub dropped_piece_duplicate: u64,
    /// Pieces dropped (with their message): a piece count differing from earlier pieces'.
    #[serde(default)]
    pub dropped_piece_inconsistent: u64,
    /// Pieces dropped (with their message): the pieces add up past 65,507 bytes.
    #[serde(default)]
    pub dropped_piece_too_large: u64,
}

impl GossipCountersSnapshot {
    /// Sum of every inbound datagram dropped for failing to open.
    pub fn dropped_unopened(&self) -> u64 {
        self.dropped_too_short
            + self.dropped_bad_version
            + self.dropped_unknown_key
            + self.dropped_bad_tag
            + self.dropped_stale
            + self.dropped_replayed
            + self.dropped_future_full
    }
}

impl GossipCounters {
    /// Records the sealed timestamp `sent_at_ms` of an authentic datagram from `from`, received
    /// at `now_ms` (both Unix milliseconds).
    pub fn record_clock(&self, from: SocketAddr, sent_at_ms: u64, now_ms: u64) {
        let offset = i128::from(sent_at_ms) - i128::from(now_ms);
        let offset_ms =
            i64::try_from(offset).unwrap_or(if offset < 0 { i64::MIN } else { i64::MAX });
        let mut t = self.clocks.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() >= MAX_CLOCK_SAMPLES && !t.contains_key(&from) {
            if let Some(oldest) = t.iter().min_by_key(|(_, s)| s.at_unix_ms).map(|(a, _)| *a) {
                t.remove(&oldest);
            }
        }
        t.insert(
            from,
            ClockSample {
                offset_ms,
                at_unix_ms: now_ms,
            },
        );
    }

    /// The last offset per source address, sorted by address; ages against `now_ms`.
    pub fn clock_offsets(&self, now_ms: u64) -> Vec<ClockOffset> {
        let t = self.clocks.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<ClockOffset> = t
            .iter()
            .map(|(addr, s)| ClockOffset {
                addr: *addr,
                offset_ms: s.offset_ms,
                age_ms: now_ms.saturating_sub(s.at_unix_ms),
            })
            .collect();
        v.sort_by_key(|c| c.addr);
        v
    }

    /// Copies the current values.
    pub fn snapshot(&self) -> GossipCountersSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let dropped = |e: OpenError| get(self.drop_counter(e));
        GossipCountersSnapshot {
            sealed_out_datagrams: get(&self.sealed_out_datagrams),
            sealed_out_bytes: get(&self.sealed_out_bytes),
            opened_in_datagrams: get(&self.opened_in_datagrams),
            opened_in_bytes: get(&self.opened_in_bytes),
            dropped_in_bytes: get(&self.dropped_in_bytes),
            dropped_too_short: dropped(OpenError::TooShort),
            dropped_bad_version: dropped(OpenError::BadVersion),
            dropped_unknown_key: dropped(OpenError::UnknownKey),
            dropped_bad_tag: dropped(OpenError::BadTag),
            dropped_stale: dropped(OpenError::Stale),
            dropped_replayed: dropped(OpenError::Replayed),
            dropped_future_full: dropped(OpenError::FutureFull),
            dropped_oversize: get(&self.dropped_oversize),
            dropped_unmapped: get(&self.dropped_unmapped),
            send_errors: get(&self.send_errors),
            recv_errors: get(&self.recv_errors),
            proxies_opened: get(&self.proxies_opened),
            proxies_closed: get(&self.proxies_closed),
            loopback_drops: get(&self.loopback_drops),
            dropped_syn_too_large: get(&self.dropped_syn_too_large),
            dropped_syn_malformed: get(&self.dropped_syn_malformed),
            digest_bytes: get(&self.digest_bytes),
            pieced_out_messages: get(&self.pieced_out_messages),
            pieced_in_reassembled: get(&self.pieced_in_reassembled),
            pieced_in_timed_out: get(&self.pieced_in_timed_out),
            pieced_in_evicted: get(&self.pieced_in_evicted),
            dropped_piece_malformed: get(self.piece_drop_counter(PieceError::Malformed)),
            dropped_piece_duplicate: get(self.piece_drop_counter(PieceError::Duplicate)),
            dropped_piece_inconsistent: get(self.piece_drop_counter(PieceError::Inconsistent)),
            dropped_piece_too_large: get(self.piece_drop_counter(PieceError::TooLarge)),
        }
    }

    /// Datagrams dropped for `reason`.
    pub fn dropped(&self, reason: OpenError) -> u64 {
        self.drop_counter(reason).load(Ordering::Relaxed)
    }

    pub(super) fn piece_drop_counter(&self, reason: PieceError) -> &AtomicU64 {
        let i = PieceError::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or_default();
        &self.dropped_piece[i]
    }

    /// Adds what a reassembler counted since it was last asked.
    pub(super) fn add_reassembly(&self, c: ReassemblyCounts) {
        bump(&self.pieced_in_reassembled, c.completed);
        bump(&self.pieced_in_timed_out, c.timed_out);
        bump(&self.pieced_in_evicted, c.evicted);
    }

    pub(super) fn drop_counter(&self, reason: OpenError) -> &AtomicU64 {
        let i = OpenError::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        &self.dropped[i]
    }
}

pub(super) fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_offsets_keep_the_last_sample_per_source_and_stay_bounded() {
        let c = GossipCounters::default();
        let a: SocketAddr = "192.0.2.11:9340".parse().unwrap();
        let b: SocketAddr = "[2001:db8::12]:9340".parse().unwrap();
        c.record_clock(a, 1_000_000, 1_000_250);
        c.record_clock(b, 2_000_000 + 40_000, 2_000_000);
        c.record_clock(a, 3_000_000 - 10, 3_000_000);
        assert_eq!(
            c.clock_offsets(3_000_500),
            vec![
                ClockOffset {
                    addr: a,
                    offset_ms: -10,
                    age_ms: 500
                },
                ClockOffset {
                    addr: b,
                    offset_ms: 40_000,
                    age_ms: 1_000_500
                },
            ]
        );
        for p in 0..(MAX_CLOCK_SAMPLES as u16 + 10) {
            let from = SocketAddr::from(([10, 0, (p >> 8) as u8, p as u8], 9340));
            c.record_clock(from, 5, 4_000_000 + u64::from(p));
        }
        let kept = c.clock_offsets(0);
        assert_eq!(kept.len(), MAX_CLOCK_SAMPLES);
        // The least recently heard went first: a and b, then the first new ones.
        assert!(!kept.iter().any(|k| k.addr == a || k.addr == b));
        assert!(!kept
            .iter()
            .any(|k| k.addr == SocketAddr::from(([10, 0, 0, 7], 9340))));
        assert!(kept
            .iter()
            .any(|k| k.addr == SocketAddr::from(([10, 0, 0, 10], 9340))));
        // Hostile extremes saturate instead of overflowing.
        let c = GossipCounters::default();
        c.record_clock(a, u64::MAX, 0);
        assert_eq!(c.clock_offsets(0)[0].offset_ms, i64::MAX);
        c.record_clock(a, 0, u64::MAX);
        assert_eq!(c.clock_offsets(u64::MAX)[0].offset_ms, i64::MIN);
    }

    #[test]
    fn snapshot_json_names_are_stable() {
        // `meshsec status --json` prints these names under "gossip"; renaming one breaks readers.
        let c = GossipCounters::default();
        bump(&c.sealed_out_datagrams, 3);
        bump(c.drop_counter(OpenError::Replayed), 2);
        let snap = c.snapshot();
        let json = serde_json::to_value(&snap).unwrap();
        let mut names: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        let mut want = vec![
            "sealed_out_datagrams",
            "sealed_out_bytes",
            "opened_in_datagrams",
            "opened_in_bytes",
            "dropped_in_bytes",
            "dropped_too_short",
            "dropped_bad_version",
            "dropped_unknown_key",
            "dropped_bad_tag",
            "dropped_stale",
            "dropped_replayed",
            "dropped_future_full",
            "dropped_oversize",
            "dropped_unmapped",
            "send_errors",
            "recv_errors",
            "proxies_opened",
            "proxies_closed",
            "loopback_drops",
            "dropped_syn_too_large",
            "dropped_syn_malformed",
            "digest_bytes",
            "pieced_out_messages",
            "pieced_in_reassembled",
            "pieced_in_timed_out",
            "pieced_in_evicted",
            "dropped_piece_malformed",
            "dropped_piece_duplicate",
            "dropped_piece_inconsistent",
            "dropped_piece_too_large",
        ];
        want.sort_unstable();
        names.sort_unstable();
        assert_eq!(names, want);
        assert_eq!(
            (
                json["sealed_out_datagrams"].as_u64(),
                json["dropped_replayed"].as_u64()
            ),
            (Some(3), Some(2))
        );
        let back: GossipCountersSnapshot = serde_json::from_value(json).unwrap();
        assert_eq!(back, snap);
        assert_eq!(c.dropped(OpenError::Replayed), 2);
    }
}
