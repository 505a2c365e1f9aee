//! The two Noise IKpsk2 messages, as pure functions of explicit inputs (proto/handshake.md §3).
//!
//! The endpoint state machine and the known-answer vectors both go through these functions,
//! so the vectors pin down exactly what the endpoint puts on the wire.

use std::sync::{Arc, LazyLock};

use snow::params::NoiseParams;
use snow::{Builder, HandshakeState};
use zeroize::Zeroizing;

use super::crypto::{mac16, MAC_LEN, NOISE_PARAMS, PROLOGUE};
use super::dh::StaticDh;
use super::wire::{NOISE_INIT_LEN, NOISE_RESP_LEN, PAYLOAD_LEN};

static PARAMS: LazyLock<NoiseParams> = LazyLock::new(|| {
    NOISE_PARAMS
        .parse()
        .expect("static Noise parameter string is valid")
});

/// Output of a completed handshake: the raw Noise split and the handshake hash.
pub struct Split {
    /// First split key: initiator → responder.
    pub k1: Zeroizing<[u8; 32]>,
    /// Second split key: responder → initiator.
    pub k2: Zeroizing<[u8; 32]>,
    /// Final handshake hash h (binds the whole transcript).
    pub hash: [u8; 32],
}

fn split(hs: &mut HandshakeState) -> Split {
    let (k1, k2) = hs.dangerously_get_raw_split();
    let mut hash = [0u8; 32];
    // SHA-256 handshake hashes are exactly 32 bytes.
    hash.copy_from_slice(&hs.get_handshake_hash()[..32]);
    Split {
        k1: Zeroizing::new(k1),
        k2: Zeroizing::new(k2),
        hash,
    }
}

/// Initiator: builds Noise message 1 carrying `payload`.
/// `ephemeral` fixes the ephemeral private key (test vectors only; `None` draws a fresh one).
pub fn initiator_start(
    local: &Arc<StaticDh>,
    peer_public: &[u8; 32],
    psk: &[u8; 32],
    ephemeral: Option<&[u8; 32]>,
    payload: &[u8; PAYLOAD_LEN],
) -> Result<(HandshakeState, [u8; NOISE_INIT_LEN]), snow::Error> {
    let mut b = Builder::with_resolver(PARAMS.clone(), local.resolver())
        .local_private_key(local.private())?
        .remote_public_key(peer_public)?
        .psk(2, psk)?
        .prologue(PROLOGUE)?;
    if let Some(e) = ephemeral {
        b = b.fixed_ephemeral_key_for_testing_only(e);
    }
    let mut hs = b.build_initiator()?;
    let mut msg = [0u8; NOISE_INIT_LEN];
    let n = hs.write_message(payload, &mut msg)?;
    if n != NOISE_INIT_LEN {
        return Err(snow::Error::Input);
    }
    Ok((hs, msg))
}

/// Responder: reads Noise message 1. Returns the state, the initiator's static key and the
/// decrypted payload. This performs the two DH operations (es, ss).
pub fn responder_read(
    local: &Arc<StaticDh>,
    psk: &[u8; 32],
    ephemeral: Option<&[u8; 32]>,
    msg: &[u8; NOISE_INIT_LEN],
) -> Result<(HandshakeState, [u8; 32], [u8; PAYLOAD_LEN]), snow::Error> {
    let mut b = Builder::with_resolver(PARAMS.clone(), local.resolver())
        .local_private_key(local.private())?
        .psk(2, psk)?
        .prologue(PROLOGUE)?;
    if let Some(e) = ephemeral {
        b = b.fixed_ephemeral_key_for_testing_only(e);
    }
    let mut hs = b.build_responder()?;
    let mut buf = [0u8; NOISE_INIT_LEN];
    let n = hs.read_message(msg, &mut buf)?;
    if n != PAYLOAD_LEN {
        return Err(snow::Error::Input);
    }
    let rs: [u8; 32] = hs
        .get_remote_static()
        .and_then(|s| s.try_into().ok())
        .ok_or(snow::Error::Input)?;
    let mut payload = [0u8; PAYLOAD_LEN];
    payload.copy_from_slice(&buf[..PAYLOAD_LEN]);
    Ok((hs, rs, payload))
}

/// Responder: writes Noise message 2 carrying `payload` and completes the handshake.
pub fn responder_finish(
    mut hs: HandshakeState,
    payload: &[u8; PAYLOAD_LEN],
) -> Result<([u8; NOISE_RESP_LEN], Split), snow::Error> {
    let mut msg = [0u8; NOISE_RESP_LEN];
    let n = hs.write_message(payload, &mut msg)?;
    if n != NOISE_RESP_LEN || !hs.is_handshake_finished() {
        return Err(snow::Error::Input);
    }
    Ok((msg, split(&mut hs)))
}

/// Initiator: reads Noise message 2 and completes the handshake. On failure snow rolls its
/// symmetric state back, so a forged response does not spoil the real one that may follow.
pub fn initiator_finish(
    hs: &mut HandshakeState,
    msg: &[u8; NOISE_RESP_LEN],
) -> Result<([u8; PAYLOAD_LEN], Split), snow::Error> {
    let mut buf = [0u8; NOISE_RESP_LEN];
    let n = hs.read_message(msg, &mut buf)?;
    if n != PAYLOAD_LEN || !hs.is_handshake_finished() {
        return Err(snow::Error::Input);
    }
    let mut payload = [0u8; PAYLOAD_LEN];
    payload.copy_from_slice(&buf[..PAYLOAD_LEN]);
    Ok((payload, split(hs)))
}

/// Writes mac1 = HMAC-SHA256(mac1_key, msg[..off])[..16] at `msg[off..off+16]`.
pub fn put_mac(msg: &mut [u8], off: usize, key: &[u8; 32]) -> [u8; MAC_LEN] {
    let m = mac16(key, &[&msg[..off]]);
    msg[off..off + MAC_LEN].copy_from_slice(&m);
    m
}

/// Writes mac2 = HMAC-SHA256(cookie, msg[..off])[..16] at `msg[off..off+16]`.
pub fn put_mac2(msg: &mut [u8], off: usize, cookie: &[u8; MAC_LEN]) {
    let m = mac16(cookie, &[&msg[..off]]);
    msg[off..off + MAC_LEN].copy_from_slice(&m);
}
