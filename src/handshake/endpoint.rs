//! The sans-IO handshake state machine (proto/handshake.md §4–§8).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use zeroize::Zeroizing;

use super::crypto::{
    derive_cookie_key, derive_esp_keys, derive_mac1_key, derive_psk, hex, mac16, mac_eq,
    open_cookie, StaticKeypair, MAC_LEN,
};
use super::dh::StaticDh;
use super::dos::DosGuard;
use super::noise::{initiator_finish, initiator_start, put_mac, put_mac2};
use super::types::{
    Config, ConfigError, Counters, Event, FailReason, HandshakeContext, InitiateError, PublicKey,
    Rejected, Role, Session, COOKIE_LIFETIME, MIN_SPI,
};
use super::wire::{
    decode, encode_initiation, CookieReply, DecodeError, InitPayload, Message, RespPayload,
    Response, INITIATION_LEN, INITIATION_MAC1_OFF, INITIATION_MAC2_OFF, RESPONSE_LEN,
    RESPONSE_MAC1_OFF,
};
use crate::throttle::LogThrottle;

mod responder;

/// An outstanding initiation of ours.
struct Initiating {
    hs: snow::HandshakeState,
    sender_index: u32,
    local_spi: u32,
    peer_addr: SocketAddr,
    timestamp: u64,
    /// Key that authenticates the peer's response (secret used ‖ our public key).
    response_mac1_key: Zeroizing<[u8; 32]>,
    /// Key that opens the peer's cookie replies (secret used ‖ peer public key).
    cookie_key: Zeroizing<[u8; 32]>,
    /// The initiation with mac1 filled and mac2 zero.
    packet: [u8; INITIATION_LEN],
    /// Cookie whose mac2 the last transmission carried.
    mac2_cookie: Option<[u8; MAC_LEN]>,
    started: Instant,
    deadline: Instant,
    next_retransmit: Instant,
    rto: Duration,
    /// A collision already made us resend this initiation at once (see
    /// [`Endpoint::resend_after_collision`]): at most once per attempt.
    collision_resent: bool,
}

/// Handshake state with one peer.
enum PeerState {
    /// Nothing outstanding.
    Idle,
    /// We sent an initiation and wait for the response.
    Initiating(Box<Initiating>),
}

struct PeerEntry {
    state: PeerState,
    /// Greatest initiation timestamp accepted from this peer (or abandoned by it).
    last_accepted_ts: u64,
    /// Latest cookie from this peer as responder, and when it arrived.
    cookie: Option<([u8; MAC_LEN], Instant)>,
}

impl PeerEntry {
    fn new() -> Self {
        PeerEntry {
            state: PeerState::Idle,
            last_accepted_ts: 0,
            cookie: None,
        }
    }
}

/// A response we sent, kept to answer exact retransmissions of its initiation.
struct CachedResponse {
    peer: PublicKey,
    initiation: [u8; INITIATION_MAC1_OFF],
    response: [u8; RESPONSE_LEN],
    expires: Instant,
}

struct SecretKeys {
    psk: Zeroizing<[u8; 32]>,
    /// mac1 key for messages sent to us.
    mac1_to_us: Zeroizing<[u8; 32]>,
    /// Key for cookie replies we send.
    cookie_ours: Zeroizing<[u8; 32]>,
    secret: Zeroizing<[u8; 32]>,
}

/// The handshake endpoint: one per agent, shared by all peers. Sans-IO: feed it datagrams and
/// time, drain transmits and events.
pub struct Endpoint {
    config: Config,
    keypair: StaticKeypair,
    dh: std::sync::Arc<StaticDh>,
    secrets: Vec<SecretKeys>,
    peers: HashMap<PublicKey, PeerEntry>,
    /// Our outstanding initiations by sender index.
    indices: HashMap<u32, PublicKey>,
    /// Responses by the initiator's ephemeral public key.
    cache: HashMap<[u8; 32], CachedResponse>,
    transmits: VecDeque<(SocketAddr, Vec<u8>)>,
    events: VecDeque<Event>,
    counters: Counters,
    rng: StdRng,
    anchor: (Instant, u64),
    last_timestamp: u64,
    /// Load detection, cookies and rate limits (the DoS defence).
    dos: DosGuard,
    drop_log: LogThrottle,
    /// Test hook: ephemeral private keys to use instead of fresh ones (vectors, determinism).
    pub(crate) fixed_ephemerals: VecDeque<[u8; 32]>,
    /// Test hook: sender indices to use instead of random ones (vectors).
    pub(crate) fixed_indices: VecDeque<u32>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("public", &hex(self.keypair.public()))
            .field("peers", &self.peers.len())
            .field("outstanding", &self.indices.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

fn secret_keys(secret: &[u8; 32], our_pub: &PublicKey) -> SecretKeys {
    SecretKeys {
        psk: derive_psk(secret),
        mac1_to_us: derive_mac1_key(secret, our_pub),
        cookie_ours: derive_cookie_key(secret, our_pub),
        secret: Zeroizing::new(*secret),
    }
}

impl Endpoint {
    /// Creates an endpoint.
    ///
    /// `keyring` holds the cluster secrets: we initiate with the first and accept
    /// initiations made with any of them. `now` and `unix_now` (time since the Unix epoch, from
    /// the wall clock) anchor the initiation timestamps, which must keep increasing across
    /// restarts.
    pub fn new(
        config: Config,
        keypair: StaticKeypair,
        keyring: &[[u8; 32]],
        now: Instant,
        unix_now: Duration,
    ) -> Result<Self, ConfigError> {
        Self::with_rng(
            config,
            keypair,
            keyring,
            now,
            unix_now,
            StdRng::from_entropy(),
        )
    }

    /// Like [`Endpoint::new`] with a seeded RNG for indices, jitter and cookie nonces
    /// (reproducible tests; Noise ephemerals still come from the OS RNG).
    pub fn with_seed(
        config: Config,
        keypair: StaticKeypair,
        keyring: &[[u8; 32]],
        now: Instant,
        unix_now: Duration,
        seed: u64,
    ) -> Result<Self, ConfigError> {
        Self::with_rng(
            config,
            keypair,
            keyring,
            now,
            unix_now,
            StdRng::seed_from_u64(seed),
        )
    }

    fn with_rng(
        config: Config,
        keypair: StaticKeypair,
        keyring: &[[u8; 32]],
        now: Instant,
        unix_now: Duration,
        mut rng: StdRng,
    ) -> Result<Self, ConfigError> {
        if keyring.is_empty() {
            return Err(ConfigError::EmptyKeyring);
        }
        let secrets = keyring
            .iter()
            .map(|s| secret_keys(s, keypair.public()))
            .collect();
        Ok(Endpoint {
            dos: DosGuard::new(now, &config, &mut rng),
            config,
            dh: StaticDh::new(&keypair),
            keypair,
            secrets,
            peers: HashMap::new(),
            indices: HashMap::new(),
            cache: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            counters: Counters::default(),
            rng,
            anchor: (now, u64::try_from(unix_now.as_nanos()).unwrap_or(u64::MAX)),
            last_timestamp: 0,
            drop_log: LogThrottle::new(Duration::from_secs(1)),
            fixed_ephemerals: VecDeque::new(),
            fixed_indices: VecDeque::new(),
        })
    }

    /// Replaces the cluster secret keyring (rotation). If the initiating (first) secret changed,
    /// outstanding initiations are cancelled, since their retransmissions would carry the old
    /// secret a peer may already have dropped; returns them (peer, SPI to free) so the caller
    /// can start again at once under the new secret.
    pub fn set_keyring(
        &mut self,
        keyring: &[[u8; 32]],
    ) -> Result<Vec<(PublicKey, u32)>, ConfigError> {
        if keyring.is_empty() {
            return Err(ConfigError::EmptyKeyring);
        }
        let first_changed = self.secrets.first().is_none_or(|s| *s.secret != keyring[0]);
        self.secrets = keyring
            .iter()
            .map(|s| secret_keys(s, self.keypair.public()))
            .collect();
        let mut cancelled = Vec::new();
        if first_changed {
            let initiating: Vec<PublicKey> = self
                .peers
                .iter()
                .filter(|(_, e)| matches!(e.state, PeerState::Initiating(_)))
                .map(|(p, _)| *p)
                .collect();
            for peer in initiating {
                if let Some(spi) = self.cancel(&peer) {
                    cancelled.push((peer, spi));
                }
            }
        }
        Ok(cancelled)
    }

    /// Our static public key.
    pub fn public_key(&self) -> &PublicKey {
        self.keypair.public()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counters since creation.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Whether an initiation to `peer` is outstanding.
    pub fn is_initiating(&self, peer: &PublicKey) -> bool {
        matches!(
            self.peers.get(peer).map(|p| &p.state),
            Some(PeerState::Initiating(_))
        )
    }

    /// Whether the responder currently demands cookies (mac2) before doing DH work.
    pub fn is_under_load(&self, now: Instant) -> bool {
        self.dos.is_under_load(now)
    }

    /// Test hook: fixes the cookie secret and forces the under-load state until `until`.
    #[cfg(test)]
    pub(crate) fn force_under_load(
        &mut self,
        now: Instant,
        until: Instant,
        cookie_secret: [u8; 32],
    ) {
        self.dos.force_under_load(now, until, cookie_secret);
    }

    /// Starts a handshake with `peer` at `peer_addr`, offering `local_spi` (our inbound SPI,
    /// allocated by the caller) for the peer → us SA.
    pub fn initiate(
        &mut self,
        now: Instant,
        peer: PublicKey,
        peer_addr: SocketAddr,
        local_spi: u32,
    ) -> Result<(), InitiateError> {
        if &peer == self.keypair.public() {
            return Err(InitiateError::SelfPeer);
        }
        if local_spi < MIN_SPI {
            return Err(InitiateError::ReservedSpi(local_spi));
        }
        if self.is_initiating(&peer) {
            return Err(InitiateError::InProgress);
        }
        let timestamp = self.next_timestamp(now);
        let sender_index = self.fresh_index();
        let secret = &self.secrets[0];
        let payload = InitPayload {
            timestamp,
            spi: local_spi,
            alg: self.config.algorithm.id(),
        };
        let eph = self.fixed_ephemerals.pop_front();
        self.dh.remember(&peer);
        let (hs, noise) = initiator_start(
            &self.dh,
            &peer,
            &secret.psk,
            eph.as_ref(),
            &payload.encode(),
        )
        .map_err(|e| InitiateError::Noise(e.to_string()))?;
        let mut packet = encode_initiation(sender_index, &noise);
        put_mac(
            &mut packet,
            INITIATION_MAC1_OFF,
            &derive_mac1_key(&secret.secret, &peer),
        );
        let st = Initiating {
            hs,
            sender_index,
            local_spi,
            peer_addr,
            timestamp,
            response_mac1_key: Zeroizing::new(*secret.mac1_to_us),
            cookie_key: derive_cookie_key(&secret.secret, &peer),
            packet,
            mac2_cookie: None,
            started: now,
            deadline: now + self.config.handshake_timeout,
            next_retransmit: now,
            rto: self.config.initial_rto,
            collision_resent: false,
        };
        self.indices.insert(sender_index, peer);
        let entry = self.peers.entry(peer).or_insert_with(PeerEntry::new);
        entry.state = PeerState::Initiating(Box::new(st));
        tracing::debug!(peer = %short(&peer), %peer_addr, local_spi, "handshake: initiating");
        self.send_initiation(now, &peer, false);
        Ok(())
    }

    /// Abandons an outstanding initiation to `peer` (e.g. it left the cluster). Returns the
    /// SPI the caller allocated for it, so the caller can free it.
    pub fn cancel(&mut self, peer: &PublicKey) -> Option<u32> {
        let entry = self.peers.get_mut(peer)?;
        match std::mem::replace(&mut entry.state, PeerState::Idle) {
            PeerState::Initiating(st) => {
                self.indices.remove(&st.sender_index);
                Some(st.local_spi)
            }
            PeerState::Idle => None,
        }
    }

    /// Forgets everything about `peer` (it left the cluster): cancels its initiation (returning
    /// the SPI to free), its replay floor, cookie and cached response.
    pub fn forget(&mut self, peer: &PublicKey) -> Option<u32> {
        let spi = self.cancel(peer);
        self.peers.remove(peer);
        self.dh.forget(peer);
        self.cache.retain(|_, c| &c.peer != peer);
        spi
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Endpoint::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter_map(|p| match &p.state {
                PeerState::Initiating(st) => Some(st.next_retransmit.min(st.deadline)),
                PeerState::Idle => None,
            })
            .min()
    }

    /// Fires due retransmissions and timeouts.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<PublicKey> = self
            .peers
            .iter()
            .filter_map(|(k, p)| match &p.state {
                PeerState::Initiating(st) if now >= st.next_retransmit || now >= st.deadline => {
                    Some(*k)
                }
                _ => None,
            })
            .collect();
        for peer in due {
            let timed_out = match self.peers.get(&peer).map(|p| &p.state) {
                Some(PeerState::Initiating(st)) => now >= st.deadline,
                _ => continue,
            };
            if timed_out {
                if let Some(local_spi) = self.cancel(&peer) {
                    self.counters.timeouts += 1;
                    tracing::debug!(peer = %short(&peer), "handshake: timed out");
                    self.events.push_back(Event::Failed {
                        peer,
                        local_spi,
                        reason: FailReason::Timeout,
                    });
                }
            } else {
                self.counters.retransmits += 1;
                self.send_initiation(now, &peer, true);
            }
        }
    }

    /// Handles one received datagram. Never panics on any input; the result says why it was
    /// dropped (also counted in [`Endpoint::counters`]).
    pub fn handle<C: HandshakeContext + ?Sized>(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        ctx: &mut C,
    ) -> Result<(), Rejected> {
        self.counters.received += 1;
        let r = match decode(datagram) {
            Err(DecodeError::BadLength(_)) => Err(Rejected::BadLength),
            Err(DecodeError::BadVersion(_)) => Err(Rejected::BadVersion),
            Err(DecodeError::BadType(_)) => Err(Rejected::BadType),
            Ok(Message::Initiation(m)) => self.handle_initiation(now, from, m, ctx),
            Ok(Message::Response(m)) => self.handle_response(now, from, m),
            Ok(Message::CookieReply(m)) => self.handle_cookie_reply(now, m),
        };
        if let Err(e) = r {
            self.counters.reject(e);
            // Hostile traffic must not flood the log: one line per second, the rest only counted.
            if let Some(suppressed) = self.drop_log.check(now, "drop") {
                tracing::debug!(%from, reason = %e, suppressed, "handshake: dropped datagram (more within 1 s are only counted)");
            }
        }
        r
    }

    fn handle_response(
        &mut self,
        now: Instant,
        from: SocketAddr,
        m: Response<'_>,
    ) -> Result<(), Rejected> {
        let peer = *self
            .indices
            .get(&m.receiver_index)
            .ok_or(Rejected::StaleResponse)?;
        let entry = self.peers.get_mut(&peer).ok_or(Rejected::StaleResponse)?;
        let PeerState::Initiating(st) = &mut entry.state else {
            return Err(Rejected::StaleResponse);
        };
        if !mac_eq(
            &mac16(&*st.response_mac1_key, &[&m.bytes[..RESPONSE_MAC1_OFF]]),
            m.mac1,
        ) {
            return Err(Rejected::BadMac);
        }
        self.counters.dh_work += 1;
        let (payload, split) =
            initiator_finish(&mut st.hs, m.noise).map_err(|_| Rejected::DecryptFailed)?;
        // From here on the handshake state is finished: any failure ends this attempt.
        let PeerState::Initiating(st) = std::mem::replace(&mut entry.state, PeerState::Idle) else {
            unreachable!("matched Initiating above");
        };
        self.indices.remove(&st.sender_index);
        let ok = RespPayload::decode(&payload)
            .ok()
            .filter(|p| p.spi >= MIN_SPI && p.alg == self.config.algorithm.id());
        let Some(p) = ok else {
            // An authenticated peer sent nonsense: report it as a failed attempt.
            self.events.push_back(Event::Failed {
                peer,
                local_spi: st.local_spi,
                reason: FailReason::BadResponse,
            });
            return Err(Rejected::BadPayload);
        };
        // Every initiation the peer made before this response (one it abandoned in a collision,
        // or one an attacker captured and held back) is now stale.
        entry.last_accepted_ts = entry.last_accepted_ts.max(p.timestamp);
        let alg = self.config.algorithm;
        let (i2r, r2i) = derive_esp_keys(&split.k1, &split.k2, &split.hash, alg);
        let session = Session {
            peer,
            peer_addr: from,
            role: Role::Initiator,
            session_id: session_id(&split.hash),
            local_spi: st.local_spi,
            peer_spi: p.spi,
            algorithm: alg,
            key_out: i2r,
            key_in: r2i,
            initiator_timestamp: st.timestamp,
            started_at: st.started,
            established_at: now,
        };
        self.established(session);
        Ok(())
    }

    fn handle_cookie_reply(&mut self, now: Instant, m: CookieReply<'_>) -> Result<(), Rejected> {
        let peer = *self
            .indices
            .get(&m.receiver_index)
            .ok_or(Rejected::StaleResponse)?;
        let entry = self.peers.get_mut(&peer).ok_or(Rejected::StaleResponse)?;
        let PeerState::Initiating(st) = &entry.state else {
            return Err(Rejected::StaleResponse);
        };
        let mac1: [u8; MAC_LEN] = st.packet[INITIATION_MAC1_OFF..INITIATION_MAC2_OFF]
            .try_into()
            .expect("fixed-size slice");
        let cookie =
            open_cookie(&st.cookie_key, m.nonce, &mac1, m.sealed).ok_or(Rejected::BadCookie)?;
        entry.cookie = Some((cookie, now));
        self.counters.cookie_received += 1;
        let already = st.mac2_cookie == Some(cookie);
        if !already {
            // Resend at once with mac2 rather than waiting out the backoff; this cannot loop
            // because a responder never answers a valid mac2 with another cookie.
            self.send_initiation(now, &peer, false);
        }
        Ok(())
    }

    fn established(&mut self, s: Session) {
        self.counters.established += 1;
        // From now on handshakes with this member skip the static-static DH.
        self.dh.remember(&s.peer);
        tracing::debug!(
            peer = %short(&s.peer),
            role = ?s.role,
            local_spi = s.local_spi,
            peer_spi = s.peer_spi,
            session_id = s.session_id,
            "handshake: established"
        );
        self.events.push_back(Event::Established(s));
    }

    /// We dropped `peer`'s initiation in a collision (our key is lower, so ours must
    /// complete): the peer evidently knows us now, while our initiation may have reached it
    /// before it did (dropped there as `unknown_peer`, gossip not having told it about us
    /// yet) and would otherwise be retried only at the next retransmission, up to
    /// `max_rto` later. Resend it now, with the retransmission timer back at its first
    /// value. Once per attempt, so replayed copies of the peer's initiations cannot make
    /// us send more than one extra datagram each time we initiate.
    fn resend_after_collision(&mut self, now: Instant, peer: &PublicKey) {
        let initial_rto = self.config.initial_rto;
        let Some(PeerState::Initiating(st)) = self.peers.get_mut(peer).map(|e| &mut e.state) else {
            return;
        };
        if st.collision_resent {
            return;
        }
        st.collision_resent = true;
        st.rto = initial_rto;
        st.next_retransmit = now;
        self.counters.retransmits += 1;
        tracing::debug!(peer = %short(peer), "handshake: collision, resending our initiation now");
        self.send_initiation(now, peer, false);
    }

    /// (Re)sends the initiation to `peer`, with mac2 if we hold a fresh cookie from it.
    fn send_initiation(&mut self, now: Instant, peer: &PublicKey, backoff: bool) {
        let jitter_ms = u64::try_from(self.config.max_jitter.as_millis()).unwrap_or(0);
        let jitter = Duration::from_millis(if jitter_ms == 0 {
            0
        } else {
            self.rng.gen_range(0..=jitter_ms)
        });
        let max_rto = self.config.max_rto;
        let Some(entry) = self.peers.get_mut(peer) else {
            return;
        };
        let cookie = entry
            .cookie
            .filter(|(_, at)| now.saturating_duration_since(*at) < COOKIE_LIFETIME);
        let PeerState::Initiating(st) = &mut entry.state else {
            return;
        };
        let mut packet = st.packet;
        if let Some((c, _)) = cookie {
            put_mac2(&mut packet, INITIATION_MAC2_OFF, &c);
        }
        st.mac2_cookie = cookie.map(|(c, _)| c);
        if backoff {
            st.rto = (st.rto * 2).min(max_rto);
        }
        if backoff || st.next_retransmit <= now {
            st.next_retransmit = now + st.rto + jitter;
        }
        let addr = st.peer_addr;
        self.push_transmit(addr, packet.to_vec());
    }

    fn push_transmit(&mut self, to: SocketAddr, bytes: Vec<u8>) {
        self.counters.sent += 1;
        self.transmits.push_back((to, bytes));
    }

    fn fresh_index(&mut self) -> u32 {
        if let Some(i) = self.fixed_indices.pop_front() {
            return i;
        }
        loop {
            let i: u32 = self.rng.gen();
            if i != 0 && !self.indices.contains_key(&i) {
                return i;
            }
        }
    }

    /// Strictly increasing wall-clock nanoseconds, derived from the anchor and `now`.
    fn next_timestamp(&mut self, now: Instant) -> u64 {
        let elapsed = u64::try_from(now.saturating_duration_since(self.anchor.0).as_nanos())
            .unwrap_or(u64::MAX);
        let wall = self.anchor.1.saturating_add(elapsed);
        let ts = wall.max(self.last_timestamp.saturating_add(1));
        self.last_timestamp = ts;
        ts
    }
}

fn session_id(hash: &[u8; 32]) -> u64 {
    u64::from_be_bytes(hash[..8].try_into().expect("8-byte prefix"))
}

fn short(k: &PublicKey) -> String {
    hex(&k[..4])
}
