//! chitchat 0.13's digest, measured the way chitchat encodes it, and the size past which
//! chitchat cannot answer a SYN.
//!
//! Every SYN and SYN-ACK carries the sender's digest of its whole state: one entry per node id
//! (name, generation, gossip address) it holds, dead generations included until half the
//! dead-node grace after their death. A SYN-ACK must fit that digest *and* a delta in one
//! datagram of 65,507 bytes; chitchat 0.13 asserts that at least 100 bytes remain for the delta
//! (`assert!(mtu >= 100)` in `DeltaSerializer::with_mtu`), so a node whose own digest grows
//! past [`CRASH_DIGEST_LEN`] panics in its gossip task on the next SYN it answers. chitchat
//! exposes neither its digest nor its encoder, so this module decodes a SYN's digest and
//! predicts the size of the digest chitchat is about to build, byte for byte (the tests compare
//! it with what chitchat sends). The transport drops a SYN whose answer would cross the line
//! (see `pump_in`), which keeps the node alive.
//!
//! Wire format (chitchat 0.13 `message_serialize.rs`, `digest.rs`, `serialize.rs`): magic
//! `45139` (u16 LE), protocol version (u8), message type (u8, SYN = 0), the digest, the cluster
//! id. A V0 digest is a u16 count followed by the entries; a V1 digest is the entries' bytes cut
//! into 16,384-byte blocks, each stored zstd-compressed (tag 1, u16 length) or raw when that is
//! not smaller (tag 2), ended by tag 0. An entry is the `ChitchatId` (u16-prefixed name, u64
//! generation, address) then heartbeat, last GC version and max version (u64 each).

use std::collections::BTreeMap;

use chitchat::{ChitchatId, Deserializable, ProtocolVersion, Serializable};

/// chitchat's largest datagram payload (`MAX_UDP_DATAGRAM_PAYLOAD_SIZE`).
pub const MAX_PAYLOAD: usize = 65_507;
/// Envelope header: magic (2), version (1), message type (1).
const HEADER_LEN: usize = 4;
/// The room chitchat asserts for a SYN-ACK's delta.
const MIN_DELTA_ROOM: usize = 100;
/// The largest own digest with which chitchat 0.13 can still answer a SYN: past it the
/// responder's gossip task panics (issue 12's crash point).
pub const CRASH_DIGEST_LEN: usize = MAX_PAYLOAD - HEADER_LEN - MIN_DELTA_ROOM;
/// A SYN is refused when the predicted digest is within this many bytes of the crash point:
/// what can change between the check and chitchat's answer (other datagrams applied in between,
/// heartbeats compressing a little differently).
pub const GUARD_MARGIN: usize = 1_024;
/// A SYN is answered only if the digest it makes us send stays at or below this.
pub const GUARD_LIMIT: usize = CRASH_DIGEST_LEN - GUARD_MARGIN;

const MAGIC: u16 = 45_139;
const SYN: u8 = 0;
const BLOCK: usize = 16_384;
/// Decoded digest bytes accepted from one datagram; more is a decompression bomb. A digest
/// at the guard's limit (about 4,700 node ids, ~75 bytes each decoded) is ~350 KB: 1 MiB
/// leaves room and bounds what a hostile SYN costs to decode and merge (review: 4 MiB).
const MAX_DECODED: usize = 1 << 20;

/// One pair of zstd contexts for the process, made on first use: the guard decodes and
/// measures a digest for every SYN, and zstd::bulk's one-shot functions made (and freed) a
/// fresh context per call, which cost more than the work (`ZSTD_createCCtx`/`ZSTD_createDCtx`
/// were about an eighth of an idle agent's CPU). One pair, not one per thread: each holds a few
/// hundred KB, and SYNs come a few a second (the lock is never contended for long). Same
/// level, same output.
static ZSTD: std::sync::Mutex<Option<Zstd>> = std::sync::Mutex::new(None);

struct Zstd {
    compressor: zstd::bulk::Compressor<'static>,
    decompressor: zstd::bulk::Decompressor<'static>,
}

/// Runs `f` with the process's zstd contexts; `None` if they cannot be made (no memory).
fn with_zstd<T>(f: impl FnOnce(&mut Zstd) -> std::io::Result<T>) -> Option<std::io::Result<T>> {
    let mut z = ZSTD.lock().unwrap_or_else(|e| e.into_inner());
    if z.is_none() {
        *z = Some(Zstd {
            compressor: zstd::bulk::Compressor::new(0).ok()?,
            decompressor: zstd::bulk::Decompressor::new().ok()?,
        });
    }
    z.as_mut().map(f)
}

/// `zstd::bulk::compress_to_buffer(chunk, out, 0)` on the process's context.
fn compress_to_buffer(chunk: &[u8], out: &mut [u8]) -> std::io::Result<usize> {
    match with_zstd(|z| z.compressor.compress_to_buffer(chunk, &mut *out)) {
        Some(r) => r,
        None => zstd::bulk::compress_to_buffer(chunk, out, 0),
    }
}

/// `zstd::bulk::decompress_to_buffer(bytes, out)` on the process's context.
fn decompress_to_buffer(bytes: &[u8], out: &mut [u8]) -> std::io::Result<usize> {
    match with_zstd(|z| z.decompressor.decompress_to_buffer(bytes, &mut *out)) {
        Some(r) => r,
        None => zstd::bulk::decompress_to_buffer(bytes, out),
    }
}

/// One node's digest entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeDigest {
    /// The node's heartbeat.
    pub heartbeat: u64,
    /// Version of its last garbage-collected tombstone.
    pub last_gc_version: u64,
    /// Its highest key-value version.
    pub max_version: u64,
}

/// A digest: every node id with its entry, in chitchat's (and the wire's) order.
pub type Digest = BTreeMap<ChitchatId, NodeDigest>;

/// A decoded SYN.
#[derive(Debug)]
pub struct Syn {
    /// The protocol version the sender used (the answer echoes it).
    pub version: ProtocolVersion,
    /// The sender's digest.
    pub digest: Digest,
}

/// Why a datagram did not decode as a SYN.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    /// Truncated, a bad tag, a block that does not decompress, or more than 1 MiB decoded.
    #[error("malformed SYN digest")]
    Malformed,
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], DigestError> {
    if buf.len() < n {
        return Err(DigestError::Malformed);
    }
    let (head, tail) = buf.split_at(n);
    *buf = tail;
    Ok(head)
}

fn read<T: Deserializable>(buf: &mut &[u8]) -> Result<T, DigestError> {
    T::deserialize(buf).map_err(|_| DigestError::Malformed)
}

/// Decodes `plain` (an opened gossip datagram) if it is a chitchat SYN: `Ok(None)` for any
/// other message (or what chitchat itself will refuse: bad magic, unknown version).
pub fn parse_syn(plain: &[u8]) -> Result<Option<Syn>, DigestError> {
    if plain.len() < HEADER_LEN || u16::from_le_bytes([plain[0], plain[1]]) != MAGIC {
        return Ok(None);
    }
    let Some(version) = ProtocolVersion::from_code(plain[2]) else {
        return Ok(None);
    };
    if plain[3] != SYN {
        return Ok(None);
    }
    let mut buf = &plain[HEADER_LEN..];
    let mut digest = Digest::new();
    let mut push = |entries: &mut &[u8]| -> Result<(), DigestError> {
        let id: ChitchatId = read(entries)?;
        let d = NodeDigest {
            heartbeat: read(entries)?,
            last_gc_version: read(entries)?,
            max_version: read(entries)?,
        };
        digest.insert(id, d);
        Ok(())
    };
    match version {
        ProtocolVersion::V0 => {
            let n: u16 = read(&mut buf)?;
            for _ in 0..n {
                push(&mut buf)?;
            }
        }
        ProtocolVersion::V1 => {
            let mut raw = Vec::new();
            let mut block = vec![0u8; usize::from(u16::MAX)];
            loop {
                match read::<u8>(&mut buf)? {
                    0 => break,
                    tag @ (1 | 2) => {
                        let len: u16 = read(&mut buf)?;
                        let bytes = take(&mut buf, usize::from(len))?;
                        if tag == 1 {
                            let n = decompress_to_buffer(bytes, &mut block[..])
                                .map_err(|_| DigestError::Malformed)?;
                            raw.extend_from_slice(&block[..n]);
                        } else {
                            raw.extend_from_slice(bytes);
                        }
                        if raw.len() > MAX_DECODED {
                            return Err(DigestError::Malformed);
                        }
                    }
                    _ => return Err(DigestError::Malformed),
                }
            }
            let mut entries = &raw[..];
            while !entries.is_empty() {
                push(&mut entries)?;
            }
        }
    }
    // The cluster id follows; chitchat checks it.
    let _cluster: String = read(&mut buf)?;
    Ok(Some(Syn { version, digest }))
}

fn entries_bytes(digest: &Digest) -> Vec<u8> {
    let mut raw = Vec::with_capacity(digest.len() * 48);
    for (id, d) in digest {
        id.serialize(&mut raw);
        d.heartbeat.serialize(&mut raw);
        d.last_gc_version.serialize(&mut raw);
        d.max_version.serialize(&mut raw);
    }
    raw
}

/// The length chitchat 0.13 gives `digest` encoded as `version`.
pub fn encoded_len(digest: &Digest, version: ProtocolVersion) -> usize {
    let raw = entries_bytes(digest);
    match version {
        ProtocolVersion::V0 => 2 + raw.len(),
        ProtocolVersion::V1 => {
            let mut out = vec![0u8; BLOCK];
            let blocks: usize = raw
                .chunks(BLOCK)
                .map(|chunk| {
                    // As chitchat does: compressed into a buffer the size of the input, stored
                    // raw when it does not fit.
                    match compress_to_buffer(chunk, &mut out[..chunk.len()]) {
                        Ok(n) => 3 + n,
                        Err(_) => 3 + chunk.len(),
                    }
                })
                .sum();
            blocks + 1
        }
    }
}

/// The digest `state` (our own, without the nodes chitchat has scheduled for deletion) will
/// hold once chitchat has taken in `incoming` (a SYN's digest), as chitchat's
/// `report_heartbeats_in_digest` does: unknown ids are added, known ones keep the higher
/// heartbeat, ids scheduled for deletion stay out, and our own heartbeat goes up by one.
/// chitchat skips ids it garbage-collected recently; counting them errs on the safe side.
pub fn merged(
    state: &Digest,
    scheduled: &std::collections::HashSet<ChitchatId>,
    self_id: &ChitchatId,
    incoming: &Digest,
) -> Digest {
    let mut out: Digest = state
        .iter()
        .filter(|(id, _)| !scheduled.contains(*id))
        .map(|(id, d)| (id.clone(), *d))
        .collect();
    for (id, d) in incoming {
        if id == self_id || scheduled.contains(id) {
            continue;
        }
        out.entry(id.clone())
            .and_modify(|e| e.heartbeat = e.heartbeat.max(d.heartbeat))
            .or_insert(NodeDigest {
                heartbeat: d.heartbeat,
                ..NodeDigest::default()
            });
    }
    if let Some(me) = out.get_mut(self_id) {
        me.heartbeat += 1;
    }
    out
}

/// Our own digest as chitchat holds it (every node but those scheduled for deletion), with the
/// ids scheduled for deletion.
pub fn own_digest(c: &chitchat::Chitchat) -> (Digest, std::collections::HashSet<ChitchatId>) {
    let scheduled: std::collections::HashSet<ChitchatId> =
        c.scheduled_for_deletion_nodes().cloned().collect();
    let digest = c
        .node_states()
        .iter()
        .filter(|(id, _)| !scheduled.contains(*id))
        .map(|(id, s)| {
            (
                id.clone(),
                NodeDigest {
                    heartbeat: u64::from(s.heartbeat()),
                    last_gc_version: s.last_gc_version(),
                    max_version: s.max_version(),
                },
            )
        })
        .collect();
    (digest, scheduled)
}

/// The SYN chitchat sends with `digest` (for tests and the simulation).
pub fn encode_syn(digest: &Digest, version: ProtocolVersion, cluster_id: &str) -> Vec<u8> {
    let mut buf = MAGIC.to_le_bytes().to_vec();
    buf.push(version.to_code());
    buf.push(SYN);
    let raw = entries_bytes(digest);
    match version {
        ProtocolVersion::V0 => {
            (digest.len() as u16).serialize(&mut buf);
            buf.extend_from_slice(&raw);
        }
        ProtocolVersion::V1 => {
            for chunk in raw.chunks(BLOCK) {
                let mut out = vec![0u8; chunk.len()];
                match compress_to_buffer(chunk, &mut out[..]) {
                    Ok(n) => {
                        buf.push(1);
                        (n as u16).serialize(&mut buf);
                        buf.extend_from_slice(&out[..n]);
                    }
                    Err(_) => {
                        buf.push(2);
                        (chunk.len() as u16).serialize(&mut buf);
                        buf.extend_from_slice(chunk);
                    }
                }
            }
            buf.push(0);
        }
    }
    cluster_id.serialize(&mut buf);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn sample(n: usize, seed: u64) -> Digest {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                let addr = std::net::SocketAddr::from(([10, 9, (i >> 8) as u8, i as u8], 7946));
                let id = ChitchatId::new(
                    format!("node-{i:05}"),
                    1_700_000_000_000 + rng.gen_range(0..86_400_000),
                    addr,
                );
                let d = NodeDigest {
                    heartbeat: rng.gen_range(0..100_000),
                    last_gc_version: 0,
                    max_version: rng.gen_range(1..64),
                };
                (id, d)
            })
            .collect()
    }

    #[test]
    fn syn_round_trips_and_its_length_is_predicted() {
        for version in [ProtocolVersion::V0, ProtocolVersion::V1] {
            for n in [0, 1, 50, 2_000] {
                let d = sample(n, n as u64);
                let syn = encode_syn(&d, version, "meshsec");
                // header, digest, cluster id (u16-prefixed).
                assert_eq!(syn.len(), 4 + encoded_len(&d, version) + 2 + 7, "{n}");
                let back = parse_syn(&syn).unwrap().unwrap();
                assert_eq!((back.version, back.digest), (version, d));
            }
        }
    }

    #[test]
    fn hostile_syns_are_errors_not_panics() {
        let syn = encode_syn(&sample(300, 1), ProtocolVersion::V1, "meshsec");
        for cut in 5..syn.len() - 1 {
            let _ = parse_syn(&syn[..cut]);
        }
        assert_eq!(
            parse_syn(&syn[..syn.len() - 3]).unwrap_err(),
            DigestError::Malformed
        );
        let mut bad_tag = syn.clone();
        bad_tag[4] = 9;
        assert_eq!(parse_syn(&bad_tag).unwrap_err(), DigestError::Malformed);
        // Not a SYN, or not chitchat: left to chitchat.
        let mut ack = syn.clone();
        ack[3] = 2;
        assert!(parse_syn(&ack).unwrap().is_none());
        assert!(parse_syn(b"xy").unwrap().is_none());
        // A bomb: many blocks that each decompress to 64 KiB of zeros.
        let zeros = zstd::bulk::compress(&[0u8; 65_535], 19).unwrap();
        let mut bomb = syn[..4].to_vec();
        for _ in 0..(60_000 / (zeros.len() + 3)) {
            bomb.push(1);
            (zeros.len() as u16).serialize(&mut bomb);
            bomb.extend_from_slice(&zeros);
        }
        bomb.push(0);
        assert_eq!(parse_syn(&bomb).unwrap_err(), DigestError::Malformed);
    }

    #[test]
    fn merge_follows_report_heartbeats() {
        let me = ChitchatId::new("me", 1, "10.0.0.1:7946".parse().unwrap());
        let known = ChitchatId::new("k", 1, "10.0.0.2:7946".parse().unwrap());
        let gone = ChitchatId::new("g", 1, "10.0.0.3:7946".parse().unwrap());
        let new = ChitchatId::new("n", 1, "10.0.0.4:7946".parse().unwrap());
        let nd = |heartbeat, max_version| NodeDigest {
            heartbeat,
            last_gc_version: 0,
            max_version,
        };
        let state: Digest = [(me.clone(), nd(5, 3)), (known.clone(), nd(7, 2))].into();
        let scheduled = [gone.clone()].into();
        let incoming: Digest = [
            (me.clone(), nd(99, 9)),
            (known.clone(), nd(9, 9)),
            (gone.clone(), nd(9, 9)),
            (new.clone(), nd(4, 9)),
        ]
        .into();
        let m = merged(&state, &scheduled, &me, &incoming);
        let want: Digest = [(me, nd(6, 3)), (known, nd(9, 2)), (new, nd(4, 0))].into();
        assert_eq!(m, want);
    }
}
