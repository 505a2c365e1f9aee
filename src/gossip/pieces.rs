//! Bounded datagrams: a chitchat datagram too large for one [`PIECE_BUDGET`]-byte UDP payload
//! once sealed goes out as pieces, each sealed on its own ([`super::seal::PIECE_VERSION`]), and
//! is put back together by the receiver (proto/gossip-seal.md, "Pieces").
//!
//! Piece plaintext (what the seal carries after its timestamp), integers big-endian:
//!
//! ```text
//! +------------+-------+-------+----------------+
//! | message id | index | count | data           |
//! | 8 bytes    | 2     | 2     | 1 ..= 1,335    |
//! +------------+-------+-------+----------------+
//! ```
//!
//! Why each piece is sealed on its own: the receiver authenticates a piece before it holds a
//! byte of it, so only pieces some member sealed can make it spend reassembly memory, and the
//! replay window applies per piece. What is left, and bounded here:
//! - an on-path attacker without the secret can drop, delay, reorder or replay pieces. A replay
//!   to the same receiver is refused by the opener; a drop or a delay past
//!   [`ReassemblyConfig::timeout`] loses the message, as dropping a whole datagram did; a
//!   reorder is harmless (pieces carry their index). A piece sent to another member opens once
//!   here too (each receiver has its own replay cache), so whoever sees gossip between other
//!   members can start messages here from spoofed addresses, like a secret holder below.
//! - a secret holder can start messages it never finishes. Each costs at most
//!   [`MAX_MESSAGE`] bytes for at most the timeout, and the reassembler holds at most
//!   [`ReassemblyConfig::max_per_source`] messages per source address and
//!   [`ReassemblyConfig::max_messages`] / [`ReassemblyConfig::max_bytes`] in total; beyond that
//!   the message (of that source, for the per-source bound) whose last piece arrived least
//!   recently is dropped, so an honest message, whose pieces arrive back to back, goes last.
//!   Such a member can still delay others' large messages by feeding its own as fast (it could
//!   already publish garbage state); it cannot grow memory or crash the agent.
//!
//! The reassembler is sans-IO: the caller passes a monotonic clock in milliseconds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use rand::RngCore;

use super::seal::{Keyring, OVERHEAD, PIECE_VERSION};

/// Largest sealed datagram (UDP payload) this node sends. With the IPv6 header (40) and the UDP
/// header (8) that is 1,448 bytes, under a 1,500-byte MTU with 52 bytes to spare for tunnels
/// or options in front (IPv4's header is 20 bytes, so 1,428 there).
pub const PIECE_BUDGET: usize = 1_400;
/// Piece header: message id (8), index (2), count (2).
pub const PIECE_HEADER_LEN: usize = 12;
/// Data bytes per piece: what the budget leaves after the seal and the piece header.
pub const PIECE_DATA_LEN: usize = PIECE_BUDGET - OVERHEAD - PIECE_HEADER_LEN;
/// Largest message reassembled: chitchat's largest datagram (`MAX_UDP_DATAGRAM_PAYLOAD_SIZE`;
/// it neither sends nor reads more, and the SYN guard's 1 MiB decode cap applies to what this
/// decompresses to).
pub const MAX_MESSAGE: usize = super::transport::digest::MAX_PAYLOAD;
/// Most pieces in one message: [`MAX_MESSAGE`] in [`PIECE_DATA_LEN`]-byte pieces (50).
pub const MAX_PIECES: usize = MAX_MESSAGE.div_ceil(PIECE_DATA_LEN);

/// Seals `payload` for the wire: one whole sealed datagram when it fits [`PIECE_BUDGET`] (as
/// every agent sent before pieces existed), else one sealed piece per [`PIECE_DATA_LEN`] bytes,
/// all stamped `now_unix_ms`. None when `payload` is larger than [`MAX_MESSAGE`].
pub fn seal_message(keyring: &Keyring, now_unix_ms: u64, payload: &[u8]) -> Option<Vec<Vec<u8>>> {
    if OVERHEAD + payload.len() <= PIECE_BUDGET {
        return Some(vec![keyring.seal(now_unix_ms, payload)]);
    }
    if payload.len() > MAX_MESSAGE {
        return None;
    }
    let id = rand::thread_rng().next_u64();
    Some(
        split(id, payload)
            .map(|piece| keyring.seal_kind(PIECE_VERSION, now_unix_ms, &piece))
            .collect(),
    )
}

/// The piece plaintexts of `payload` (at most [`MAX_PIECES`] when it is at most [`MAX_MESSAGE`]).
pub fn split(id: u64, payload: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    let count = payload.len().div_ceil(PIECE_DATA_LEN).max(1);
    let count16 = u16::try_from(count).unwrap_or(u16::MAX);
    payload
        .chunks(PIECE_DATA_LEN)
        .enumerate()
        .map(move |(index, data)| {
            let mut piece = Vec::with_capacity(PIECE_HEADER_LEN + data.len());
            piece.extend_from_slice(&id.to_be_bytes());
            piece.extend_from_slice(&u16::try_from(index).unwrap_or(u16::MAX).to_be_bytes());
            piece.extend_from_slice(&count16.to_be_bytes());
            piece.extend_from_slice(data);
            piece
        })
}

/// Why an authentic piece was not kept. Every variant is something a secret holder (or a
/// buggy sender) can cause: counted and logged, never a reason to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum PieceError {
    /// Shorter than a piece header, no data, a count of 0 or above [`MAX_PIECES`], or an index
    /// not below the count.
    #[error("malformed piece header")]
    Malformed,
    /// A piece with this index of this message is already held (the first one is kept).
    #[error("piece already held")]
    Duplicate,
    /// The count differs from the one earlier pieces of the message gave: the message is dropped.
    #[error("piece count differs from earlier pieces of the message")]
    Inconsistent,
    /// The message's pieces add up to more than [`MAX_MESSAGE`] bytes: the message is dropped.
    #[error("message larger than the largest gossip datagram")]
    TooLarge,
}

impl PieceError {
    /// Every variant, in a stable order (used to lay out counters).
    pub const ALL: [PieceError; 4] = [
        PieceError::Malformed,
        PieceError::Duplicate,
        PieceError::Inconsistent,
        PieceError::TooLarge,
    ];

    /// A short stable name, for counters and structured logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PieceError::Malformed => "piece_malformed",
            PieceError::Duplicate => "piece_duplicate",
            PieceError::Inconsistent => "piece_inconsistent",
            PieceError::TooLarge => "piece_too_large",
        }
    }
}

/// Bounds of a [`Reassembler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReassemblyConfig {
    /// An incomplete message is dropped this long after its first piece arrived.
    pub timeout: Duration,
    /// Most incomplete messages held per source address.
    pub max_per_source: usize,
    /// Most incomplete messages held in total.
    pub max_messages: usize,
    /// Most data bytes held in total (at least [`MAX_MESSAGE`]).
    pub max_bytes: usize,
}

impl Default for ReassemblyConfig {
    fn default() -> Self {
        ReassemblyConfig {
            // Pieces of a message leave back to back: milliseconds apart plus jitter.
            timeout: Duration::from_secs(2),
            // A peer has a SYN, a SYN-ACK and an ACK to us in flight at most, per round.
            max_per_source: 4,
            max_messages: 128,
            // 64 messages of the largest size.
            max_bytes: 64 * MAX_MESSAGE,
        }
    }
}

/// Messages dropped or completed since the counts were last taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReassemblyCounts {
    /// Messages put back together.
    pub completed: u64,
    /// Incomplete messages dropped at the timeout (a piece was lost).
    pub timed_out: u64,
    /// Incomplete messages dropped to stay within the bounds.
    pub evicted: u64,
}

#[derive(Debug)]
struct Partial {
    started_ms: u64,
    count: usize,
    pieces: Vec<Option<Vec<u8>>>,
    held: usize,
    bytes: usize,
    /// When a piece was last kept (a sequence number across the reassembler): the victim of
    /// every bound is the message that made progress least recently.
    touched: u64,
}

/// Puts pieces back together, within bounds; see the module docs.
#[derive(Debug)]
pub struct Reassembler {
    config: ReassemblyConfig,
    partial: HashMap<(SocketAddr, u64), Partial>,
    bytes: usize,
    counts: ReassemblyCounts,
    touches: u64,
}

impl Reassembler {
    /// An empty reassembler.
    pub fn new(config: ReassemblyConfig) -> Self {
        let config = ReassemblyConfig {
            max_per_source: config.max_per_source.max(1),
            max_messages: config.max_messages.max(1),
            max_bytes: config.max_bytes.max(MAX_MESSAGE),
            ..config
        };
        Reassembler {
            config,
            partial: HashMap::new(),
            bytes: 0,
            counts: ReassemblyCounts::default(),
            touches: 0,
        }
    }

    /// Incomplete messages held.
    pub fn messages(&self) -> usize {
        self.partial.len()
    }

    /// Data bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The counts since the last call, reset.
    pub fn take_counts(&mut self) -> ReassemblyCounts {
        std::mem::take(&mut self.counts)
    }

    /// Takes an opened piece (the plaintext of a [`PIECE_VERSION`] box) from `from` at
    /// `now_ms` (monotonic): the whole message once its last piece is in, else None.
    pub fn accept(
        &mut self,
        now_ms: u64,
        from: SocketAddr,
        piece: &[u8],
    ) -> Result<Option<Vec<u8>>, PieceError> {
        self.expire(now_ms);
        if piece.len() <= PIECE_HEADER_LEN {
            return Err(PieceError::Malformed);
        }
        let (header, data) = piece.split_at(PIECE_HEADER_LEN);
        let id = u64::from_be_bytes(header[0..8].try_into().map_err(|_| PieceError::Malformed)?);
        let index = usize::from(u16::from_be_bytes([header[8], header[9]]));
        let count = usize::from(u16::from_be_bytes([header[10], header[11]]));
        if count == 0 || count > MAX_PIECES || index >= count {
            return Err(PieceError::Malformed);
        }
        let key = (from, id);
        if let Some(p) = self.partial.get(&key) {
            if p.count != count {
                self.remove(&key);
                return Err(PieceError::Inconsistent);
            }
            if p.pieces[index].is_some() {
                return Err(PieceError::Duplicate);
            }
            if p.bytes + data.len() > MAX_MESSAGE {
                self.remove(&key);
                return Err(PieceError::TooLarge);
            }
        } else {
            if data.len() > MAX_MESSAGE {
                return Err(PieceError::TooLarge);
            }
            if count == 1 {
                // Nothing to hold.
                self.counts.completed += 1;
                return Ok(Some(data.to_vec()));
            }
            self.make_room_for_message(from);
            self.partial.insert(
                key,
                Partial {
                    started_ms: now_ms,
                    count,
                    pieces: vec![None; count],
                    held: 0,
                    bytes: 0,
                    touched: 0,
                },
            );
        }
        self.make_room_for_bytes(data.len(), &key);
        let Some(p) = self.partial.get_mut(&key) else {
            return Ok(None);
        };
        self.touches += 1;
        p.touched = self.touches;
        p.pieces[index] = Some(data.to_vec());
        p.held += 1;
        p.bytes += data.len();
        self.bytes += data.len();
        if p.held < p.count {
            return Ok(None);
        }
        let Some(p) = self.remove(&key) else {
            return Ok(None);
        };
        let mut message = Vec::with_capacity(p.bytes);
        for data in p.pieces.into_iter().flatten() {
            message.extend_from_slice(&data);
        }
        self.counts.completed += 1;
        Ok(Some(message))
    }

    /// Drops incomplete messages older than the timeout.
    pub fn expire(&mut self, now_ms: u64) {
        let timeout = u64::try_from(self.config.timeout.as_millis()).unwrap_or(u64::MAX);
        let old: Vec<_> = self
            .partial
            .iter()
            .filter(|(_, p)| now_ms.saturating_sub(p.started_ms) >= timeout)
            .map(|(k, _)| *k)
            .collect();
        for key in old {
            self.remove(&key);
            self.counts.timed_out += 1;
        }
    }

    fn remove(&mut self, key: &(SocketAddr, u64)) -> Option<Partial> {
        let p = self.partial.remove(key)?;
        self.bytes -= p.bytes;
        Some(p)
    }

    /// The message (of `from` if given) whose last piece arrived least recently; never `spare`.
    ///
    /// Not the oldest, nor one of the source holding most bytes: pieces of an honest message
    /// arrive back to back, so the one being filled is the last to go, while a message started
    /// with pieces captured on the way to other members (which open once here too) or sent by
    /// a secret holder from spoofed addresses goes first unless it is fed as fast.
    fn victim(
        &self,
        from: Option<SocketAddr>,
        spare: Option<&(SocketAddr, u64)>,
    ) -> Option<(SocketAddr, u64)> {
        self.partial
            .iter()
            .filter(|(k, _)| from.is_none_or(|s| k.0 == s) && Some(*k) != spare)
            .min_by_key(|(k, p)| (p.touched, p.started_ms, k.1))
            .map(|(k, _)| *k)
    }

    fn evict(&mut self, key: &(SocketAddr, u64)) {
        if self.remove(key).is_some() {
            self.counts.evicted += 1;
        }
    }

    /// Before a new message from `from` is held: within the per-source and total counts.
    fn make_room_for_message(&mut self, from: SocketAddr) {
        // No message is spared: the new one is not held yet.
        while self.partial.keys().filter(|k| k.0 == from).count() >= self.config.max_per_source {
            match self.victim(Some(from), None) {
                Some(k) => self.evict(&k),
                None => break,
            }
        }
        while self.partial.len() >= self.config.max_messages {
            match self.victim(None, None) {
                Some(k) => self.evict(&k),
                None => break,
            }
        }
    }

    /// Before `len` more bytes go to message `key`: within the total bytes, never evicting `key`
    /// (it holds at most [`MAX_MESSAGE`], and the total is at least that).
    fn make_room_for_bytes(&mut self, len: usize, key: &(SocketAddr, u64)) {
        while self.bytes + len > self.config.max_bytes {
            match self.victim(None, Some(key)) {
                Some(k) => self.evict(&k),
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::gossip::seal::{Opened, Opener, ReplayConfig};

    const NOW: u64 = 1_790_000_000_000;

    fn src(i: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9000 + i))
    }

    fn payload(len: usize, seed: u64) -> Vec<u8> {
        let mut r = StdRng::seed_from_u64(seed);
        (0..len).map(|_| r.gen()).collect()
    }

    fn pieces(id: u64, len: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
        let p = payload(len, id);
        let v = split(id, &p).collect();
        (p, v)
    }

    #[test]
    fn the_budget_arithmetic_holds() {
        assert_eq!(PIECE_DATA_LEN, 1_335);
        assert_eq!(MAX_PIECES, 50);
        const { assert!(PIECE_BUDGET + 40 + 8 <= 1_500) };
        const { assert!(MAX_PIECES * PIECE_DATA_LEN >= MAX_MESSAGE) };
    }

    /// proto/vectors/gossip-seal.json "pieces", computed by proto/vectors/gossip-pieces.py.
    #[test]
    fn json_vectors() {
        let text = include_str!("../../proto/vectors/gossip-seal.json");
        let doc: serde_json::Value = serde_json::from_str(text).unwrap();
        let hexd = |v: &serde_json::Value| -> Vec<u8> {
            let s = v.as_str().unwrap();
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let vectors = doc["pieces"].as_array().unwrap();
        assert!(!vectors.is_empty());
        for v in vectors {
            let secret: [u8; 32] = hexd(&v["secret"]).try_into().unwrap();
            let k = Arc::new(Keyring::new([secret]).unwrap());
            let at = v["sent_at_ms"].as_u64().unwrap();
            let id = v["message_id"].as_u64().unwrap();
            let message = hexd(&v["message"]);
            let want = v["pieces"].as_array().unwrap();
            let ours: Vec<Vec<u8>> = split(id, &message).collect();
            assert_eq!(ours.len(), want.len());
            let mut o = Opener::new(k.clone(), ReplayConfig::default());
            let mut r = Reassembler::new(ReassemblyConfig::default());
            let mut out = None;
            for (piece, w) in ours.iter().zip(want) {
                assert_eq!(piece, &hexd(&w["piece"]));
                let nonce: [u8; 24] = hexd(&w["nonce"]).try_into().unwrap();
                let sealed = k.seal_versioned(PIECE_VERSION, at, nonce, piece);
                assert_eq!(sealed, hexd(&w["sealed"]), "{}", v["name"]);
                assert!(sealed.len() <= PIECE_BUDGET);
                let Opened::Piece(p) = o.open_any(at, &sealed).1.unwrap() else {
                    panic!("not a piece");
                };
                out = r.accept(0, src(1), &p).unwrap();
            }
            assert_eq!(out.unwrap(), message);
        }
    }

    #[test]
    fn small_messages_are_sealed_whole_and_large_ones_in_bounded_pieces() {
        let k = Arc::new(Keyring::new([[7u8; 32]]).unwrap());
        let mut o = Opener::new(k.clone(), ReplayConfig::default());
        let mut r = Reassembler::new(ReassemblyConfig::default());
        for len in [
            0,
            1,
            PIECE_BUDGET - OVERHEAD,
            PIECE_BUDGET - OVERHEAD + 1,
            20_000,
            MAX_MESSAGE,
        ] {
            let p = payload(len, len as u64);
            let sealed = seal_message(&k, NOW, &p).unwrap();
            assert!(sealed.iter().all(|d| d.len() <= PIECE_BUDGET), "{len}");
            let whole = len + OVERHEAD <= PIECE_BUDGET;
            assert_eq!(sealed.len() == 1 && sealed[0][0] == 1, whole, "{len}");
            // A whole one is byte-compatible with agents that know no pieces.
            if whole {
                assert_eq!(o.open(NOW, &sealed[0]).unwrap(), p);
                continue;
            }
            let mut out = None;
            for d in &sealed {
                let Opened::Piece(piece) = o.open_any(NOW, d).1.unwrap() else {
                    panic!("a piece opened as a whole datagram");
                };
                assert!(out.is_none());
                out = r.accept(0, src(1), &piece).unwrap();
            }
            assert_eq!(out.unwrap(), p, "{len}");
        }
        assert!(seal_message(&k, NOW, &payload(MAX_MESSAGE + 1, 1)).is_none());
        assert_eq!((r.messages(), r.bytes()), (0, 0));
    }

    #[test]
    fn the_old_opener_refuses_pieces() {
        // What an agent without pieces makes of one: an unknown version, counted.
        let k = Arc::new(Keyring::new([[7u8; 32]]).unwrap());
        let sealed = seal_message(&k, NOW, &payload(5_000, 1)).unwrap();
        let mut o = Opener::new(k, ReplayConfig::default());
        assert_eq!(
            o.open(NOW, &sealed[0]),
            Err(crate::gossip::seal::OpenError::BadVersion)
        );
    }

    #[test]
    fn out_of_order_and_duplicate_pieces_reassemble() {
        let (p, mut v) = pieces(9, 10_000);
        v.shuffle(&mut StdRng::seed_from_u64(3));
        let mut r = Reassembler::new(ReassemblyConfig::default());
        let last = v.pop().unwrap();
        for piece in &v {
            assert_eq!(r.accept(0, src(1), piece), Ok(None));
            assert_eq!(r.accept(0, src(1), piece), Err(PieceError::Duplicate));
        }
        assert_eq!(r.accept(0, src(1), &last), Ok(Some(p)));
        // Late duplicates of a finished message start a new one that times out.
        assert_eq!(r.accept(1, src(1), &v[0]), Ok(None));
        r.expire(5_000);
        assert_eq!(
            r.take_counts(),
            ReassemblyCounts {
                completed: 1,
                timed_out: 1,
                evicted: 0
            }
        );
    }

    #[test]
    fn a_lost_piece_loses_the_message_and_is_counted() {
        let (_, v) = pieces(1, 10_000);
        let mut r = Reassembler::new(ReassemblyConfig::default());
        for piece in v.iter().skip(1) {
            assert_eq!(r.accept(0, src(1), piece), Ok(None));
        }
        assert_eq!(r.messages(), 1);
        r.expire(1_999);
        assert_eq!(r.messages(), 1);
        r.expire(2_000);
        assert_eq!((r.messages(), r.bytes()), (0, 0));
        assert_eq!(r.take_counts().timed_out, 1);
        // The lost piece arriving late starts over and never completes.
        assert_eq!(r.accept(2_001, src(1), &v[0]), Ok(None));
    }

    #[test]
    fn pieces_of_one_id_from_two_sources_stay_apart() {
        let (p, v) = pieces(5, 4_000);
        let mut r = Reassembler::new(ReassemblyConfig::default());
        for piece in &v[..v.len() - 1] {
            assert_eq!(r.accept(0, src(1), piece), Ok(None));
        }
        assert_eq!(r.accept(0, src(2), &v[v.len() - 1]), Ok(None));
        assert_eq!(r.accept(0, src(1), &v[v.len() - 1]), Ok(Some(p)));
    }

    #[test]
    fn inconsistent_counts_and_malformed_headers_are_refused() {
        let mut r = Reassembler::new(ReassemblyConfig::default());
        let (_, v) = pieces(1, 4_000);
        assert_eq!(r.accept(0, src(1), &v[0]), Ok(None));
        let mut other = v[1].clone();
        other[11] += 1;
        assert_eq!(r.accept(0, src(1), &other), Err(PieceError::Inconsistent));
        assert_eq!((r.messages(), r.bytes()), (0, 0));
        let header = |index: u16, count: u16| {
            let mut h = 7u64.to_be_bytes().to_vec();
            h.extend_from_slice(&index.to_be_bytes());
            h.extend_from_slice(&count.to_be_bytes());
            h
        };
        let with_data = |mut h: Vec<u8>| {
            h.push(1);
            h
        };
        for bad in [
            vec![],
            header(0, 2),                                // no data
            with_data(header(0, 0)),                     // no pieces
            with_data(header(2, 2)),                     // index past count
            with_data(header(0, MAX_PIECES as u16 + 1)), // too many pieces
            with_data(header(u16::MAX, u16::MAX)),
        ] {
            assert_eq!(
                r.accept(0, src(1), &bad),
                Err(PieceError::Malformed),
                "{bad:?}"
            );
        }
        // A message whose pieces add up past the largest datagram is dropped.
        let mut big = header(0, 2);
        big.extend(std::iter::repeat_n(0, MAX_MESSAGE));
        assert_eq!(r.accept(0, src(1), &big), Ok(None));
        let mut more = header(1, 2);
        more.push(0);
        assert_eq!(r.accept(0, src(1), &more), Err(PieceError::TooLarge));
        assert_eq!((r.messages(), r.bytes()), (0, 0));
    }

    #[test]
    fn memory_is_bounded_per_source_and_in_total() {
        let cfg = ReassemblyConfig {
            max_per_source: 3,
            max_messages: 10,
            max_bytes: 2 * MAX_MESSAGE,
            ..ReassemblyConfig::default()
        };
        let mut r = Reassembler::new(cfg);
        // One source starting many messages keeps only its newest three.
        for id in 0..100 {
            let (_, v) = pieces(id, 3_000);
            assert_eq!(r.accept(0, src(1), &v[0]), Ok(None));
        }
        assert_eq!(r.messages(), 3);
        assert_eq!(r.take_counts().evicted, 97);
        // Many sources: at most ten messages.
        for s in 0..50 {
            let (_, v) = pieces(u64::from(s), 3_000);
            assert_eq!(r.accept(0, src(100 + s), &v[0]), Ok(None));
        }
        assert_eq!(r.messages(), 10);
        // Bytes: nearly complete large messages from three sources fit two at a time, and a
        // message being completed is never the one evicted.
        let mut r = Reassembler::new(cfg);
        let mut all = Vec::new();
        for s in 0..3 {
            let (p, v) = pieces(u64::from(s), MAX_MESSAGE);
            for piece in &v[..v.len() - 1] {
                assert_eq!(r.accept(0, src(s), piece), Ok(None));
                assert!(r.bytes() <= cfg.max_bytes);
            }
            all.push((p, v));
        }
        assert_eq!(r.messages(), 2);
        let (p, v) = &all[2];
        assert_eq!(r.accept(0, src(2), v.last().unwrap()), Ok(Some(p.clone())));
    }

    #[test]
    fn an_honest_source_survives_a_flooding_one() {
        // A member flooding with unfinished messages from one address evicts its own first.
        let mut r = Reassembler::new(ReassemblyConfig::default());
        let (p, v) = pieces(42, 30_000);
        for (i, piece) in v.iter().enumerate() {
            for id in 0..10 {
                let (_, junk) = pieces(1_000 + i as u64 * 10 + id, 60_000);
                let _ = r.accept(0, src(9), &junk[0]);
            }
            let done = r.accept(0, src(1), piece).unwrap();
            assert_eq!(done.is_some(), i == v.len() - 1);
            if let Some(m) = done {
                assert_eq!(m, p);
            }
        }
    }

    #[test]
    fn an_honest_message_survives_one_piece_messages_from_many_sources() {
        // Pieces anyone on the path can get: pieces of gossip sent to other members open once
        // here too (each receiver has its own replay cache), so an attacker without the secret
        // can start a message per spoofed source address with one captured piece. The table is
        // full of such one-piece messages, and each piece of an honest message is followed by
        // another one: the honest message, which is the one being filled, must not be the one
        // dropped (it holds the most bytes, but it was the last one to make progress).
        let mut r = Reassembler::new(ReassemblyConfig::default());
        let captured: Vec<Vec<u8>> = (0..1_000).map(|id| pieces(id, 3_000).1.remove(0)).collect();
        let mut spoofed = 0..;
        let mut next = |r: &mut Reassembler, now: u64| {
            let s = spoofed.next().unwrap();
            let piece = &captured[s % captured.len()];
            assert_eq!(r.accept(now, src(1_000 + s as u16), piece), Ok(None));
        };
        for _ in 0..ReassemblyConfig::default().max_messages {
            next(&mut r, 0);
        }
        let (p, v) = pieces(4_242, 30_000);
        let mut done = None;
        for (i, piece) in v.iter().enumerate() {
            done = r.accept(1 + i as u64, src(1), piece).unwrap();
            next(&mut r, 1 + i as u64);
        }
        assert_eq!(done, Some(p));
    }

    #[test]
    fn hostile_pieces_never_panic_and_stay_bounded() {
        let cfg = ReassemblyConfig::default();
        let mut r = Reassembler::new(cfg);
        let mut rng = StdRng::seed_from_u64(11);
        for i in 0..20_000u64 {
            let len = rng.gen_range(0..200);
            let mut piece: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if piece.len() >= PIECE_HEADER_LEN {
                // Plausible headers often enough to fill buffers.
                piece[0..8].copy_from_slice(&rng.gen_range(0..64u64).to_be_bytes());
                piece[8..10].copy_from_slice(&rng.gen_range(0..4u16).to_be_bytes());
                piece[10..12].copy_from_slice(&rng.gen_range(0..4u16).to_be_bytes());
            }
            let _ = r.accept(i / 10, src(rng.gen_range(0..300)), &piece);
            assert!(r.messages() <= cfg.max_messages);
            assert!(r.bytes() <= cfg.max_bytes);
        }
    }
}
