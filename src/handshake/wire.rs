//! Wire codec for handshake datagrams (proto/handshake.md §2, §4).
//!
//! Decoding only slices and length-checks; it never allocates and never panics on any input
//! (fuzzed by fuzz/fuzz_targets/handshake_decode.rs). All integers are big-endian.

use super::crypto::{COOKIE_NONCE_LEN, MAC_LEN};
use thiserror::Error;

/// Protocol version carried in byte 0 of every message.
pub const VERSION: u8 = 1;

/// Length of the common header: version, type, two reserved zero bytes.
pub const HEADER_LEN: usize = 4;

/// Noise message 1 of IKpsk2 with a 16-byte payload: e (32) + enc s (48) + enc payload (32).
pub const NOISE_INIT_LEN: usize = 32 + 48 + PAYLOAD_LEN + 16;
/// Noise message 2 of IKpsk2 with a 16-byte payload: e (32) + enc payload (32).
pub const NOISE_RESP_LEN: usize = 32 + PAYLOAD_LEN + 16;
/// Plaintext payload length in both directions.
pub const PAYLOAD_LEN: usize = 16;

/// Total length of an initiation.
pub const INITIATION_LEN: usize = HEADER_LEN + 4 + NOISE_INIT_LEN + 2 * MAC_LEN;
/// Offset of mac1 in an initiation (mac1 covers everything before it).
pub const INITIATION_MAC1_OFF: usize = HEADER_LEN + 4 + NOISE_INIT_LEN;
/// Offset of mac2 in an initiation (mac2 covers everything before it).
pub const INITIATION_MAC2_OFF: usize = INITIATION_MAC1_OFF + MAC_LEN;

/// Total length of a response.
pub const RESPONSE_LEN: usize = HEADER_LEN + 8 + NOISE_RESP_LEN + 2 * MAC_LEN;
/// Offset of mac1 in a response.
pub const RESPONSE_MAC1_OFF: usize = HEADER_LEN + 8 + NOISE_RESP_LEN;
/// Offset of mac2 in a response.
pub const RESPONSE_MAC2_OFF: usize = RESPONSE_MAC1_OFF + MAC_LEN;

/// Total length of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = HEADER_LEN + 4 + COOKIE_NONCE_LEN + MAC_LEN + 16;

/// Message type byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    /// Noise message 1 plus the initiator's sender index.
    Initiation = 1,
    /// Noise message 2 plus both indices.
    Response = 2,
    /// Encrypted cookie sent by a responder under load instead of doing DH work.
    CookieReply = 3,
}

/// Why a datagram could not be decoded. Each maps to an [`super::Counters`] field.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the header, or not exactly the length its type requires.
    #[error("bad length {0}")]
    BadLength(usize),
    /// Version byte is not [`VERSION`].
    #[error("unsupported version {0}")]
    BadVersion(u8),
    /// Unknown type byte or non-zero reserved bytes.
    #[error("unknown message type {0} or non-zero reserved bytes")]
    BadType(u8),
}

/// A decoded initiation (borrowing the datagram).
#[derive(Debug, Clone, Copy)]
pub struct Initiation<'a> {
    /// The initiator's handshake index; echoed in the response and cookie reply.
    pub sender_index: u32,
    /// Noise message 1.
    pub noise: &'a [u8; NOISE_INIT_LEN],
    /// mac1 over bytes [0, INITIATION_MAC1_OFF).
    pub mac1: &'a [u8; MAC_LEN],
    /// mac2 over bytes [0, INITIATION_MAC2_OFF), or zeros.
    pub mac2: &'a [u8; MAC_LEN],
    /// The whole datagram.
    pub bytes: &'a [u8; INITIATION_LEN],
}

/// A decoded response.
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    /// The responder's index (informational in v1).
    pub sender_index: u32,
    /// The initiation's sender index this answers.
    pub receiver_index: u32,
    /// Noise message 2.
    pub noise: &'a [u8; NOISE_RESP_LEN],
    /// mac1 over bytes [0, RESPONSE_MAC1_OFF).
    pub mac1: &'a [u8; MAC_LEN],
    /// Reserved in v1: sent as zeros, ignored.
    pub mac2: &'a [u8; MAC_LEN],
    /// The whole datagram.
    pub bytes: &'a [u8; RESPONSE_LEN],
}

/// A decoded cookie reply.
#[derive(Debug, Clone, Copy)]
pub struct CookieReply<'a> {
    /// The initiation's sender index this answers.
    pub receiver_index: u32,
    /// Random XChaCha20 nonce.
    pub nonce: &'a [u8; COOKIE_NONCE_LEN],
    /// Cookie (16) ‖ Poly1305 tag (16).
    pub sealed: &'a [u8; 32],
}

/// Any decoded handshake message.
#[derive(Debug, Clone, Copy)]
pub enum Message<'a> {
    /// Type 1.
    Initiation(Initiation<'a>),
    /// Type 2.
    Response(Response<'a>),
    /// Type 3.
    CookieReply(CookieReply<'a>),
}

fn arr<const N: usize>(b: &[u8], off: usize) -> &[u8; N] {
    // Callers checked the total length first, so this range is always in bounds.
    b[off..off + N]
        .try_into()
        .expect("length checked by caller")
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(*arr::<4>(b, off))
}

/// Decodes a datagram. Never panics; rejects anything not exactly well-formed.
pub fn decode(buf: &[u8]) -> Result<Message<'_>, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Err(DecodeError::BadLength(buf.len()));
    }
    if buf[0] != VERSION {
        return Err(DecodeError::BadVersion(buf[0]));
    }
    if buf[2] != 0 || buf[3] != 0 {
        return Err(DecodeError::BadType(buf[1]));
    }
    let want = match buf[1] {
        1 => INITIATION_LEN,
        2 => RESPONSE_LEN,
        3 => COOKIE_REPLY_LEN,
        t => return Err(DecodeError::BadType(t)),
    };
    if buf.len() != want {
        return Err(DecodeError::BadLength(buf.len()));
    }
    Ok(match buf[1] {
        1 => Message::Initiation(Initiation {
            sender_index: u32_at(buf, 4),
            noise: arr(buf, 8),
            mac1: arr(buf, INITIATION_MAC1_OFF),
            mac2: arr(buf, INITIATION_MAC2_OFF),
            bytes: arr(buf, 0),
        }),
        2 => Message::Response(Response {
            sender_index: u32_at(buf, 4),
            receiver_index: u32_at(buf, 8),
            noise: arr(buf, 12),
            mac1: arr(buf, RESPONSE_MAC1_OFF),
            mac2: arr(buf, RESPONSE_MAC2_OFF),
            bytes: arr(buf, 0),
        }),
        _ => Message::CookieReply(CookieReply {
            receiver_index: u32_at(buf, 4),
            nonce: arr(buf, 8),
            sealed: arr(buf, 8 + COOKIE_NONCE_LEN),
        }),
    })
}

fn header(t: MessageType) -> [u8; HEADER_LEN] {
    [VERSION, t as u8, 0, 0]
}

/// Assembles an initiation with mac1 and mac2 left zero (see [`super::noise`] for filling them).
pub fn encode_initiation(sender_index: u32, noise: &[u8; NOISE_INIT_LEN]) -> [u8; INITIATION_LEN] {
    let mut b = [0u8; INITIATION_LEN];
    b[..HEADER_LEN].copy_from_slice(&header(MessageType::Initiation));
    b[4..8].copy_from_slice(&sender_index.to_be_bytes());
    b[8..8 + NOISE_INIT_LEN].copy_from_slice(noise);
    b
}

/// Assembles a response with mac1 and mac2 left zero.
pub fn encode_response(
    sender_index: u32,
    receiver_index: u32,
    noise: &[u8; NOISE_RESP_LEN],
) -> [u8; RESPONSE_LEN] {
    let mut b = [0u8; RESPONSE_LEN];
    b[..HEADER_LEN].copy_from_slice(&header(MessageType::Response));
    b[4..8].copy_from_slice(&sender_index.to_be_bytes());
    b[8..12].copy_from_slice(&receiver_index.to_be_bytes());
    b[12..12 + NOISE_RESP_LEN].copy_from_slice(noise);
    b
}

/// Assembles a cookie reply.
pub fn encode_cookie_reply(
    receiver_index: u32,
    nonce: &[u8; COOKIE_NONCE_LEN],
    sealed: &[u8; 32],
) -> [u8; COOKIE_REPLY_LEN] {
    let mut b = [0u8; COOKIE_REPLY_LEN];
    b[..HEADER_LEN].copy_from_slice(&header(MessageType::CookieReply));
    b[4..8].copy_from_slice(&receiver_index.to_be_bytes());
    b[8..8 + COOKIE_NONCE_LEN].copy_from_slice(nonce);
    b[8 + COOKIE_NONCE_LEN..].copy_from_slice(sealed);
    b
}

/// Initiator's encrypted payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitPayload {
    /// Nanoseconds since the Unix epoch, strictly increasing per initiator (replay defence).
    pub timestamp: u64,
    /// The initiator's inbound SPI.
    pub spi: u32,
    /// ESP algorithm wire id.
    pub alg: u8,
}

/// Responder's encrypted payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RespPayload {
    /// The responder's inbound SPI.
    pub spi: u32,
    /// ESP algorithm wire id (must equal the initiation's).
    pub alg: u8,
    /// The responder's current timestamp, from the same strictly increasing clock as its own
    /// initiations: the initiator raises its replay floor for the responder to it, so every
    /// initiation the responder made before (an abandoned one in a collision, or one captured
    /// and held back by an attacker) is rejected if it arrives later.
    pub timestamp: u64,
}

/// Payload decode failure (reserved bytes non-zero or wrong length).
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("malformed handshake payload")]
pub struct BadPayload;

impl InitPayload {
    /// timestamp (8) ‖ spi (4) ‖ alg (1) ‖ reserved zero (3).
    pub fn encode(&self) -> [u8; PAYLOAD_LEN] {
        let mut b = [0u8; PAYLOAD_LEN];
        b[0..8].copy_from_slice(&self.timestamp.to_be_bytes());
        b[8..12].copy_from_slice(&self.spi.to_be_bytes());
        b[12] = self.alg;
        b
    }

    /// Inverse of [`Self::encode`].
    pub fn decode(b: &[u8]) -> Result<Self, BadPayload> {
        if b.len() != PAYLOAD_LEN || b[13..16] != [0, 0, 0] {
            return Err(BadPayload);
        }
        Ok(InitPayload {
            timestamp: u64::from_be_bytes(*arr::<8>(b, 0)),
            spi: u32_at(b, 8),
            alg: b[12],
        })
    }
}

impl RespPayload {
    /// spi (4) ‖ alg (1) ‖ reserved zero (3) ‖ timestamp (8).
    pub fn encode(&self) -> [u8; PAYLOAD_LEN] {
        let mut b = [0u8; PAYLOAD_LEN];
        b[0..4].copy_from_slice(&self.spi.to_be_bytes());
        b[4] = self.alg;
        b[8..16].copy_from_slice(&self.timestamp.to_be_bytes());
        b
    }

    /// Inverse of [`Self::encode`].
    pub fn decode(b: &[u8]) -> Result<Self, BadPayload> {
        if b.len() != PAYLOAD_LEN || b[5..8] != [0, 0, 0] {
            return Err(BadPayload);
        }
        Ok(RespPayload {
            spi: u32_at(b, 0),
            alg: b[4],
            timestamp: u64::from_be_bytes(*arr::<8>(b, 8)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths() {
        assert_eq!(INITIATION_LEN, 152);
        assert_eq!(RESPONSE_LEN, 108);
        assert_eq!(COOKIE_REPLY_LEN, 64);
    }

    #[test]
    fn every_truncation_and_extension_rejected() {
        let init = encode_initiation(5, &[0xab; NOISE_INIT_LEN]);
        assert!(matches!(decode(&init), Ok(Message::Initiation(i)) if i.sender_index == 5));
        for n in 0..init.len() {
            assert!(decode(&init[..n]).is_err(), "truncated to {n}");
        }
        let mut long = init.to_vec();
        long.push(0);
        assert_eq!(decode(&long).unwrap_err(), DecodeError::BadLength(153));
        let mut v = init;
        v[0] = 2;
        assert_eq!(decode(&v).unwrap_err(), DecodeError::BadVersion(2));
        let mut t = init;
        t[1] = 9;
        assert_eq!(decode(&t).unwrap_err(), DecodeError::BadType(9));
        let mut r = init;
        r[3] = 1;
        assert!(matches!(decode(&r), Err(DecodeError::BadType(1))));
    }

    #[test]
    fn response_and_cookie_roundtrip() {
        let resp = encode_response(7, 9, &[1; NOISE_RESP_LEN]);
        match decode(&resp).unwrap() {
            Message::Response(r) => {
                assert_eq!((r.sender_index, r.receiver_index), (7, 9));
                assert_eq!(r.noise, &[1; NOISE_RESP_LEN]);
            }
            m => panic!("wrong message {m:?}"),
        }
        let c = encode_cookie_reply(3, &[4; 24], &[5; 32]);
        match decode(&c).unwrap() {
            Message::CookieReply(c) => {
                assert_eq!(c.receiver_index, 3);
                assert_eq!(c.nonce, &[4; 24]);
                assert_eq!(c.sealed, &[5; 32]);
            }
            m => panic!("wrong message {m:?}"),
        }
    }

    #[test]
    fn payload_roundtrip_and_reserved() {
        let p = InitPayload {
            timestamp: 0x0102030405060708,
            spi: 0xdeadbeef,
            alg: 1,
        };
        assert_eq!(InitPayload::decode(&p.encode()), Ok(p));
        let mut b = p.encode();
        b[15] = 1;
        assert_eq!(InitPayload::decode(&b), Err(BadPayload));
        let r = RespPayload {
            spi: 300,
            alg: 3,
            timestamp: 42,
        };
        assert_eq!(RespPayload::decode(&r.encode()), Ok(r));
        let mut b = r.encode();
        b[6] = 1;
        assert_eq!(RespPayload::decode(&b), Err(BadPayload));
        assert_eq!(RespPayload::decode(&b[..15]), Err(BadPayload));
    }
}
