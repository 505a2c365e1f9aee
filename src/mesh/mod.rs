//! The mesh: which links this node wants (a pure function of membership),
//! the handshakes that key them, and the reconciliation that makes the
//! kernel's XFRM tables match the established sessions.
//!
//! A *link* is one (peer, address family) pair: a peer reachable over IPv4
//! and IPv6 has two links, each with its own Noise session, SPIs and keys
//! (two SAs must never share an AES-GCM key: their sequence numbers, hence
//! IVs, would collide). [`Mesh`] holds no sockets and reads no clock: the
//! agent feeds it datagrams, membership and `now`, and sends what it polls.
//!
//! Keys are never reinstalled: if an installed SA disappears from the kernel
//! the link is re-handshaken for fresh keys, because re-adding an outbound
//! SA under an old key would restart its sequence numbers and reuse nonces.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::datapath::{
    diff, AddressFamily, Aead, Change, Datapath, Direction, ErrorKind, KernelEvent, KernelState,
    Lifetimes, PolicySpec, Reqid, SaCounters, SaId, SaSpec, MIN_INBOUND_REPLAY_WINDOW,
};
use crate::gossip::members::{Member, MemberState};
use crate::handshake::{
    Config as HsConfig, Endpoint, Event, HandshakeContext, PublicKey, Role, Session, SpiAllocError,
    StaticKeypair,
};
use crate::identity::decode_public;
use crate::throttle::LogThrottle;

/// How often a pending responder session's inbound counters are checked.
const CONFIRM_POLL: Duration = Duration::from_millis(100);

/// When an inbound SA reaches its soft limit, the peer (whose outbound SA
/// reached it at the same moment) is expected to re-key; we step in only if
/// it has not within this delay. Keeps the two ends from racing.
pub const INBOUND_LIMIT_DELAY: Duration = Duration::from_secs(2);

/// Kernel table changes are coalesced for this long before a resync.
const KERNEL_EVENT_DELAY: Duration = Duration::from_millis(200);

/// Inbound anti-replay window for every SA meshsec installs.
pub const REPLAY_WINDOW: u32 = 4096;

/// One (peer, family) link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId {
    /// The peer's static public key.
    pub peer: PublicKey,
    /// Address family.
    pub family: AddressFamily,
}

/// Where a link goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Peer name (for logs and the listing).
    pub name: String,
    /// Our data address of this family.
    pub local: IpAddr,
    /// The peer's data address of this family.
    pub remote: IpAddr,
    /// The peer's handshake endpoint.
    pub handshake: SocketAddr,
}

/// The links this node wants: every other member that is alive or suspect,
/// or dead for less than `grace` (a short flap breaks nothing), that
/// published a key, a handshake port and an address of a family we have.
/// Left members are dropped at once.
///
/// Addresses are checked, since a member could publish anything: only
/// unicast addresses that are not ours count, and an address (or a key)
/// claimed by two members is used for neither, so one member can never make
/// us require ESP towards somebody else.
pub fn wanted_links(
    self_key: &PublicKey,
    self_addrs: &[IpAddr],
    members: &[Member],
    grace: Duration,
) -> BTreeMap<LinkId, Target> {
    let mut claims: HashMap<IpAddr, usize> = HashMap::new();
    let mut keys: HashMap<PublicKey, usize> = HashMap::new();
    for m in members.iter().filter(|m| !m.is_self) {
        for a in &m.data_addrs {
            *claims.entry(*a).or_default() += 1;
        }
        if let Some(k) = m.public_key.as_deref().and_then(decode_public) {
            *keys.entry(k).or_default() += 1;
        }
    }
    let usable = |a: &IpAddr| {
        usable_peer_address(a)
            && !self_addrs.contains(a)
            && claims.get(a).copied().unwrap_or(0) == 1
    };
    let mut out = BTreeMap::new();
    for m in members {
        if m.is_self {
            continue;
        }
        let keep = match m.state {
            MemberState::Alive | MemberState::Suspect => true,
            MemberState::Dead => Duration::from_millis(m.last_heard_ms) < grace,
            MemberState::Left => false,
        };
        let (Some(key), Some(port)) = (
            m.public_key.as_deref().and_then(decode_public),
            m.handshake_port,
        ) else {
            continue;
        };
        if !keep
            || &key == self_key
            || keys.get(&key).copied().unwrap_or(0) != 1
            || m.protocol != Some(1)
        {
            continue;
        }
        for family in [AddressFamily::V4, AddressFamily::V6] {
            let local = self_addrs.iter().find(|a| AddressFamily::of(**a) == family);
            let remote = m
                .data_addrs
                .iter()
                .find(|a| AddressFamily::of(**a) == family && usable(a));
            if let (Some(local), Some(remote)) = (local, remote) {
                out.insert(
                    LinkId { peer: key, family },
                    Target {
                        name: m.name.clone(),
                        local: *local,
                        remote: *remote,
                        handshake: SocketAddr::new(*remote, port),
                    },
                );
            }
        }
    }
    out
}

/// Whether a peer may be protected under this address: unicast, not
/// unspecified, loopback, multicast or broadcast.
pub fn usable_peer_address(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified() || v4.is_loopback() || v4.is_multicast() || v4.is_broadcast())
        }
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_loopback() || v6.is_multicast()),
    }
}

/// The SAs and policies of one established link.
pub fn link_objects(
    target: &Target,
    session: &Session,
    lifetimes: Lifetimes,
) -> (SaSpec, SaSpec, [PolicySpec; 2]) {
    let aead = session.algorithm;
    let inbound = SaSpec {
        src: target.remote,
        dst: target.local,
        spi: session.local_spi,
        direction: Direction::In,
        reqid: Reqid::DEFAULT,
        aead,
        key: session.key_in.as_bytes().to_vec(),
        replay_window: REPLAY_WINDOW.max(MIN_INBOUND_REPLAY_WINDOW),
        lifetimes,
    };
    let outbound = SaSpec {
        src: target.local,
        dst: target.remote,
        spi: session.peer_spi,
        direction: Direction::Out,
        reqid: Reqid::DEFAULT,
        aead,
        key: session.key_out.as_bytes().to_vec(),
        replay_window: 0,
        lifetimes,
    };
    (
        inbound,
        outbound,
        PolicySpec::pair(target.local, target.remote, Reqid::DEFAULT),
    )
}

/// The kernel ids of a session's (inbound, outbound) SAs on a link.
fn sa_ids(target: &Target, session: &Session) -> (SaId, SaId) {
    (
        SaId {
            dst: target.local,
            spi: session.local_spi,
        },
        SaId {
            dst: target.remote,
            spi: session.peer_spi,
        },
    )
}

/// Per-link state shown in `meshsec members`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SaState {
    /// No session and no handshake under way.
    None,
    /// A handshake is under way (or keys are being installed).
    Handshaking,
    /// Both SAs and both policies are in the kernel.
    Established,
}

/// One link as the listing shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// Our address.
    pub local: IpAddr,
    /// Peer address.
    pub remote: IpAddr,
    /// SA state.
    pub sa: SaState,
    /// Inbound SPI (ours), hex.
    pub spi_in: Option<String>,
    /// Outbound SPI (the peer's), hex.
    pub spi_out: Option<String>,
    /// AEAD in use.
    pub aead: Option<String>,
    /// Unix time (s) the current SAs were installed.
    pub established_at: Option<u64>,
    /// Inbound SA counters from the kernel.
    pub bytes_in: u64,
    /// Inbound packets.
    pub packets_in: u64,
    /// Outbound bytes.
    pub bytes_out: u64,
    /// Outbound packets.
    pub packets_out: u64,
    /// Inbound packets dropped as replays.
    pub replay_drops: u32,
    /// Inbound packets that failed the integrity check.
    pub integrity_failures: u32,
}

struct Link {
    target: Target,
    /// The session whose SAs carry traffic (or are being installed).
    session: Option<Session>,
    /// A session we answered as responder, not yet confirmed: only its
    /// inbound SA is installed until the initiator's first ESP packet arrives
    /// on it (a replayed initiation can never produce one), then it replaces
    /// `session` (make-before-break). Dropped at its deadline.
    pending: Option<(Session, Instant)>,
    /// Inbound SAs of replaced sessions, kept until the deadline for packets in flight.
    retiring: Vec<(SaSpec, Instant)>,
    /// When to re-key this link (time-based, with jitter; `meshsec rekey` sets it to now).
    rekey_at: Option<Instant>,
    /// Both SAs of the current session confirmed in the kernel.
    installed: bool,
    /// The link's policies are in force: set once its first SAs went in,
    /// cleared only when the link is removed or its addresses change. While
    /// a link re-keys, its policies stay, so the kernel drops traffic
    /// (never sends it in clear) until the new SAs are in.
    protected: bool,
    established_at: Option<u64>,
    next_attempt: Instant,
    failures: u32,
}

/// Counters of the mesh itself (handshake endpoints keep their own).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MeshCounters {
    /// Sessions established.
    pub sessions_established: u64,
    /// Handshakes that failed or timed out.
    pub handshakes_failed: u64,
    /// Kernel changes applied.
    pub changes_applied: u64,
    /// Kernel changes that failed.
    pub changes_failed: u64,
    /// Installed SAs found missing from the kernel (links re-keyed).
    pub sas_vanished: u64,
    /// Datagrams the handshake layer rejected.
    pub handshake_rejected: u64,
    /// Re-keys started (time-based or forced).
    pub rekeys_started: u64,
    /// Responder sessions confirmed by the initiator's first ESP packet.
    pub sessions_confirmed: u64,
    /// Responder sessions dropped unconfirmed (e.g. a replayed initiation).
    pub sessions_unconfirmed: u64,
    /// Soft-expire notifications from the kernel for current SAs (byte,
    /// packet or time limit reached).
    pub kernel_soft_expires: u64,
    /// Hard-expire notifications from the kernel for current SAs (the
    /// kernel deleted one in use: its link re-keyed too late).
    pub kernel_hard_expires: u64,
    /// Current SAs found at a soft limit, by notification or by the
    /// counter check at resync (which covers lost notifications); each
    /// schedules a re-key of its link.
    pub soft_limits_reached: u64,
    /// Kernel event notifications lost to a full socket buffer.
    pub kernel_event_overruns: u64,
}

/// Mesh settings.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Cluster-wide ESP algorithm.
    pub algorithm: Aead,
    /// How long a dead member keeps its SAs.
    pub dead_grace: Duration,
    /// SA lifetimes.
    pub lifetimes: Lifetimes,
    /// Handshake protocol settings.
    pub handshake: HsConfig,
    /// Re-key every link this often (± 10 % jitter).
    pub rekey_interval: Duration,
    /// How long a responder session may wait for the initiator's first ESP packet.
    pub confirm_timeout: Duration,
    /// How long replaced inbound SAs stay for packets in flight.
    pub retire_after: Duration,
    /// How long SAs and policies found in the kernel at start-up (left by a
    /// previous run of the agent) are kept while their links re-key.
    pub adopt_grace: Duration,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            algorithm: Aead::Aes128Gcm,
            dead_grace: Duration::from_secs(60),
            lifetimes: crate::config::RekeyPolicy::default().lifetimes(),
            handshake: HsConfig::default(),
            rekey_interval: Duration::from_secs(3600),
            confirm_timeout: Duration::from_secs(10),
            retire_after: Duration::from_secs(10),
            adopt_grace: Duration::from_secs(120),
        }
    }
}

/// The mesh state machine.
pub struct Mesh {
    config: MeshConfig,
    self_key: PublicKey,
    self_addrs: Vec<IpAddr>,
    endpoints: BTreeMap<AddressFamily, Endpoint>,
    links: BTreeMap<LinkId, Link>,
    counters: MeshCounters,
    kernel_counters: HashMap<SaId, SaCounters>,
    dirty: bool,
    error_log: LogThrottle,
    /// Which session (by id) put each SA into the kernel.
    installed_by: HashMap<SaId, u64>,
    /// Confirmation probes to send through the new outbound SA: (family, peer handshake address).
    probes: std::collections::VecDeque<(AddressFamily, SocketAddr, SaId)>,
    last_reconcile: Instant,
    /// What a previous run left in the kernel, read at the first reconcile:
    /// kept (never re-added) until each link has fresh SAs, or the deadline.
    adopted: Option<Adopted>,
    /// Current SAs already found at their soft limit (each acts once).
    limits_seen: std::collections::HashSet<SaId>,
    /// A kernel table change was announced: resync at this instant.
    kernel_resync_at: Option<Instant>,
}

struct Adopted {
    sas: Vec<SaSpec>,
    policies: Vec<PolicySpec>,
    deadline: Instant,
}

struct Ctx<'a> {
    family: AddressFamily,
    links: &'a BTreeMap<LinkId, Link>,
    dp: &'a mut dyn Datapath,
}

impl HandshakeContext for Ctx<'_> {
    fn is_member(&self, peer: &PublicKey) -> bool {
        self.links.contains_key(&LinkId {
            peer: *peer,
            family: self.family,
        })
    }

    fn alloc_spi(&mut self, peer: &PublicKey) -> Result<u32, SpiAllocError> {
        let link = self
            .links
            .get(&LinkId {
                peer: *peer,
                family: self.family,
            })
            .ok_or_else(|| SpiAllocError("not a member".into()))?;
        self.dp
            .alloc_spi(link.target.remote, link.target.local, Reqid::DEFAULT)
            .map_err(|e| SpiAllocError(e.to_string()))
    }
}

impl Mesh {
    /// A mesh for this node. `self_addrs` are our data addresses (the first
    /// of each family is used).
    pub fn new(
        config: MeshConfig,
        keypair: StaticKeypair,
        keyring: &[[u8; 32]],
        self_addrs: Vec<IpAddr>,
        now: Instant,
    ) -> Result<Mesh, crate::handshake::ConfigError> {
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut hs = config.handshake.clone();
        hs.algorithm = config.algorithm;
        let mut endpoints = BTreeMap::new();
        for family in [AddressFamily::V4, AddressFamily::V6] {
            if self_addrs.iter().any(|a| AddressFamily::of(*a) == family) {
                endpoints.insert(
                    family,
                    Endpoint::new(hs.clone(), keypair.clone(), keyring, now, unix_now)?,
                );
            }
        }
        Ok(Mesh {
            config,
            self_key: *keypair.public(),
            self_addrs,
            endpoints,
            links: BTreeMap::new(),
            counters: MeshCounters::default(),
            kernel_counters: HashMap::new(),
            dirty: true,
            error_log: LogThrottle::new(Duration::from_secs(5)),
            installed_by: HashMap::new(),
            probes: std::collections::VecDeque::new(),
            last_reconcile: now,
            adopted: None,
            limits_seen: Default::default(),
            kernel_resync_at: None,
        })
    }

    /// Families this node has data addresses in.
    pub fn families(&self) -> Vec<AddressFamily> {
        self.endpoints.keys().copied().collect()
    }

    /// Mesh counters.
    pub fn counters(&self) -> &MeshCounters {
        &self.counters
    }

    /// Handshake counters per family, summed into one name → value map.
    pub fn handshake_counters(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for ep in self.endpoints.values() {
            for (k, v) in crate::control::counter_map(ep.counters()) {
                *out.entry(k).or_insert(0) += v;
            }
        }
        out
    }

    /// Updates the wanted links from a membership view.
    pub fn set_members(&mut self, now: Instant, members: &[Member], dp: &mut dyn Datapath) {
        let wanted = wanted_links(
            &self.self_key,
            &self.self_addrs,
            members,
            self.config.dead_grace,
        );
        let gone: Vec<LinkId> = self
            .links
            .keys()
            .filter(|id| !wanted.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            let link = self.links.remove(&id).expect("present");
            info!(peer = %link.target.name, family = %id.family, "link removed");
            if let Some(ep) = self.endpoints.get_mut(&id.family) {
                if let Some(spi) = ep.forget(&id.peer) {
                    let _ = dp.delete_sa(SaId {
                        dst: link.target.local,
                        spi,
                    });
                }
            }
            self.dirty = true;
        }
        for (id, target) in wanted {
            match self.links.get_mut(&id) {
                Some(link) if link.target == target => {}
                Some(link) => {
                    // Addresses changed: the old session's SAs no longer fit.
                    info!(peer = %target.name, family = %id.family, "link addresses changed; re-keying");
                    link.target = target;
                    link.session = None;
                    link.installed = false;
                    link.protected = false;
                    link.next_attempt = now;
                    if let Some(ep) = self.endpoints.get_mut(&id.family) {
                        if let Some(spi) = ep.cancel(&id.peer) {
                            let _ = dp.delete_sa(SaId {
                                dst: link.target.local,
                                spi,
                            });
                        }
                    }
                    self.dirty = true;
                }
                None => {
                    debug!(peer = %target.name, family = %id.family, "link wanted");
                    self.links.insert(
                        id,
                        Link {
                            target,
                            session: None,
                            pending: None,
                            retiring: Vec::new(),
                            rekey_at: None,
                            installed: false,
                            protected: false,
                            established_at: None,
                            next_attempt: now,
                            failures: 0,
                        },
                    );
                }
            }
        }
    }

    /// Handles one handshake datagram received on the socket of `family`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        family: AddressFamily,
        from: SocketAddr,
        datagram: &[u8],
        dp: &mut dyn Datapath,
    ) {
        let Some(ep) = self.endpoints.get_mut(&family) else {
            return;
        };
        let mut ctx = Ctx {
            family,
            links: &self.links,
            dp,
        };
        if let Err(reason) = ep.handle(now, from, datagram, &mut ctx) {
            self.counters.handshake_rejected += 1;
            debug!(%from, %reason, "handshake datagram rejected");
        }
        self.drain_events(now, family, dp);
    }

    /// Drives timers: retransmits, new initiations, and (when something
    /// changed or `resync` is set) reconciliation with the kernel.
    pub fn handle_timeout(&mut self, now: Instant, dp: &mut dyn Datapath, resync: bool) {
        for (family, ep) in self.endpoints.iter_mut() {
            ep.handle_timeout(now);
            let _ = family;
        }
        for family in self.families() {
            self.drain_events(now, family, dp);
        }
        self.initiate_due(now, dp);
        let poll_due = self.needs_kernel_poll() && now >= self.last_reconcile + CONFIRM_POLL;
        let kernel_due = self.kernel_resync_at.is_some_and(|t| now >= t);
        if self.dirty || resync || poll_due || kernel_due {
            self.kernel_resync_at = None;
            self.reconcile(now, dp);
        }
    }

    /// Acts on an event the kernel announced (see [`crate::datapath::XfrmMonitor`]):
    /// a soft expire re-keys the link the SA belongs to, a hard expire or a
    /// change to the tables makes the mesh re-read the kernel.
    pub fn handle_kernel_event(&mut self, now: Instant, event: KernelEvent) {
        match event {
            KernelEvent::Expire { sa, hard: false } => {
                if self.soft_limit_reached(now, sa, "kernel soft-expire notification") {
                    self.counters.kernel_soft_expires += 1;
                }
            }
            KernelEvent::Expire { sa, hard: true } => {
                // Larval SAs of abandoned handshakes expire too (after
                // net.core.xfrm_acq_expires); only a current SA's matters.
                if self.session_of(&sa).is_some() {
                    self.counters.kernel_hard_expires += 1;
                    warn!(sa = %sa, "SA reached its hard lifetime limit and was deleted by the kernel; re-keying");
                }
                self.dirty = true;
            }
            KernelEvent::TablesChanged => {
                let at = now + KERNEL_EVENT_DELAY;
                self.kernel_resync_at.get_or_insert(at);
            }
            KernelEvent::Overrun => {
                self.counters.kernel_event_overruns += 1;
                self.dirty = true;
            }
        }
    }

    /// Schedules a re-key of the link whose current session owns `sa`: at
    /// once for our outbound SA, after [`INBOUND_LIMIT_DELAY`] for our inbound
    /// SA (the peer's outbound). Each SA acts once. Returns whether `sa` is a
    /// current SA of some link.
    fn soft_limit_reached(&mut self, now: Instant, sa: SaId, via: &str) -> bool {
        for (id, link) in self.links.iter_mut() {
            let Some(session) = &link.session else {
                continue;
            };
            let (inbound, outbound) = sa_ids(&link.target, session);
            let delay = if sa == outbound {
                Duration::ZERO
            } else if sa == inbound {
                INBOUND_LIMIT_DELAY
            } else {
                continue;
            };
            if !self.limits_seen.insert(sa) {
                return true;
            }
            self.counters.soft_limits_reached += 1;
            let at = now + delay;
            link.rekey_at = Some(link.rekey_at.map_or(at, |t| t.min(at)));
            info!(peer = %link.target.name, family = %id.family, sa = %sa, via, "SA reached its soft lifetime limit; re-keying");
            return true;
        }
        false
    }

    /// The next instant [`Mesh::handle_timeout`] is needed (without resync).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let eps = self
            .endpoints
            .values()
            .filter_map(|e| e.poll_timeout())
            .min();
        let attempts = self
            .links
            .iter()
            .filter(|(id, l)| {
                l.session.is_none()
                    && l.pending.is_none()
                    && !self
                        .endpoints
                        .get(&id.family)
                        .is_some_and(|e| e.is_initiating(&id.peer))
            })
            .map(|(_, l)| l.next_attempt)
            .min();
        let rekeys = self
            .links
            .iter()
            .filter(|(id, l)| {
                l.pending.is_none()
                    && !self
                        .endpoints
                        .get(&id.family)
                        .is_some_and(|e| e.is_initiating(&id.peer))
            })
            .filter_map(|(_, l)| l.rekey_at)
            .min();
        // Pending confirmations and retiring SAs need the kernel re-read soon.
        let kernel = self
            .needs_kernel_poll()
            .then_some(self.last_reconcile + CONFIRM_POLL);
        [eps, attempts, rekeys, kernel, self.kernel_resync_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// The next datagram to send, with the family of the socket to use.
    pub fn poll_transmit(&mut self) -> Option<(AddressFamily, SocketAddr, Vec<u8>)> {
        for (family, ep) in self.endpoints.iter_mut() {
            if let Some((to, bytes)) = ep.poll_transmit() {
                return Some((*family, to, bytes));
            }
        }
        None
    }

    fn needs_kernel_poll(&self) -> bool {
        self.links
            .values()
            .any(|l| l.pending.is_some() || !l.retiring.is_empty())
            || self
                .adopted
                .as_ref()
                .is_some_and(|a| !a.sas.is_empty() || !a.policies.is_empty())
    }

    /// The next confirmation probe to send *through ESP* (from a socket without
    /// XFRM bypass, bound to our data address) to the peer's handshake port,
    /// with the outbound SA it should travel on.
    pub fn poll_probe(&mut self) -> Option<(AddressFamily, SocketAddr, SaId)> {
        self.probes.pop_front()
    }

    /// Replaces the cluster secret keyring of every handshake endpoint (the
    /// first secret initiates, all are accepted). Established sessions and
    /// their SAs are untouched; handshakes in flight under a replaced
    /// initiating secret start again at once under the new one.
    pub fn set_keyring(
        &mut self,
        now: Instant,
        keyring: &[[u8; 32]],
        dp: &mut dyn Datapath,
    ) -> Result<(), crate::handshake::ConfigError> {
        for (family, ep) in self.endpoints.iter_mut() {
            for (peer, spi) in ep.set_keyring(keyring)? {
                free_spi(&self.self_addrs, *family, spi, dp);
                if let Some(link) = self.links.get_mut(&LinkId {
                    peer,
                    family: *family,
                }) {
                    link.next_attempt = now;
                    if link.session.is_some() {
                        link.rekey_at = Some(now);
                    }
                }
            }
        }
        Ok(())
    }

    /// Re-keys every link (or those to `peer_name`) now. Returns how many.
    pub fn force_rekey(&mut self, now: Instant, peer_name: Option<&str>) -> usize {
        let mut n = 0;
        for link in self.links.values_mut() {
            if link.session.is_some() && peer_name.is_none_or(|p| p == link.target.name) {
                link.rekey_at = Some(now);
                n += 1;
            }
        }
        n
    }

    fn initiate_due(&mut self, now: Instant, dp: &mut dyn Datapath) {
        for (id, link) in self.links.iter_mut() {
            let rekey = link.session.is_some()
                && link.pending.is_none()
                && link.rekey_at.is_some_and(|t| now >= t);
            if !rekey
                && (link.session.is_some() || link.pending.is_some() || now < link.next_attempt)
            {
                continue;
            }
            let Some(ep) = self.endpoints.get_mut(&id.family) else {
                continue;
            };
            if ep.is_initiating(&id.peer) {
                continue;
            }
            if rekey {
                // Retried at the normal backoff if this attempt fails.
                link.rekey_at = Some(now + backoff(link.failures));
                self.counters.rekeys_started += 1;
                info!(peer = %link.target.name, family = %id.family, "re-keying");
            }
            link.next_attempt = now + backoff(link.failures);
            let spi = match dp.alloc_spi(link.target.remote, link.target.local, Reqid::DEFAULT) {
                Ok(spi) => spi,
                Err(e) => {
                    warn!(peer = %link.target.name, family = %id.family, error = %e, "cannot allocate an SPI");
                    link.failures += 1;
                    continue;
                }
            };
            if let Err(e) = ep.initiate(now, id.peer, link.target.handshake, spi) {
                debug!(peer = %link.target.name, error = %e, "initiate refused");
                let _ = dp.delete_sa(SaId {
                    dst: link.target.local,
                    spi,
                });
            } else {
                debug!(peer = %link.target.name, family = %id.family, spi = format_args!("0x{spi:08x}"), "handshake initiated");
            }
        }
    }

    fn drain_events(&mut self, now: Instant, family: AddressFamily, dp: &mut dyn Datapath) {
        let Some(ep) = self.endpoints.get_mut(&family) else {
            return;
        };
        while let Some(ev) = ep.poll_event() {
            match ev {
                Event::Established(session) => {
                    let id = LinkId {
                        peer: session.peer,
                        family,
                    };
                    let Some(link) = self.links.get_mut(&id) else {
                        // Raced with the member leaving: free the SPI (reserved on our address).
                        free_spi(&self.self_addrs, family, session.local_spi, dp);
                        continue;
                    };
                    info!(
                        peer = %link.target.name, family = %family, role = ?session.role,
                        spi_in = format_args!("0x{:08x}", session.local_spi),
                        spi_out = format_args!("0x{:08x}", session.peer_spi),
                        "session established"
                    );
                    self.counters.sessions_established += 1;
                    link.failures = 0;
                    self.dirty = true;
                    match session.role {
                        // The responder installed its inbound SA before it
                        // answered, so we switch at once.
                        Role::Initiator => {
                            link.switch_to(session, now, &self.config);
                        }
                        Role::Responder => {
                            if let Some((stale, _)) = link.pending.take() {
                                free_spi(&self.self_addrs, family, stale.local_spi, dp);
                            }
                            link.pending = Some((session, now + self.config.confirm_timeout));
                        }
                    }
                }
                Event::Failed {
                    peer,
                    local_spi,
                    reason,
                } => {
                    self.counters.handshakes_failed += 1;
                    let id = LinkId { peer, family };
                    if let Some(link) = self.links.get_mut(&id) {
                        link.failures += 1;
                        link.next_attempt = now + backoff(link.failures);
                        debug!(peer = %link.target.name, family = %family, ?reason, "handshake failed");
                    }
                    free_spi(&self.self_addrs, family, local_spi, dp);
                }
            }
        }
    }

    /// Makes the kernel match the established sessions: a pure diff of
    /// desired against dumped state, applied in order (SAs before policies,
    /// additions before deletions).
    pub fn reconcile(&mut self, now: Instant, dp: &mut dyn Datapath) {
        self.last_reconcile = now;
        let dumped = match (dp.dump_sas(), dp.dump_policies()) {
            (Ok(s), Ok(p)) => (s, p),
            (Err(e), _) | (_, Err(e)) => {
                self.log_error(now, &format!("cannot read the kernel's XFRM state: {e}"));
                return;
            }
        };
        self.kernel_counters = dumped.0.iter().map(|s| (s.id(), s.counters)).collect();
        let actual = KernelState::from_dumps(&dumped.0, &dumped.1);
        self.adopt(now, &actual);
        self.check_soft_limits(now);

        // Confirmation: the initiator's first ESP packet on a pending session's
        // inbound SA proves it holds the keys; the session then takes over.
        for (id, link) in self.links.iter_mut() {
            let Some((pending, deadline)) = &link.pending else {
                continue;
            };
            let (in_id, _) = sa_ids(&link.target, pending);
            let confirmed = self
                .kernel_counters
                .get(&in_id)
                .is_some_and(|c| c.packets > 0);
            if confirmed {
                let (session, _) = link.pending.take().expect("checked");
                info!(peer = %link.target.name, family = %id.family, "responder session confirmed by the peer's traffic");
                self.counters.sessions_confirmed += 1;
                link.switch_to(session, now, &self.config);
            } else if now >= *deadline {
                warn!(peer = %link.target.name, family = %id.family, "responder session never confirmed; dropping it");
                self.counters.sessions_unconfirmed += 1;
                link.pending = None;
                if link.session.is_none() {
                    link.next_attempt = now;
                }
            }
        }
        for link in self.links.values_mut() {
            link.retiring.retain(|(_, deadline)| now < *deadline);
        }

        // An installed link whose SA vanished gets fresh keys, never the old ones again.
        for link in self.links.values_mut() {
            let Some(session) = &link.session else {
                continue;
            };
            if !link.installed {
                continue;
            }
            let (inb, outb) = sa_ids(&link.target, session);
            if !actual.sas.contains_key(&inb) || !actual.sas.contains_key(&outb) {
                warn!(peer = %link.target.name, "installed SA missing from the kernel; re-keying the link");
                self.counters.sas_vanished += 1;
                link.session = None;
                link.installed = false;
                link.established_at = None;
                link.next_attempt = now;
            }
        }

        let mut desired = KernelState::default();
        if let Some(adopted) = &self.adopted {
            for sa in adopted
                .sas
                .iter()
                .filter(|sa| actual.sas.contains_key(&sa.id()))
            {
                desired.sas.insert(sa.id(), sa.clone());
            }
            for p in &adopted.policies {
                desired.policies.insert(p.id, *p);
            }
        }
        for link in self.links.values() {
            if link.protected {
                for p in PolicySpec::pair(link.target.local, link.target.remote, Reqid::DEFAULT) {
                    desired.policies.insert(p.id, p);
                }
            }
            // Retiring inbound SAs stay while present; a vanished one is not re-added.
            for (sa, _) in &link.retiring {
                if actual.sas.contains_key(&sa.id()) {
                    desired.sas.insert(sa.id(), sa.clone());
                }
            }
            if let Some((pending, _)) = &link.pending {
                let (inb, _, _) = link_objects(&link.target, pending, self.config.lifetimes);
                desired.sas.insert(inb.id(), inb);
            }
            let Some(session) = &link.session else {
                continue;
            };
            let (inb, outb, pols) = link_objects(&link.target, session, self.config.lifetimes);
            desired.sas.insert(inb.id(), inb);
            desired.sas.insert(outb.id(), outb);
            for p in pols {
                desired.policies.insert(p.id, p);
            }
        }
        let mut changes = diff(&desired, &actual);
        // The kernel identifies an SA by (dst, SPI) and the outbound SPI is the
        // peer's choice: an SA already there under a desired id but put there
        // by another session holds another key, so it is replaced.
        let mut replaced = Vec::new();
        for (id, sa) in &desired.sas {
            if !actual.sas.contains_key(id) {
                continue;
            }
            let wanted_by = self.session_of(id);
            if let (Some(want), Some(had)) = (wanted_by, self.installed_by.get(id)) {
                if want != *had {
                    replaced.push(Change::DeleteSa(*id));
                    replaced.push(Change::AddSa(sa.clone()));
                }
            }
        }
        if !replaced.is_empty() {
            replaced.append(&mut changes);
            changes = replaced;
        }
        let mut failed_sas = Vec::new();
        for change in &changes {
            let result = match change {
                // The inbound SPI came from ALLOCSPI: fill that larval SA.
                Change::FillSa(sa) => match dp.update_sa(sa) {
                    Err(e) if e.kind() == ErrorKind::NotFound => dp.install_sa(sa),
                    other => other,
                },
                Change::AddSa(sa) => dp.install_sa(sa),
                Change::DeleteSa(id) => match dp.delete_sa(*id) {
                    Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                    other => other,
                },
                Change::AddPolicy(p) => dp.install_policy(p),
                Change::DeletePolicy(id) => match dp.delete_policy(*id) {
                    Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                    other => other,
                },
            };
            match result {
                Ok(()) => {
                    self.counters.changes_applied += 1;
                    match change {
                        Change::AddSa(sa) | Change::FillSa(sa) => {
                            if let Some(sid) = self.session_of(&sa.id()) {
                                self.installed_by.insert(sa.id(), sid);
                            }
                        }
                        Change::DeleteSa(id) => {
                            self.installed_by.remove(id);
                        }
                        _ => {}
                    }
                    debug!(change = %change, "applied");
                }
                Err(e) => {
                    self.counters.changes_failed += 1;
                    if let Change::AddSa(sa) | Change::FillSa(sa) = change {
                        failed_sas.push(sa.id());
                    }
                    self.log_error(now, &format!("{change}: {e}"));
                }
            }
        }
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for link in self.links.values_mut() {
            let Some(session) = &link.session else {
                continue;
            };
            let (inb, outb) = sa_ids(&link.target, session);
            if failed_sas.contains(&inb) || failed_sas.contains(&outb) {
                // Keys that did not go in are not retried: new handshake, new keys.
                link.session = None;
                link.failures += 1;
                link.next_attempt = now + backoff(link.failures);
                continue;
            }
            if !link.installed {
                link.installed = true;
                link.protected = true;
                link.rekey_at =
                    Some(now + jittered(self.config.rekey_interval, session.session_id));
                if session.role == Role::Initiator {
                    // Prove to the responder that we hold the keys: a datagram
                    // through the new outbound SA confirms its session.
                    let family = AddressFamily::of(link.target.local);
                    self.probes.push_back((family, link.target.handshake, outb));
                }
                link.established_at = Some(unix_now);
                info!(peer = %link.target.name, family = if link.target.local.is_ipv4() { "ipv4" } else { "ipv6" }, "SAs and policies installed");
            }
        }
        // Failed links leave desired state; the next pass removes their leftovers.
        self.dirty = !failed_sas.is_empty();
    }

    /// The counters' view of soft limits: catches what a lost (or never
    /// received) kernel notification would have reported.
    fn check_soft_limits(&mut self, now: Instant) {
        let kernel_counters = &self.kernel_counters;
        self.limits_seen
            .retain(|id| kernel_counters.contains_key(id));
        let l = self.config.lifetimes;
        let over = |c: &SaCounters| {
            (l.soft_packets > 0 && c.packets >= l.soft_packets)
                || (l.soft_bytes > 0 && c.bytes >= l.soft_bytes)
        };
        let mut reached = Vec::new();
        for link in self.links.values().filter(|l| l.installed) {
            let Some(session) = &link.session else {
                continue;
            };
            let (inbound, outbound) = sa_ids(&link.target, session);
            for sa in [outbound, inbound] {
                if !self.limits_seen.contains(&sa)
                    && self.kernel_counters.get(&sa).is_some_and(over)
                {
                    reached.push(sa);
                }
            }
        }
        for sa in reached {
            self.soft_limit_reached(now, sa, "counter check");
        }
    }

    /// Takes over what a previous run left (first call), and lets go of it
    /// link by link as fresh SAs replace it: adopted outbound SAs go, adopted
    /// inbound SAs retire like any replaced inbound SA.
    fn adopt(&mut self, now: Instant, actual: &KernelState) {
        if self.adopted.is_none() {
            let sas: Vec<SaSpec> = actual.sas.values().cloned().collect();
            let policies: Vec<PolicySpec> = actual.policies.values().copied().collect();
            if !sas.is_empty() || !policies.is_empty() {
                info!(
                    sas = sas.len(),
                    policies = policies.len(),
                    "adopted SAs and policies left by a previous run; re-keying them"
                );
            }
            self.adopted = Some(Adopted {
                sas,
                policies,
                deadline: now + self.config.adopt_grace,
            });
            return;
        }
        let retire_after = self.config.retire_after;
        let Some(adopted) = self.adopted.as_mut() else {
            return;
        };
        if now >= adopted.deadline {
            if !adopted.sas.is_empty() || !adopted.policies.is_empty() {
                info!(
                    sas = adopted.sas.len(),
                    "adoption period over; removing what no link replaced"
                );
            }
            adopted.sas.clear();
            adopted.policies.clear();
            return;
        }
        for link in self.links.values_mut() {
            let (local, remote) = (link.target.local, link.target.remote);
            if link.protected {
                adopted.policies.retain(|p| {
                    !((p.id.src == local && p.id.dst == remote)
                        || (p.id.src == remote && p.id.dst == local))
                });
            }
            if !link.installed {
                continue;
            }
            adopted.sas.retain(|sa| {
                let ours =
                    (sa.src == local && sa.dst == remote) || (sa.src == remote && sa.dst == local);
                if ours && sa.direction == Direction::In {
                    link.retiring.push((sa.clone(), now + retire_after));
                }
                !ours
            });
        }
    }

    /// Links per peer name, for the listing.
    pub fn link_status(&self) -> BTreeMap<String, Vec<LinkStatus>> {
        let mut out: BTreeMap<String, Vec<LinkStatus>> = BTreeMap::new();
        for (id, link) in &self.links {
            let ep_busy = self
                .endpoints
                .get(&id.family)
                .is_some_and(|e| e.is_initiating(&id.peer));
            let mut st = LinkStatus {
                family: match id.family {
                    AddressFamily::V4 => "ipv4".into(),
                    AddressFamily::V6 => "ipv6".into(),
                },
                local: link.target.local,
                remote: link.target.remote,
                sa: if link.installed {
                    SaState::Established
                } else if link.session.is_some() || ep_busy {
                    SaState::Handshaking
                } else {
                    SaState::None
                },
                spi_in: None,
                spi_out: None,
                aead: None,
                established_at: link.established_at,
                bytes_in: 0,
                packets_in: 0,
                bytes_out: 0,
                packets_out: 0,
                replay_drops: 0,
                integrity_failures: 0,
            };
            if let (Some(session), true) = (&link.session, link.installed) {
                st.spi_in = Some(format!("0x{:08x}", session.local_spi));
                st.spi_out = Some(format!("0x{:08x}", session.peer_spi));
                st.aead = Some(session.algorithm.to_string());
                let (inbound, outbound) = sa_ids(&link.target, session);
                if let Some(c) = self.kernel_counters.get(&inbound) {
                    st.bytes_in = c.bytes;
                    st.packets_in = c.packets;
                    st.replay_drops = c.replay;
                    st.integrity_failures = c.integrity_failed;
                }
                if let Some(c) = self.kernel_counters.get(&outbound) {
                    st.bytes_out = c.bytes;
                    st.packets_out = c.packets;
                }
            }
            out.entry(link.target.name.clone()).or_default().push(st);
        }
        out
    }

    /// Removes everything this mesh installed (graceful leave).
    pub fn remove_all(
        &mut self,
        dp: &mut dyn Datapath,
    ) -> Result<(usize, usize), crate::datapath::DatapathError> {
        self.links.clear();
        let r = dp.flush_owned()?;
        Ok((r.sas, r.policies))
    }

    /// The session whose SA has this id, if any link's current session has it.
    fn session_of(&self, id: &SaId) -> Option<u64> {
        self.links.values().find_map(|l| {
            let s = l.session.as_ref()?;
            let (local_in, out) = sa_ids(&l.target, s);
            (*id == local_in || *id == out).then_some(s.session_id)
        })
    }

    fn log_error(&mut self, now: Instant, msg: &str) {
        // One line per 5 s at most; the counters keep the full tally.
        if let Some(suppressed) = self.error_log.check(now, "error") {
            warn!(suppressed, "{msg}");
        }
    }
}

/// `base` ± 10 %, spread deterministically by `seed` so pairs do not re-key in lockstep.
fn jittered(base: Duration, seed: u64) -> Duration {
    let permille = 900 + (seed % 201); // 900..=1100
    base * permille as u32 / 1000
}

impl Link {
    /// Makes `session` the one whose SAs carry traffic; the replaced
    /// session's inbound SA, if it was installed, retires for packets in flight.
    fn switch_to(&mut self, session: Session, now: Instant, config: &MeshConfig) {
        // The re-key deadline belonged to the replaced session; the new one
        // gets its own once installed (a stale one would re-key again at once).
        self.rekey_at = None;
        if let Some(old) = self.session.replace(session) {
            if self.installed {
                let (old_in, _, _) = link_objects(&self.target, &old, config.lifetimes);
                self.retiring.push((old_in, now + config.retire_after));
            }
        }
        self.installed = false;
    }
}

/// Frees an SPI reserved (ALLOCSPI) on our data address of `family`.
fn free_spi(self_addrs: &[IpAddr], family: AddressFamily, spi: u32, dp: &mut dyn Datapath) {
    if let Some(local) = self_addrs.iter().find(|a| AddressFamily::of(**a) == family) {
        let _ = dp.delete_sa(SaId { dst: *local, spi });
    }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1 << failures.min(5)).min(Duration::from_secs(30))
}

pub mod driver;

#[cfg(test)]
mod tests;
