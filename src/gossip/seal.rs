//! Sealing of gossip datagrams: every datagram on the wire is an AEAD box under a key
//! derived from a cluster secret, and nothing reaches chitchat's parser unless it opens.
//!
//! Wire format (version 1), all integers big-endian:
//!
//! ```text
//! +---------+-----------+------------------+--------------------------------------------+
//! | version | key id    | nonce            | XChaCha20-Poly1305( sent_at_ms | payload ) |
//! | 1 byte  | 4 bytes   | 24 bytes         | 8 + n bytes of ciphertext, 16 bytes of tag  |
//! +---------+-----------+------------------+--------------------------------------------+
//!  \________ header, authenticated as associated data ________/
//! ```
//!
//! - The gossip key is `HKDF-SHA256(ikm = secret, salt = none, info = "meshsec v1 gossip seal")`;
//!   the key id is the first 4 bytes of `HKDF-SHA256(secret, info = "meshsec v1 gossip key id")`.
//!   The id lets the opener pick the key without trial decryption, and because it comes from its
//!   own HKDF label it says nothing about the encryption key.
//! - The nonce is 24 random bytes: XChaCha20's nonce is large enough that random nonces never
//!   collide in practice, so senders keep no nonce state across restarts.
//! - `sent_at_ms` (the sender's Unix clock, milliseconds) sits inside the ciphertext, so it is
//!   authenticated; the opener rejects boxes outside its freshness window and remembers the nonces
//!   it accepted within the window, so a captured datagram opens at most once per receiver.
//! - The replay cache is bounded, and no flood can make it refuse honest traffic stamped now:
//!   nonces stamped at or before our clock are forgotten oldest-timestamp first behind a floor
//!   that therefore never passes our clock; nonces stamped ahead of it are never forgotten but
//!   get a smaller share that shrinks with how far ahead they are (see [`Opener`]).
//!
//! The opener is sans-IO: it takes `now` as a parameter and never reads a clock.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use rand::RngCore;
use sha2::Sha256;

/// Length of a cluster secret in bytes.
pub const SECRET_LEN: usize = 32;
/// Version byte of a sealed datagram carrying one whole chitchat datagram.
pub const VERSION: u8 = 1;
/// Version byte of a sealed datagram carrying one piece of a chitchat datagram too large for
/// one bounded datagram (see [`super::pieces`]); same layout and keys as [`VERSION`], and the
/// version byte is authenticated, so a box of one kind never opens as the other.
pub const PIECE_VERSION: u8 = 2;
/// Length of the key id hint.
pub const KEY_ID_LEN: usize = 4;
/// Length of the XChaCha20 nonce.
pub const NONCE_LEN: usize = 24;
/// Length of the sealed sender timestamp.
pub const TIMESTAMP_LEN: usize = 8;
/// Length of the Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Length of the cleartext header (version, key id, nonce).
pub const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;
/// Bytes a sealed datagram carries on top of its payload.
pub const OVERHEAD: usize = HEADER_LEN + TIMESTAMP_LEN + TAG_LEN;

const SEAL_KEY_LABEL: &[u8] = b"meshsec v1 gossip seal";
const KEY_ID_LABEL: &[u8] = b"meshsec v1 gossip key id";

/// Why a datagram was refused. Every variant is something a network peer can cause, so it is a
/// value to count and log, never a reason to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum OpenError {
    /// Shorter than the fixed overhead of a sealed datagram.
    #[error("datagram too short to be sealed")]
    TooShort,
    /// First byte is not a version this code speaks.
    #[error("unsupported seal version")]
    BadVersion,
    /// The key id names no key in the keyring (another cluster, or garbage).
    #[error("sealed under a key not in the keyring")]
    UnknownKey,
    /// The key id matched but authentication failed (tampered, or forged id).
    #[error("authentication tag does not verify")]
    BadTag,
    /// Authentic, but sent outside the freshness window (old replay, or clocks too far apart).
    #[error("timestamp outside the freshness window")]
    Stale,
    /// Authentic and fresh, but this exact datagram was already accepted.
    #[error("datagram already seen")]
    Replayed,
    /// Authentic, but stamped ahead of our clock while the replay cache's share for datagrams
    /// that far ahead is full (a flood of future-stamped datagrams, or a clock far ahead).
    #[error("no room left for datagrams stamped this far ahead")]
    FutureFull,
}

impl OpenError {
    /// Every variant, in a stable order (used to lay out counters).
    pub const ALL: [OpenError; 7] = [
        OpenError::TooShort,
        OpenError::BadVersion,
        OpenError::UnknownKey,
        OpenError::BadTag,
        OpenError::Stale,
        OpenError::Replayed,
        OpenError::FutureFull,
    ];

    /// A short stable name, for counters and structured logs.
    pub fn as_str(self) -> &'static str {
        match self {
            OpenError::TooShort => "too_short",
            OpenError::BadVersion => "bad_version",
            OpenError::UnknownKey => "unknown_key",
            OpenError::BadTag => "bad_tag",
            OpenError::Stale => "stale",
            OpenError::Replayed => "replayed",
            OpenError::FutureFull => "future_full",
        }
    }
}

/// Errors building a keyring.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// A keyring needs at least one secret to seal with.
    #[error("the keyring needs at least one cluster secret")]
    Empty,
}

/// The 4-byte hint naming which key sealed a datagram.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

struct GossipKey {
    id: KeyId,
    aead: XChaCha20Poly1305,
}

impl GossipKey {
    fn derive(secret: &[u8; SECRET_LEN]) -> Self {
        let hk = Hkdf::<Sha256>::new(None, secret);
        let mut key = [0u8; 32];
        let mut id = [0u8; KEY_ID_LEN];
        // Both lengths are far below HKDF-SHA256's 255*32-byte output limit, so expand cannot fail.
        hk.expand(SEAL_KEY_LABEL, &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        hk.expand(KEY_ID_LABEL, &mut id)
            .expect("4 bytes is a valid HKDF-SHA256 output length");
        let aead = XChaCha20Poly1305::new((&key).into());
        key.fill(0);
        GossipKey {
            id: KeyId(id),
            aead,
        }
    }
}

/// Gossip keys derived from one or more cluster secrets. The first secret seals; every secret
/// opens, so a new secret can be rolled out (added second, then moved first, then the old one
/// removed) without a flag day. [`Keyring::replace`] swaps the secrets of a
/// live keyring (`meshsec reload`): datagrams sealed or opened after it use
/// the new ones.
pub struct Keyring {
    keys: std::sync::RwLock<Arc<Vec<GossipKey>>>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Key material stays out of logs; the ids are enough to tell keyrings apart.
        f.debug_struct("Keyring")
            .field("key_ids", &self.key_ids())
            .finish()
    }
}

impl Keyring {
    /// Derives a keyring from cluster secrets; the first one seals.
    pub fn new<I>(secrets: I) -> Result<Self, KeyringError>
    where
        I: IntoIterator,
        I::Item: std::borrow::Borrow<[u8; SECRET_LEN]>,
    {
        Ok(Keyring {
            keys: std::sync::RwLock::new(Arc::new(Self::derive(secrets)?)),
        })
    }

    fn derive<I>(secrets: I) -> Result<Vec<GossipKey>, KeyringError>
    where
        I: IntoIterator,
        I::Item: std::borrow::Borrow<[u8; SECRET_LEN]>,
    {
        let keys: Vec<GossipKey> = secrets
            .into_iter()
            .map(|s| GossipKey::derive(std::borrow::Borrow::borrow(&s)))
            .collect();
        if keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        Ok(keys)
    }

    /// Replaces the secrets (the first seals). An empty list changes nothing.
    pub fn replace<I>(&self, secrets: I) -> Result<(), KeyringError>
    where
        I: IntoIterator,
        I::Item: std::borrow::Borrow<[u8; SECRET_LEN]>,
    {
        let keys = Arc::new(Self::derive(secrets)?);
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        Ok(())
    }

    /// The current keys; a snapshot, so a concurrent replace never tears a seal or an open.
    fn keys(&self) -> Arc<Vec<GossipKey>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Ids of the keys, sealing key first (for `status` output; not secret).
    pub fn key_ids(&self) -> Vec<KeyId> {
        self.keys().iter().map(|k| k.id).collect()
    }

    /// Id of the key that seals.
    pub fn sealing_key_id(&self) -> KeyId {
        self.keys()[0].id
    }

    /// Seals `payload` under the first key, stamped with the sender clock `now_unix_ms`.
    pub fn seal(&self, now_unix_ms: u64, payload: &[u8]) -> Vec<u8> {
        self.seal_kind(VERSION, now_unix_ms, payload)
    }

    /// Seals `payload` under the first key with version byte `version` ([`VERSION`] or
    /// [`PIECE_VERSION`]).
    pub(crate) fn seal_kind(&self, version: u8, now_unix_ms: u64, payload: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        self.seal_versioned(version, now_unix_ms, nonce, payload)
    }

    #[cfg(test)]
    fn seal_with_nonce(&self, now_unix_ms: u64, nonce: [u8; NONCE_LEN], payload: &[u8]) -> Vec<u8> {
        self.seal_versioned(VERSION, now_unix_ms, nonce, payload)
    }

    pub(crate) fn seal_versioned(
        &self,
        version: u8,
        now_unix_ms: u64,
        nonce: [u8; NONCE_LEN],
        payload: &[u8],
    ) -> Vec<u8> {
        let keys = self.keys();
        let key = &keys[0];
        let mut out = Vec::with_capacity(OVERHEAD + payload.len());
        out.push(version);
        out.extend_from_slice(&key.id.0);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&now_unix_ms.to_be_bytes());
        out.extend_from_slice(payload);
        let (header, body) = out.split_at_mut(HEADER_LEN);
        // XChaCha20-Poly1305 only fails for messages beyond ~256 GiB.
        let tag = key
            .aead
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), header, body)
            .expect("gossip payloads are far below the AEAD length limit");
        out.extend_from_slice(&tag);
        out
    }

    /// Authenticates and decrypts a datagram without any freshness check; `pieces` says
    /// whether [`PIECE_VERSION`] boxes are accepted.
    fn open_authentic(&self, datagram: &[u8], pieces: bool) -> Result<Authentic, OpenError> {
        if datagram.len() < OVERHEAD {
            return Err(OpenError::TooShort);
        }
        let (header, rest) = datagram.split_at(HEADER_LEN);
        let piece = match header[0] {
            VERSION => false,
            PIECE_VERSION if pieces => true,
            _ => return Err(OpenError::BadVersion),
        };
        let id = &header[1..1 + KEY_ID_LEN];
        let nonce_bytes = &header[1 + KEY_ID_LEN..];
        let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
        let nonce = XNonce::from_slice(nonce_bytes);
        let tag = Tag::from_slice(tag);
        // Ids are 32-bit, so two keys of one keyring may share an id; try each that matches.
        let mut matched = false;
        let keys = self.keys();
        for key in keys.iter().filter(|k| k.id.0 == id) {
            matched = true;
            let mut plain = body.to_vec();
            if key
                .aead
                .decrypt_in_place_detached(nonce, header, &mut plain, tag)
                .is_ok()
            {
                let mut ts = [0u8; TIMESTAMP_LEN];
                ts.copy_from_slice(&plain[..TIMESTAMP_LEN]);
                plain.drain(..TIMESTAMP_LEN);
                let mut n = [0u8; NONCE_LEN];
                n.copy_from_slice(nonce_bytes);
                return Ok(Authentic {
                    sent_at_ms: u64::from_be_bytes(ts),
                    nonce: n,
                    piece,
                    payload: plain,
                });
            }
        }
        Err(if matched {
            OpenError::BadTag
        } else {
            OpenError::UnknownKey
        })
    }
}

struct Authentic {
    sent_at_ms: u64,
    nonce: [u8; NONCE_LEN],
    piece: bool,
    payload: Vec<u8>,
}

/// What an opened datagram carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// One whole chitchat datagram ([`VERSION`]).
    Whole(Vec<u8>),
    /// One piece of a larger one ([`PIECE_VERSION`]): the piece header and data, for
    /// [`super::pieces::Reassembler`].
    Piece(Vec<u8>),
}

/// Freshness rules of the opener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayConfig {
    /// Oldest accepted age of a datagram (by the sender's clock against ours). Also the time a
    /// nonce must be remembered. Clocks of two nodes must agree within this much (NTP).
    pub max_age: Duration,
    /// How far in our future a sender's clock may be.
    pub max_future_skew: Duration,
    /// Upper bound on remembered nonces. A quarter of it is the share of nonces stamped ahead of
    /// our clock (see [`Opener`]); the rest holds nonces stamped at or before it and, when full,
    /// forgets the oldest and accepts nothing at or before its timestamp any more, so memory
    /// stays bounded under a flood without ever reopening a door to replays.
    pub max_remembered: usize,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            max_age: Duration::from_secs(60),
            max_future_skew: Duration::from_secs(60),
            max_remembered: 32_768,
        }
    }
}

/// Opens sealed datagrams and refuses replays. One per receiving socket.
///
/// Accepted nonces are remembered until they leave the freshness window, in two parts:
///
/// - `past`: stamped at or before our clock, at most `max_remembered - max_remembered / 4`.
///   When full, the entry with the smallest timestamp is forgotten and the floor rises to it:
///   nothing stamped at or before the floor opens any more. Every entry here is stamped at or
///   before our clock, so the floor never passes it; a flood of current stamps only makes the
///   floor trail behind the flood by as long as the flood takes to fill this part.
/// - `future`: stamped ahead of our clock, at most `max_remembered / 4`. Forgetting one of these
///   would need a floor in the future, so they are never forgotten: they move to `past` when
///   our clock reaches their stamp. A new one that finds no room is refused
///   ([`OpenError::FutureFull`]) and not remembered, so it may still open later, once. The room
///   shrinks with how far ahead a datagram is stamped (see [`Opener::future_room`]): datagrams
///   stamped far ahead can take only a small part, so they cannot crowd out peers whose clocks
///   run a few milliseconds ahead of ours.
pub struct Opener {
    keyring: std::sync::Arc<Keyring>,
    config: ReplayConfig,
    // Ordered by timestamp first so expiry, eviction and moving from `future` take from the front.
    past: BTreeSet<(u64, [u8; NONCE_LEN])>,
    future: BTreeSet<(u64, [u8; NONCE_LEN])>,
    // Nothing with a timestamp <= floor is accepted: its nonce may have been forgotten.
    floor_ms: Option<u64>,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("keyring", &self.keyring)
            .field("config", &self.config)
            .field("remembered", &self.remembered())
            .field("remembered_future", &self.future.len())
            .finish()
    }
}

impl Opener {
    /// An opener over `keyring`.
    pub fn new(keyring: std::sync::Arc<Keyring>, config: ReplayConfig) -> Self {
        Opener {
            keyring,
            config,
            past: BTreeSet::new(),
            future: BTreeSet::new(),
            floor_ms: None,
        }
    }

    /// Number of nonces currently remembered.
    pub fn remembered(&self) -> usize {
        self.past.len() + self.future.len()
    }

    /// Opens `datagram` received at `now_unix_ms`, returning the payload.
    pub fn open(&mut self, now_unix_ms: u64, datagram: &[u8]) -> Result<Vec<u8>, OpenError> {
        self.open_stamped(now_unix_ms, datagram).1
    }

    /// Like [`Opener::open`], and also returns the sender's sealed timestamp whenever the
    /// datagram is authentic, whether or not it is then refused (stale, replayed, ...): the
    /// sender's clock minus ours is how far apart the two clocks are (plus the one-way delay),
    /// which `meshsec doctor` checks against the freshness window.
    /// Only whole datagrams ([`VERSION`]) open here; see [`Opener::open_any`] for pieces.
    pub fn open_stamped(
        &mut self,
        now_unix_ms: u64,
        datagram: &[u8],
    ) -> (Option<u64>, Result<Vec<u8>, OpenError>) {
        match self.keyring.open_authentic(datagram, false) {
            Ok(authentic) => {
                let ts = authentic.sent_at_ms;
                (Some(ts), self.accept(now_unix_ms, authentic))
            }
            Err(e) => (None, Err(e)),
        }
    }

    /// Like [`Opener::open_stamped`], and also opens pieces ([`PIECE_VERSION`]). Each piece is
    /// authenticated, checked for freshness and remembered against replay on its own, like a
    /// whole datagram.
    pub fn open_any(
        &mut self,
        now_unix_ms: u64,
        datagram: &[u8],
    ) -> (Option<u64>, Result<Opened, OpenError>) {
        match self.keyring.open_authentic(datagram, true) {
            Ok(authentic) => {
                let ts = authentic.sent_at_ms;
                let piece = authentic.piece;
                let opened = self.accept(now_unix_ms, authentic).map(|payload| {
                    if piece {
                        Opened::Piece(payload)
                    } else {
                        Opened::Whole(payload)
                    }
                });
                (Some(ts), opened)
            }
            Err(e) => (None, Err(e)),
        }
    }

    fn accept(&mut self, now_unix_ms: u64, authentic: Authentic) -> Result<Vec<u8>, OpenError> {
        let ts = authentic.sent_at_ms;
        let max_age = duration_ms(self.config.max_age);
        let max_future = duration_ms(self.config.max_future_skew);
        let oldest_ok = now_unix_ms.saturating_sub(max_age);
        if ts < oldest_ok || ts > now_unix_ms.saturating_add(max_future) {
            return Err(OpenError::Stale);
        }
        self.advance(now_unix_ms, oldest_ok);
        if self.floor_ms.is_some_and(|floor| ts <= floor) {
            return Err(OpenError::Replayed);
        }
        let entry = (ts, authentic.nonce);
        if ts > now_unix_ms {
            if self.future.contains(&entry) {
                return Err(OpenError::Replayed);
            }
            if self.future.len() >= self.future_room(ts - now_unix_ms) {
                return Err(OpenError::FutureFull);
            }
            self.future.insert(entry);
        } else {
            if !self.past.insert(entry) {
                return Err(OpenError::Replayed);
            }
            self.evict();
        }
        Ok(authentic.payload)
    }

    /// How many nonces stamped ahead of our clock may be held when one stamped `lead_ms` ahead
    /// arrives: the future share split into one band per bit of the largest lead (16 bands for
    /// 60 s in milliseconds); a lead of `b` bits may fill all but `b - 1` bands. A lead under 2 ms
    /// may use the whole share; the far end of the window only one band. To hold the share above
    /// what a lead of `b` bits may use, a flood must keep a band's worth of nonces stamped less
    /// than `2^b` ms ahead, which it must renew every `2^b` ms.
    fn future_room(&self, lead_ms: u64) -> usize {
        let share = self.future_share();
        let bands = u64::from(u64::BITS - duration_ms(self.config.max_future_skew).leading_zeros());
        let bands = bands.max(1);
        let band = u64::from(u64::BITS - lead_ms.leading_zeros()).clamp(1, bands);
        let room = u128::from(bands + 1 - band) * share as u128 / u128::from(bands);
        usize::try_from(room).unwrap_or(usize::MAX)
    }

    /// Brings the cache to `now_unix_ms`: nonces our clock has reached move from `future` to
    /// `past`, nonces older than the window are dropped (anything that old is refused as stale
    /// before the cache is consulted), and `past` is brought back within its bound.
    fn advance(&mut self, now_unix_ms: u64, oldest_ok: u64) {
        while let Some(&entry) = self.future.first() {
            if entry.0 > now_unix_ms {
                break;
            }
            self.future.pop_first();
            self.past.insert(entry);
        }
        while let Some(&(ts, _)) = self.past.first() {
            if ts >= oldest_ok {
                break;
            }
            self.past.pop_first();
        }
        self.evict();
    }

    /// The most nonces stamped ahead of our clock ever held: a quarter of the cache.
    fn future_share(&self) -> usize {
        self.config.max_remembered / 4
    }

    /// Forgets the oldest nonces of `past` beyond its bound, raising the floor behind them.
    fn evict(&mut self) {
        let bound = (self.config.max_remembered - self.future_share()).max(1);
        while self.past.len() > bound {
            if let Some((evicted_ts, _)) = self.past.pop_first() {
                self.floor_ms = Some(self.floor_ms.map_or(evicted_ts, |f| f.max(evicted_ts)));
            }
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const NOW: u64 = 1_790_000_000_000;

    fn ring(secrets: &[[u8; 32]]) -> Arc<Keyring> {
        Arc::new(Keyring::new(secrets).unwrap())
    }

    fn opener(secrets: &[[u8; 32]]) -> Opener {
        Opener::new(ring(secrets), ReplayConfig::default())
    }

    #[test]
    fn roundtrip() {
        let k = ring(&[[7; 32]]);
        let mut o = Opener::new(k.clone(), ReplayConfig::default());
        for len in [0usize, 1, 100, 65_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let sealed = k.seal(NOW, &payload);
            assert_eq!(sealed.len(), payload.len() + OVERHEAD);
            assert_eq!(o.open(NOW, &sealed).unwrap(), payload);
        }
    }

    #[test]
    fn the_sender_stamp_is_returned_for_authentic_datagrams_even_when_refused() {
        let k = ring(&[[7; 32]]);
        let mut o = Opener::new(k.clone(), ReplayConfig::default());
        // A peer 20 s ahead: accepted, and its stamp tells us how far ahead.
        let ahead = k.seal(NOW + 20_000, b"x");
        let (stamp, r) = o.open_stamped(NOW, &ahead);
        assert_eq!((stamp, r.unwrap()), (Some(NOW + 20_000), b"x".to_vec()));
        // A peer 90 s behind: refused as stale, but the stamp still says why.
        let behind = k.seal(NOW - 90_000, b"y");
        assert_eq!(
            o.open_stamped(NOW, &behind),
            (Some(NOW - 90_000), Err(OpenError::Stale))
        );
        // A replay is authentic too.
        assert_eq!(o.open_stamped(NOW, &ahead).0, Some(NOW + 20_000));
        // Forgeries and garbage carry no stamp anyone could trust.
        let mut forged = k.seal(NOW, b"z");
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert_eq!(o.open_stamped(NOW, &forged), (None, Err(OpenError::BadTag)));
        assert_eq!(
            o.open_stamped(NOW, b"short"),
            (None, Err(OpenError::TooShort))
        );
        let other = ring(&[[8; 32]]).seal(NOW, b"w");
        assert_eq!(
            o.open_stamped(NOW, &other),
            (None, Err(OpenError::UnknownKey))
        );
    }

    #[test]
    fn a_live_keyring_is_replaced_in_place() {
        let (old, new) = ([1u8; 32], [2u8; 32]);
        let k = ring(&[old]);
        // The opener shares the keyring, as the transport's do.
        let mut o = Opener::new(k.clone(), ReplayConfig::default());
        let by_old = k.seal(NOW, b"a");
        let new_id = Keyring::new([new]).unwrap().sealing_key_id();
        k.replace([old, new]).unwrap();
        assert_eq!(k.key_ids().len(), 2);
        assert_ne!(k.sealing_key_id(), new_id, "the old secret still seals");
        assert_eq!(o.open(NOW, &by_old).unwrap(), b"a");
        k.replace([new, old]).unwrap();
        assert_eq!(k.sealing_key_id(), new_id);
        let by_new = k.seal(NOW, b"b");
        assert_eq!(o.open(NOW, &by_new).unwrap(), b"b");
        k.replace([new]).unwrap();
        let late_old = ring(&[old]).seal(NOW, b"c");
        assert!(matches!(o.open(NOW, &late_old), Err(OpenError::UnknownKey)));
        assert!(matches!(
            k.replace(Vec::<[u8; 32]>::new()),
            Err(KeyringError::Empty)
        ));
        assert_eq!(
            k.sealing_key_id(),
            new_id,
            "a refused replace changes nothing"
        );
    }

    #[test]
    fn empty_keyring_is_an_error() {
        assert!(matches!(
            Keyring::new(Vec::<[u8; 32]>::new()),
            Err(KeyringError::Empty)
        ));
    }

    #[test]
    fn derived_key_id_is_stable_and_per_secret() {
        // Pins the derivation: a change here breaks every deployed cluster.
        let a = Keyring::new([[1u8; 32]]).unwrap();
        let a2 = Keyring::new([[1u8; 32]]).unwrap();
        let b = Keyring::new([[2u8; 32]]).unwrap();
        assert_eq!(a.sealing_key_id(), a2.sealing_key_id());
        assert_ne!(a.sealing_key_id(), b.sealing_key_id());
        // The header must carry the id and version in clear.
        let sealed = a.seal(NOW, b"x");
        assert_eq!(sealed[0], VERSION);
        assert_eq!(&sealed[1..5], &a.sealing_key_id().0);
    }

    /// Known answer, computed independently with Python's hmac/hashlib (HKDF) and libsodium's
    /// `crypto_aead_xchacha20poly1305_ietf_encrypt` (PyNaCl): pins the derivation labels, the
    /// header layout and the AEAD construction, so a change here breaks deployed clusters.
    #[test]
    fn known_answer() {
        let k = Keyring::new([[1u8; 32]]).unwrap();
        assert_eq!(k.sealing_key_id().to_string(), "ee73f679");
        let sealed = k.seal_with_nonce(1_700_000_000_000, [3; 24], b"meshsec");
        let hex: String = sealed.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "01ee73f679030303030303030303030303030303030303030303030303\
             8e6d6f0654b33da2f5f0a85b07640992101aa536abcd185123bcf3911f12ec"
        );
        let mut o = Opener::new(Arc::new(k), ReplayConfig::default());
        assert_eq!(o.open(1_700_000_000_000, &sealed).unwrap(), b"meshsec");
    }

    #[test]
    fn json_vectors() {
        // proto/vectors/gossip-seal.json is the executable spec of the format.
        let text = include_str!("../../proto/vectors/gossip-seal.json");
        let doc: serde_json::Value = serde_json::from_str(text).unwrap();
        let hexd = |v: &serde_json::Value| -> Vec<u8> {
            let s = v.as_str().unwrap();
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let vectors = doc["vectors"].as_array().unwrap();
        assert!(!vectors.is_empty());
        for v in vectors {
            let secret: [u8; 32] = hexd(&v["secret"]).try_into().unwrap();
            let nonce: [u8; 24] = hexd(&v["nonce"]).try_into().unwrap();
            let at = v["sent_at_ms"].as_u64().unwrap();
            let k = Keyring::new([secret]).unwrap();
            assert_eq!(k.sealing_key_id().0.to_vec(), hexd(&v["key_id"]));
            let sealed = k.seal_with_nonce(at, nonce, &hexd(&v["payload"]));
            assert_eq!(sealed, hexd(&v["sealed"]), "{}", v["name"]);
            let mut o = Opener::new(Arc::new(k), ReplayConfig::default());
            assert_eq!(o.open(at, &sealed).unwrap(), hexd(&v["payload"]));
        }
    }

    #[test]
    fn sealing_is_deterministic_given_nonce() {
        let k = Keyring::new([[9u8; 32]]).unwrap();
        let a = k.seal_with_nonce(NOW, [3; 24], b"hello");
        let b = k.seal_with_nonce(NOW, [3; 24], b"hello");
        assert_eq!(a, b);
        // Ciphertext must differ from plaintext (the payload is not sent in clear).
        assert!(!a.windows(5).any(|w| w == b"hello"));
        let c = k.seal(NOW, b"hello");
        let d = k.seal(NOW, b"hello");
        assert_ne!(c[5..29], d[5..29], "random nonces must differ");
    }

    #[test]
    fn tampering_any_byte_is_rejected() {
        let k = ring(&[[7; 32]]);
        let sealed = k.seal(NOW, b"chitchat payload bytes");
        for i in 0..sealed.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut t = sealed.clone();
                t[i] ^= flip;
                let mut o = Opener::new(k.clone(), ReplayConfig::default());
                let err = o.open(NOW, &t).unwrap_err();
                let expected = match i {
                    0 => OpenError::BadVersion,
                    1..=4 => OpenError::UnknownKey,
                    _ => OpenError::BadTag,
                };
                assert_eq!(err, expected, "byte {i} flip {flip:#x}");
            }
        }
    }

    #[test]
    fn foreign_key_is_rejected() {
        let ours = opener(&[[1; 32]]);
        let theirs = ring(&[[2; 32]]);
        let mut ours = ours;
        assert_eq!(
            ours.open(NOW, &theirs.seal(NOW, b"hi")).unwrap_err(),
            OpenError::UnknownKey
        );
    }

    #[test]
    fn forged_key_id_with_foreign_key_is_bad_tag() {
        let ours = ring(&[[1; 32]]);
        let theirs = ring(&[[2; 32]]);
        let mut forged = theirs.seal(NOW, b"hi");
        forged[1..5].copy_from_slice(&ours.sealing_key_id().0);
        let mut o = Opener::new(ours, ReplayConfig::default());
        assert_eq!(o.open(NOW, &forged).unwrap_err(), OpenError::BadTag);
    }

    #[test]
    fn truncation_at_every_length_is_rejected() {
        let k = ring(&[[7; 32]]);
        let sealed = k.seal(NOW, b"some payload of moderate size, forty bytes");
        for len in 0..sealed.len() {
            let mut o = Opener::new(k.clone(), ReplayConfig::default());
            let err = o.open(NOW, &sealed[..len]).unwrap_err();
            if len < OVERHEAD {
                assert_eq!(err, OpenError::TooShort, "len {len}");
            } else {
                assert_eq!(err, OpenError::BadTag, "len {len}");
            }
        }
    }

    #[test]
    fn every_secret_opens_only_the_first_seals() {
        let old = [1u8; 32];
        let new = [2u8; 32];
        let rotating = ring(&[new, old]);
        let old_only = ring(&[old]);
        let new_only = ring(&[new]);

        // A node on the rotating keyring opens traffic from both generations...
        let mut o = Opener::new(rotating.clone(), ReplayConfig::default());
        assert_eq!(o.open(NOW, &old_only.seal(NOW, b"a")).unwrap(), b"a");
        assert_eq!(o.open(NOW, &new_only.seal(NOW, b"b")).unwrap(), b"b");
        // ...and seals with the first secret only.
        let sealed = rotating.seal(NOW, b"c");
        assert_eq!(&sealed[1..5], &new_only.sealing_key_id().0);
        let mut o_new = Opener::new(new_only, ReplayConfig::default());
        assert_eq!(o_new.open(NOW, &sealed).unwrap(), b"c");
        let mut o_old = Opener::new(old_only, ReplayConfig::default());
        assert_eq!(o_old.open(NOW, &sealed).unwrap_err(), OpenError::UnknownKey);
        assert_eq!(rotating.key_ids().len(), 2);
    }

    #[test]
    fn replay_is_rejected() {
        let k = ring(&[[7; 32]]);
        let mut o = Opener::new(k.clone(), ReplayConfig::default());
        let sealed = k.seal(NOW, b"once");
        assert!(o.open(NOW, &sealed).is_ok());
        assert_eq!(o.open(NOW + 1, &sealed).unwrap_err(), OpenError::Replayed);
        assert_eq!(
            o.open(NOW + 59_000, &sealed).unwrap_err(),
            OpenError::Replayed
        );
        // Once out of the window it is stale, and the cache no longer needs to hold it.
        assert_eq!(o.open(NOW + 60_001, &sealed).unwrap_err(), OpenError::Stale);
        assert!(o.open(NOW + 60_001, &k.seal(NOW + 60_001, b"new")).is_ok());
        assert_eq!(o.remembered(), 1, "expired nonces are forgotten");
    }

    #[test]
    fn stale_and_future_are_rejected() {
        let k = ring(&[[7; 32]]);
        let mut o = Opener::new(k.clone(), ReplayConfig::default());
        assert_eq!(
            o.open(NOW, &k.seal(NOW - 60_001, b"old")).unwrap_err(),
            OpenError::Stale
        );
        assert!(o.open(NOW, &k.seal(NOW - 60_000, b"edge")).is_ok());
        assert_eq!(
            o.open(NOW, &k.seal(NOW + 60_001, b"future")).unwrap_err(),
            OpenError::Stale
        );
        assert!(o.open(NOW, &k.seal(NOW + 59_000, b"skewed")).is_ok());
        // A zero clock never underflows.
        assert_eq!(o.open(0, &k.seal(NOW, b"x")).unwrap_err(), OpenError::Stale);
        let mut o0 = Opener::new(k.clone(), ReplayConfig::default());
        assert!(o0.open(0, &k.seal(0, b"x")).is_ok());
    }

    #[test]
    fn cache_is_bounded_and_eviction_never_readmits() {
        let k = ring(&[[7; 32]]);
        let cfg = ReplayConfig {
            max_remembered: 8,
            ..ReplayConfig::default()
        };
        let mut o = Opener::new(k.clone(), cfg);
        let first = k.seal(NOW, b"first");
        assert!(o.open(NOW, &first).is_ok());
        for i in 1..=100u64 {
            assert!(o.open(NOW + i, &k.seal(NOW + i, b"flood")).is_ok());
            assert!(o.remembered() <= 8);
        }
        // `first` was forgotten, yet still refused: the floor moved past it.
        assert_eq!(o.open(NOW + 101, &first).unwrap_err(), OpenError::Replayed);
        // A fresh datagram still opens.
        assert!(o.open(NOW + 101, &k.seal(NOW + 101, b"fresh")).is_ok());
    }

    /// Finding 5, "gossip deafness": a member holding the secret floods more datagrams than the
    /// cache holds, all stamped at the edge of the future window. Nothing it sends may push the
    /// floor into the future: an honest datagram stamped now opens, and so does honest traffic
    /// (a little behind, on time, a little ahead) at every later instant.
    #[test]
    fn future_stamped_flood_never_deafens() {
        let (k, mut o, cfg) = with_cache(ReplayConfig::default().max_remembered);
        let mut refused = 0;
        for _ in 0..cfg.max_remembered + 1_000 {
            if let Err(e) = o.open(
                NOW,
                &k.seal(NOW + duration_ms(cfg.max_future_skew), b"flood"),
            ) {
                assert_eq!(e, OpenError::FutureFull);
                refused += 1;
            }
            assert!(o.remembered() <= cfg.max_remembered);
        }
        assert!(
            refused > cfg.max_remembered,
            "the flood is refused and counted"
        );
        honest_traffic_keeps_opening(&mut o, &k, |_, _| {});
    }

    /// The same attacker, sustained: every 500 ms it sends, for each of three leads (the edge of
    /// the window, 1 s and 2 ms), as many datagrams as the whole future share holds, plus current
    /// ones at a rate the cache absorbs. Honest traffic a little behind, on time and 1 ms ahead keeps opening.
    #[test]
    fn sustained_flood_never_deafens() {
        let (k, mut o, cfg) = with_cache(64);
        let edge = duration_ms(cfg.max_future_skew);
        honest_traffic_keeps_opening(&mut o, &k, |o, now| {
            for lead in [edge, 1_000, 2] {
                for _ in 0..cfg.max_remembered / 4 {
                    let _ = o.open(now, &k.seal(now + lead, b"flood"));
                }
            }
            for _ in 0..cfg.max_remembered / 5 {
                let _ = o.open(now, &k.seal(now, b"flood"));
            }
        });
    }

    /// A keyring and an opener over it with the default window and a cache of `max_remembered`.
    fn with_cache(max_remembered: usize) -> (Arc<Keyring>, Opener, ReplayConfig) {
        let k = ring(&[[7; 32]]);
        let cfg = ReplayConfig {
            max_remembered,
            ..ReplayConfig::default()
        };
        (k.clone(), Opener::new(k, cfg), cfg)
    }

    /// Every 500 ms from `NOW` until twice the window later, lets `attack` send, then checks
    /// that honest datagrams stamped 1 ms behind, on time and 1 ms ahead all open.
    fn honest_traffic_keeps_opening(
        o: &mut Opener,
        k: &Keyring,
        mut attack: impl FnMut(&mut Opener, u64),
    ) {
        let edge = duration_ms(o.config.max_future_skew);
        for step in 0..=2 * edge / 500 + 10 {
            let now = NOW + step * 500;
            attack(o, now);
            assert!(o.remembered() <= o.config.max_remembered);
            for sent in [now - 1, now, now + 1] {
                assert_eq!(
                    o.open(now, &k.seal(sent, b"honest")).map(|_| ()),
                    Ok(()),
                    "honest datagram stamped {} ms from now, {} ms after the start",
                    sent as i64 - now as i64,
                    now - NOW
                );
            }
        }
    }

    /// Datagrams stamped ahead of our clock are never forgotten early: whatever floods the cache
    /// and however time moves, each one opens at most once until it is stale. One refused for
    /// lack of room is not remembered, so it may open later, still at most once.
    #[test]
    fn future_stamped_datagrams_open_at_most_once() {
        let (k, mut o, cfg) = with_cache(16);
        let edge = duration_ms(cfg.max_future_skew);
        let captured: Vec<Vec<u8>> = [1, 1, 3, 100, 100, 5_000, 30_000, edge, edge]
            .iter()
            .map(|lead| k.seal(NOW + lead, b"captured"))
            .collect();
        let mut opened = vec![0usize; captured.len()];
        for step in 0..=2 * edge / 250 + 10 {
            let now = NOW + step * 250;
            // More current datagrams than the cache holds: the floor rises every step.
            for _ in 0..cfg.max_remembered {
                let _ = o.open(now, &k.seal(now, b"flood"));
            }
            for (d, n) in captured.iter().zip(opened.iter_mut()) {
                if o.open(now, d).is_ok() {
                    *n += 1;
                }
            }
            assert!(o.remembered() <= cfg.max_remembered);
        }
        assert!(opened.iter().all(|&n| n <= 1), "{opened:?}");
        assert_eq!(opened[0], 1, "a datagram 1 ms ahead opens at once");
    }

    /// Fuzz-style: random garbage, random mutations and splices of valid datagrams. The opener
    /// must never panic, must never accept anything it did not see sealed by a keyring key, and
    /// must accept each authentic datagram exactly once.
    #[test]
    fn randomized_inputs_never_panic_and_never_open() {
        let seed: u64 = std::env::var("MESHSEC_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_0f90_551b);
        let iterations: usize = std::env::var("MESHSEC_FUZZ_ITERS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(50_000);
        let mut rng = StdRng::seed_from_u64(seed);
        let k = ring(&[[7; 32], [8; 32]]);
        let foreign = ring(&[[9; 32]]);
        let mut o = Opener::new(k.clone(), ReplayConfig::default());
        let valid: Vec<Vec<u8>> = (0..16)
            .map(|i| {
                let len = rng.gen_range(0..300);
                let p: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                k.seal(NOW + i, &p)
            })
            .collect();
        let mut accepted = 0usize;
        for iter in 0..iterations {
            let input: Vec<u8> = match rng.gen_range(0..6) {
                0 => {
                    let len = rng.gen_range(0..200);
                    (0..len).map(|_| rng.gen()).collect()
                }
                1 => {
                    // Garbage behind a plausible header, so the AEAD path is exercised.
                    let len = rng.gen_range(0..200);
                    let mut v: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    if v.len() >= 5 {
                        v[0] = VERSION;
                        v[1..5].copy_from_slice(&k.sealing_key_id().0);
                    }
                    v
                }
                2 => {
                    let mut v = valid[rng.gen_range(0..valid.len())].clone();
                    for _ in 0..rng.gen_range(1..4) {
                        let i = rng.gen_range(0..v.len());
                        v[i] ^= rng.gen_range(1..=255u8);
                    }
                    v
                }
                3 => {
                    let v = &valid[rng.gen_range(0..valid.len())];
                    v[..rng.gen_range(0..v.len())].to_vec()
                }
                4 => {
                    // Header of one datagram, body of another.
                    let a = &valid[rng.gen_range(0..valid.len())];
                    let b = &valid[rng.gen_range(0..valid.len())];
                    if a == b {
                        continue;
                    }
                    let mut v = a[..HEADER_LEN].to_vec();
                    v.extend_from_slice(&b[HEADER_LEN..]);
                    v
                }
                _ => foreign.seal(NOW, &[iter as u8; 10]),
            };
            if o.open(NOW + 10, &input).is_ok() {
                accepted += 1;
                assert!(
                    valid.contains(&input),
                    "iteration {iter}: opened a datagram nobody sealed: {input:02x?}"
                );
            }
        }
        // Authentic datagrams each open exactly once, even when the fuzzer replays them.
        for v in &valid {
            if o.open(NOW + 10, v).is_ok() {
                accepted += 1;
            }
        }
        assert_eq!(accepted, valid.len());
    }

    /// Attack review (2026-11-30), not fixed: "a captured datagram opens at most once" holds
    /// only while the receiver's clock never goes back. The transport passes the wall clock
    /// (`SystemTime`), which NTP (or an on-path attacker spoofing unauthenticated NTP) can step
    /// back. A datagram accepted and then forgotten once older than `max_age` is inside the
    /// window again after a step back of a few seconds, and an on-path replayer with no secret
    /// gets it opened a second time. Impact is small (chitchat's versions only grow, so an old
    /// state cannot roll newer state back), and the obvious fix, never letting the opener's
    /// clock go back, trades it for deafness: after a step back of Δ > `max_age` every honest
    /// datagram would be stale for Δ - `max_age`. Left as a design decision.
    #[test]
    #[ignore = "open: a wall clock stepped back reopens datagrams already forgotten (attack review 2026-11-30)"]
    fn a_clock_stepped_back_never_reopens_a_datagram() {
        let k = ring(&[[7; 32]]);
        let mut o = Opener::new(k.clone(), ReplayConfig::default());
        let captured = k.seal(NOW, b"once");
        assert!(o.open(NOW, &captured).is_ok());
        // 61 s later anything new clears out the expired nonce...
        assert!(o.open(NOW + 61_000, &k.seal(NOW + 61_000, b"x")).is_ok());
        // ...then the clock is stepped back 2 s and the replayer tries again.
        assert_ne!(o.open(NOW + 59_000, &captured).map(|_| ()), Ok(()));
    }
}
