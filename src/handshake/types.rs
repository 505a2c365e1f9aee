//! The handshake's public vocabulary: configuration, sessions, events, errors, counters and
//! the context the driver supplies.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::crypto::{Aead, EspKey};
#[cfg(doc)]
use super::Endpoint;

/// A member's X25519 static public key.
pub type PublicKey = [u8; 32];

/// Smallest SPI we accept or hand out: 1–255 are reserved by IANA, 0 means "none".
pub const MIN_SPI: u32 = 256;

/// How long an initiator keeps using a cookie after receiving it. The responder rotates its
/// cookie secret every [`COOKIE_SECRET_LIFETIME`] and accepts the current and previous one.
pub const COOKIE_LIFETIME: Duration = Duration::from_secs(118);
/// Rotation period of the responder's cookie secret.
pub const COOKIE_SECRET_LIFETIME: Duration = Duration::from_secs(120);

/// Tunables. [`Config::default`] is what production uses; tests shrink the rates.
#[derive(Debug, Clone)]
pub struct Config {
    /// ESP algorithm, cluster-wide. A responder rejects initiations proposing another.
    pub algorithm: Aead,
    /// First retransmission timeout of an initiation.
    pub initial_rto: Duration,
    /// Cap of the doubling retransmission timeout.
    pub max_rto: Duration,
    /// Random extra delay added to each retransmission timer, at most this much (desynchronises
    /// peers that started together).
    pub max_jitter: Duration,
    /// An initiation not answered within this time fails with [`FailReason::Timeout`].
    pub handshake_timeout: Duration,
    /// How long a responder answers exact retransmissions of an accepted initiation from its
    /// cache (no DH, no new SPI, no new session).
    pub response_cache_ttl: Duration,
    /// Global budget of DH-bearing initiations per second before the responder is "under load".
    pub load_rate: u32,
    /// Burst size of that budget.
    pub load_burst: u32,
    /// Once the budget is exhausted, stay under load at least this long.
    pub under_load_hold: Duration,
    /// Under load: global budget of DH-bearing initiations per second from cookie-proven
    /// sources, shared fairly among source prefixes (proto/handshake.md §8).
    pub proven_rate: u32,
    /// Burst of that budget.
    pub proven_burst: u32,
    /// Under load: at most this many initiations per second from one cookie-proven source
    /// prefix (an IPv4 address, an IPv6 /64), less when many prefixes share `proven_rate`.
    pub per_source_rate: u32,
    /// Under load: burst per source prefix.
    pub per_source_burst: u32,
    /// Bound on the number of tracked source prefixes (and of tracked static keys).
    pub max_sources: usize,
    /// Under load: initiations per second from one member's static key that may go on past
    /// the replay check to the response, the SPI and the SA (proto/handshake.md §8).
    pub per_peer_rate: u32,
    /// Under load: burst per static key.
    pub per_peer_burst: u32,
    /// Global cap on cookie replies per second (they go to unproven addresses).
    pub cookie_reply_rate: u32,
    /// Burst of cookie replies.
    pub cookie_reply_burst: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            algorithm: Aead::Aes128Gcm,
            initial_rto: Duration::from_secs(1),
            max_rto: Duration::from_secs(8),
            max_jitter: Duration::from_millis(200),
            handshake_timeout: Duration::from_secs(20),
            response_cache_ttl: Duration::from_secs(20),
            load_rate: 1000,
            load_burst: 200,
            under_load_hold: Duration::from_secs(1),
            proven_rate: 1000,
            proven_burst: 200,
            per_source_rate: 20,
            per_source_burst: 10,
            max_sources: 4096,
            per_peer_rate: 2,
            per_peer_burst: 5,
            cookie_reply_rate: 2000,
            cookie_reply_burst: 200,
        }
    }
}

/// Which side of the Noise handshake we were.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We sent the initiation.
    Initiator,
    /// We answered an initiation.
    Responder,
}

/// A completed handshake: everything the datapath needs for one SA pair.
#[derive(Debug, Clone)]
pub struct Session {
    /// The peer's static public key.
    pub peer: PublicKey,
    /// Where the peer's handshake datagram came from.
    pub peer_addr: SocketAddr,
    /// Our side in the handshake.
    pub role: Role,
    /// Identical on both sides: the first 8 bytes (big-endian) of the Noise handshake hash.
    pub session_id: u64,
    /// Our inbound SPI (the kernel SA for peer → us).
    pub local_spi: u32,
    /// The peer's inbound SPI = our outbound SPI.
    pub peer_spi: u32,
    /// ESP algorithm.
    pub algorithm: Aead,
    /// Key material for our outbound SA (us → peer).
    pub key_out: EspKey,
    /// Key material for our inbound SA (peer → us).
    pub key_in: EspKey,
    /// The initiator's timestamp (ns since the Unix epoch): orders sessions of one pair.
    pub initiator_timestamp: u64,
    /// When the handshake started locally (initiation sent or received).
    pub started_at: Instant,
    /// When it completed locally.
    pub established_at: Instant,
}

/// Why an initiation we started ended without a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// No valid response within [`Config::handshake_timeout`].
    Timeout,
    /// The peer's authenticated response carried a malformed payload, a reserved SPI or
    /// another ESP algorithm (a misconfigured or incompatible member).
    BadResponse,
}

/// Something the driver must act on.
#[derive(Debug, Clone)]
pub enum Event {
    /// A session completed: install its SAs.
    Established(Session),
    /// An initiation failed. `local_spi` was the SPI the caller allocated for it; free it.
    Failed {
        /// The peer.
        peer: PublicKey,
        /// The inbound SPI handed to [`Endpoint::initiate`].
        local_spi: u32,
        /// Why.
        reason: FailReason,
    },
}

/// Error from the caller's SPI allocator.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("SPI allocation failed: {0}")]
pub struct SpiAllocError(pub String);

/// What the endpoint needs from its surroundings while handling a datagram.
///
/// Both methods are called synchronously from [`Endpoint::handle`], only for an initiation
/// that passed mac1 (and mac2 under load) and decrypted correctly, so their cost is bounded by
/// the rate limits. A driver whose SPI allocation is asynchronous (XFRM_MSG_ALLOCSPI over
/// netlink) can keep a small pool of pre-allocated SPIs and refill it afterwards.
pub trait HandshakeContext {
    /// Whether `peer` is a known, current member. Initiations from anyone else get no reply.
    fn is_member(&self, peer: &PublicKey) -> bool;
    /// Allocates our inbound SPI for a session with `peer` (≥ [`MIN_SPI`]); called only when
    /// we respond. If the endpoint abandons its own initiation to `peer` in a collision, it
    /// reuses that initiation's SPI and does not call this.
    fn alloc_spi(&mut self, peer: &PublicKey) -> Result<u32, SpiAllocError>;
    /// Called by the responder once a session's keys exist and before its response is
    /// queued: the initiator switches to the new SAs as soon as the response arrives, so the
    /// session's inbound SA must already be in place. An error drops the response and the
    /// session ([`Rejected::InstallFailed`]); freeing the SPI is then the context's job.
    /// Contexts that install nothing (tests, benchmarks) keep the default.
    fn install_inbound(&mut self, session: &Session) -> Result<(), SpiAllocError> {
        let _ = session;
        Ok(())
    }
}

/// Error from [`Endpoint::new`] / [`Endpoint::set_keyring`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The cluster secret keyring must hold at least one secret.
    #[error("cluster secret keyring is empty")]
    EmptyKeyring,
}

/// Error from [`Endpoint::initiate`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum InitiateError {
    /// An initiation to this peer is already outstanding.
    #[error("a handshake with this peer is already in progress")]
    InProgress,
    /// Handshaking with our own key makes no sense.
    #[error("refusing to handshake with our own static key")]
    SelfPeer,
    /// SPIs below 256 are reserved.
    #[error("SPI {0} is reserved (must be >= 256)")]
    ReservedSpi(u32),
    /// snow refused to build the message (should not happen with valid keys).
    #[error("noise: {0}")]
    Noise(String),
}

/// Why a datagram produced no progress. Every variant increments one [`Counters`] field.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Wrong length for its type, or shorter than a header.
    #[error("bad length")]
    BadLength,
    /// Unknown version byte.
    #[error("bad version")]
    BadVersion,
    /// Unknown type or non-zero reserved header bytes.
    #[error("bad type")]
    BadType,
    /// mac1 did not verify with any keyring secret.
    #[error("bad mac1")]
    BadMac,
    /// Under load without a valid mac2: a cookie reply was sent instead of doing DH work.
    #[error("under load: cookie reply sent")]
    CookieSent,
    /// Rate limit (under load: the source prefix's share or the global proven-source budget;
    /// or the global cookie-reply cap).
    #[error("rate limited")]
    RateLimited,
    /// Under load: the initiator's static key is over its own rate (checked after the DH work
    /// of reading the initiation, before the response's).
    #[error("peer rate limited")]
    PeerRateLimited,
    /// Noise decryption failed (wrong PSK, corrupted, or forged).
    #[error("decryption failed")]
    DecryptFailed,
    /// Decrypted payload malformed (reserved bytes, reserved SPI).
    #[error("bad payload")]
    BadPayload,
    /// Initiator is not a known, current member (or is ourselves).
    #[error("unknown peer")]
    UnknownPeer,
    /// Initiation timestamp not newer than the last accepted one from that peer.
    #[error("replayed or stale initiation")]
    Replayed,
    /// Response or cookie reply for no outstanding initiation.
    #[error("stale response")]
    StaleResponse,
    /// Initiation proposed an ESP algorithm other than ours.
    #[error("algorithm mismatch")]
    AlgMismatch,
    /// Simultaneous initiation and we are the designated initiator: their initiation dropped.
    #[error("collision: we are the initiator")]
    CollisionDropped,
    /// The caller could not allocate an SPI.
    #[error("SPI allocation failed")]
    SpiAllocFailed,
    /// The caller could not install the new session's inbound SA: no response was sent.
    #[error("inbound SA install failed")]
    InstallFailed,
    /// Cookie reply did not authenticate.
    #[error("bad cookie reply")]
    BadCookie,
}

/// Counters of everything that happened, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Datagrams passed to `handle`.
    pub received: u64,
    /// Datagrams queued for sending.
    pub sent: u64,
    /// See [`Rejected::BadLength`].
    pub bad_len: u64,
    /// See [`Rejected::BadVersion`].
    pub bad_version: u64,
    /// See [`Rejected::BadType`].
    pub bad_type: u64,
    /// See [`Rejected::BadMac`].
    pub bad_mac: u64,
    /// See [`Rejected::DecryptFailed`].
    pub decrypt_failed: u64,
    /// See [`Rejected::BadPayload`].
    pub bad_payload: u64,
    /// See [`Rejected::UnknownPeer`].
    pub unknown_peer: u64,
    /// See [`Rejected::Replayed`].
    pub replayed: u64,
    /// See [`Rejected::StaleResponse`].
    pub stale_response: u64,
    /// See [`Rejected::AlgMismatch`].
    pub alg_mismatch: u64,
    /// See [`Rejected::RateLimited`].
    pub rate_limited: u64,
    /// See [`Rejected::PeerRateLimited`].
    #[serde(default)]
    pub peer_rate_limited: u64,
    /// See [`Rejected::CookieSent`].
    pub cookie_sent: u64,
    /// Valid cookie replies received.
    pub cookie_received: u64,
    /// See [`Rejected::BadCookie`].
    pub bad_cookie: u64,
    /// See [`Rejected::CollisionDropped`].
    pub collision_dropped: u64,
    /// Own initiations abandoned because the peer's won the collision.
    pub collision_abandoned: u64,
    /// See [`Rejected::SpiAllocFailed`].
    pub spi_alloc_failed: u64,
    /// See [`Rejected::InstallFailed`].
    #[serde(default)]
    pub install_failed: u64,
    /// Exact retransmissions answered from the response cache.
    pub retransmit_answered: u64,
    /// Initiations retransmitted by us (on the backoff timer, or at once after a collision
    /// showed the peer now knows us).
    pub retransmits: u64,
    /// Messages on which DH work was spent (the resource the DoS defence protects).
    pub dh_work: u64,
    /// Sessions established (both roles).
    pub established: u64,
    /// Initiations that timed out.
    pub timeouts: u64,
}

impl Counters {
    /// Adds `other` field by field (e.g. to sum the endpoints of several address families).
    pub fn add(&mut self, other: &Counters) {
        // Destructured so that a new field cannot be forgotten here.
        let Counters {
            received,
            sent,
            bad_len,
            bad_version,
            bad_type,
            bad_mac,
            decrypt_failed,
            bad_payload,
            unknown_peer,
            replayed,
            stale_response,
            alg_mismatch,
            rate_limited,
            peer_rate_limited,
            cookie_sent,
            cookie_received,
            bad_cookie,
            collision_dropped,
            collision_abandoned,
            spi_alloc_failed,
            install_failed,
            retransmit_answered,
            retransmits,
            dh_work,
            established,
            timeouts,
        } = other;
        for (field, n) in [
            (&mut self.received, received),
            (&mut self.sent, sent),
            (&mut self.bad_len, bad_len),
            (&mut self.bad_version, bad_version),
            (&mut self.bad_type, bad_type),
            (&mut self.bad_mac, bad_mac),
            (&mut self.decrypt_failed, decrypt_failed),
            (&mut self.bad_payload, bad_payload),
            (&mut self.unknown_peer, unknown_peer),
            (&mut self.replayed, replayed),
            (&mut self.stale_response, stale_response),
            (&mut self.alg_mismatch, alg_mismatch),
            (&mut self.rate_limited, rate_limited),
            (&mut self.peer_rate_limited, peer_rate_limited),
            (&mut self.cookie_sent, cookie_sent),
            (&mut self.cookie_received, cookie_received),
            (&mut self.bad_cookie, bad_cookie),
            (&mut self.collision_dropped, collision_dropped),
            (&mut self.collision_abandoned, collision_abandoned),
            (&mut self.spi_alloc_failed, spi_alloc_failed),
            (&mut self.install_failed, install_failed),
            (&mut self.retransmit_answered, retransmit_answered),
            (&mut self.retransmits, retransmits),
            (&mut self.dh_work, dh_work),
            (&mut self.established, established),
            (&mut self.timeouts, timeouts),
        ] {
            *field += n;
        }
    }

    /// Counts one rejected datagram in its field.
    pub(super) fn reject(&mut self, e: Rejected) {
        let f = match e {
            Rejected::BadLength => &mut self.bad_len,
            Rejected::BadVersion => &mut self.bad_version,
            Rejected::BadType => &mut self.bad_type,
            Rejected::BadMac => &mut self.bad_mac,
            Rejected::CookieSent => &mut self.cookie_sent,
            Rejected::RateLimited => &mut self.rate_limited,
            Rejected::PeerRateLimited => &mut self.peer_rate_limited,
            Rejected::DecryptFailed => &mut self.decrypt_failed,
            Rejected::BadPayload => &mut self.bad_payload,
            Rejected::UnknownPeer => &mut self.unknown_peer,
            Rejected::Replayed => &mut self.replayed,
            Rejected::StaleResponse => &mut self.stale_response,
            Rejected::AlgMismatch => &mut self.alg_mismatch,
            Rejected::CollisionDropped => &mut self.collision_dropped,
            Rejected::SpiAllocFailed => &mut self.spi_alloc_failed,
            Rejected::InstallFailed => &mut self.install_failed,
            Rejected::BadCookie => &mut self.bad_cookie,
        };
        *f += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_sums_every_field() {
        let mut sum = Counters {
            received: 1,
            sent: 2,
            bad_len: 3,
            bad_version: 4,
            bad_type: 5,
            bad_mac: 6,
            decrypt_failed: 7,
            bad_payload: 8,
            unknown_peer: 9,
            replayed: 10,
            stale_response: 11,
            alg_mismatch: 12,
            rate_limited: 13,
            peer_rate_limited: 26,
            cookie_sent: 14,
            cookie_received: 15,
            bad_cookie: 16,
            collision_dropped: 17,
            collision_abandoned: 18,
            spi_alloc_failed: 19,
            install_failed: 25,
            retransmit_answered: 20,
            retransmits: 21,
            dh_work: 22,
            established: 23,
            timeouts: 24,
        };
        let before = serde_json::to_value(&sum).unwrap();
        sum.add(&sum.clone());
        sum.add(&Counters::default());
        let after = serde_json::to_value(&sum).unwrap();
        let fields = before.as_object().unwrap();
        assert_eq!(fields.len(), 26);
        for (name, v) in fields {
            let v = v.as_u64().unwrap();
            assert!(v > 0, "{name}");
            assert_eq!(after[name].as_u64(), Some(2 * v), "{name}");
        }
    }
}
