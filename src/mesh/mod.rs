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
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::datapath::{
    AddressFamily, Aead, Change, Datapath, Direction, ErrorKind, KernelEvent, KernelState,
    Lifetimes, PolicySpec, Reqid, SaCounters, SaId, SaSpec,
};
use crate::gossip::members::Member;
use crate::handshake::{
    Config as HsConfig, Counters as HandshakeCounters, Endpoint, Event, HandshakeContext,
    PublicKey, Role, Session, SpiAllocError, StaticKeypair,
};
use crate::throttle::LogThrottle;

pub mod driver;
mod links;
mod plan;
mod status;

pub use links::{usable_peer_address, wanted_links, LinkId, Target};
pub use plan::{desired, link_objects, plan, sa_ids, AdoptedPlan, LinkPlan, REPLAY_WINDOW};
pub use status::{LinkState, LinkStatus, MeshCounters};

/// How often a pending responder session's inbound counters are checked.
const CONFIRM_POLL: Duration = Duration::from_millis(100);

/// When an inbound SA reaches its soft limit, the peer (whose outbound SA
/// reached it at the same moment) is expected to re-key; we step in only if
/// it has not within this delay. Keeps the two ends from racing.
pub const INBOUND_LIMIT_DELAY: Duration = Duration::from_secs(2);

/// Kernel table changes are coalesced for this long before a resync.
const KERNEL_EVENT_DELAY: Duration = Duration::from_millis(200);

/// How often the kernel state is re-read even when nothing happened (drift
/// repair, counters for the listing).
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(2);

/// Soft lifetime in seconds of every SA: a re-key backstop far beyond the
/// re-key interval.
pub const SA_SOFT_SECONDS: u64 = 23 * 3600;
/// Hard lifetime in seconds: the kernel deletes the SA.
pub const SA_HARD_SECONDS: u64 = 24 * 3600;

/// The SA lifetimes for optional byte/packet re-key limits: the limit is the
/// soft lifetime (the kernel announces it), twice the limit the hard one (a
/// safety net); 23 h / 24 h in time.
pub fn sa_lifetimes(after_bytes: Option<u64>, after_packets: Option<u64>) -> Lifetimes {
    let soft_bytes = after_bytes.unwrap_or(0);
    let soft_packets = after_packets.unwrap_or(0);
    Lifetimes {
        soft_bytes,
        hard_bytes: soft_bytes.saturating_mul(2),
        soft_packets,
        hard_packets: soft_packets.saturating_mul(2),
        soft_seconds: SA_SOFT_SECONDS,
        hard_seconds: SA_HARD_SECONDS,
    }
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
    /// How often the kernel is re-read even when nothing happened.
    pub resync_interval: Duration,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            algorithm: Aead::Aes128Gcm,
            dead_grace: Duration::from_secs(60),
            lifetimes: sa_lifetimes(None, None),
            handshake: HsConfig::default(),
            rekey_interval: Duration::from_secs(3600),
            confirm_timeout: Duration::from_secs(10),
            retire_after: Duration::from_secs(10),
            adopt_grace: Duration::from_secs(120),
            resync_interval: RESYNC_INTERVAL,
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
    /// The periodic resync is due at this instant.
    next_resync: Instant,
    /// (monotonic, wall-clock since the epoch) at start: wall time for the
    /// listing without reading a clock.
    wall_anchor: (Instant, Duration),
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
    /// of each family is used); `unix_now` is the wall-clock time at `now`
    /// (since the epoch). The first [`Mesh::handle_timeout`] resyncs.
    pub fn new(
        config: MeshConfig,
        keypair: StaticKeypair,
        keyring: &[[u8; 32]],
        self_addrs: Vec<IpAddr>,
        now: Instant,
        unix_now: Duration,
    ) -> Result<Mesh, crate::handshake::ConfigError> {
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
            next_resync: now,
            wall_anchor: (now, unix_now),
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
    pub fn handshake_counters(&self) -> HandshakeCounters {
        let mut out = HandshakeCounters::default();
        for ep in self.endpoints.values() {
            out.add(ep.counters());
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

    /// Drives timers: retransmits, new initiations, and reconciliation with
    /// the kernel when something changed, a confirmation or retirement needs
    /// the counters, a kernel event asked for it, or the periodic resync is
    /// due. Returns whether the periodic resync ran (fresh counters).
    pub fn handle_timeout(&mut self, now: Instant, dp: &mut dyn Datapath) -> bool {
        for ep in self.endpoints.values_mut() {
            ep.handle_timeout(now);
        }
        for family in self.families() {
            self.drain_events(now, family, dp);
        }
        self.initiate_due(now, dp);
        let resync = now >= self.next_resync;
        if resync {
            self.next_resync = now + self.config.resync_interval;
        }
        let poll_due = self.needs_kernel_poll() && now >= self.last_reconcile + CONFIRM_POLL;
        let kernel_due = self.kernel_resync_at.is_some_and(|t| now >= t);
        if self.dirty || resync || poll_due || kernel_due {
            self.kernel_resync_at = None;
            self.reconcile(now, dp);
        }
        resync
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

    /// The next instant [`Mesh::handle_timeout`] is needed: the earliest of
    /// the endpoints' timers, due initiations and re-keys, the counter poll,
    /// a kernel event's resync and the periodic resync (so never `None`
    /// today; an `Option` like the endpoints' for a driver's sake).
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
        // Something changed: reconcile, at most once per CONFIRM_POLL (a
        // kernel that keeps failing must not make a driver spin).
        let dirty = self.dirty.then_some(self.last_reconcile + CONFIRM_POLL);
        [
            eps,
            attempts,
            rekeys,
            kernel,
            self.kernel_resync_at,
            Some(self.next_resync),
            dirty,
        ]
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

    /// Makes the kernel match the links: observe (one dump of SAs and
    /// policies), update link state from it (confirmations, retirements,
    /// vanished SAs), plan (the pure [`desired`] and [`plan`]), apply the
    /// whole plan in one pipelined [`Datapath::apply`], record the outcome.
    pub fn reconcile(&mut self, now: Instant, dp: &mut dyn Datapath) {
        self.last_reconcile = now;
        let Some(actual) = self.observe(now, dp) else {
            return;
        };
        self.adopt(now, &actual);
        self.check_soft_limits(now);
        self.confirm_pending(now);
        for link in self.links.values_mut() {
            link.retiring.retain(|(_, deadline)| now < *deadline);
        }
        self.rekey_vanished(now, &actual);
        let changes = self.plan(&actual);
        let failed_sas = self.apply(now, &changes, dp);
        self.record(now, &failed_sas);
    }

    /// Reads the kernel's meshsec-owned SAs and policies (and the SAs'
    /// counters, for the listing and the soft-limit check).
    fn observe(&mut self, now: Instant, dp: &mut dyn Datapath) -> Option<KernelState> {
        let dumped = match (dp.dump_sas(), dp.dump_policies()) {
            (Ok(s), Ok(p)) => (s, p),
            (Err(e), _) | (_, Err(e)) => {
                self.log_error(now, &format!("cannot read the kernel's XFRM state: {e}"));
                return None;
            }
        };
        self.kernel_counters = dumped.0.iter().map(|s| (s.id(), s.counters)).collect();
        Some(KernelState::from_dumps(&dumped.0, &dumped.1))
    }

    /// Confirmation: the initiator's first ESP packet on a pending session's
    /// inbound SA proves it holds the keys; the session then takes over.
    fn confirm_pending(&mut self, now: Instant) {
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
    }

    /// An installed link whose SA vanished gets fresh keys, never the old ones again.
    fn rekey_vanished(&mut self, now: Instant, actual: &KernelState) {
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
    }

    /// The changes that make `actual` what the links want (pure, see [`plan`]).
    fn plan(&self, actual: &KernelState) -> Vec<Change> {
        let adopted = self
            .adopted
            .as_ref()
            .map(|a| AdoptedPlan {
                sas: &a.sas,
                policies: &a.policies,
            })
            .unwrap_or_default();
        let links = self.links.values().map(|l| l.plan());
        let desired = desired(links, adopted, actual, self.config.lifetimes);
        let wanted_by: HashMap<SaId, u64> = self
            .links
            .values()
            .filter_map(|l| {
                l.session
                    .as_ref()
                    .map(|s| (sa_ids(&l.target, s), s.session_id))
            })
            .flat_map(|((i, o), sid)| [(i, sid), (o, sid)])
            .collect();
        plan::plan(&desired, actual, &wanted_by, &self.installed_by)
    }

    /// Applies `changes` in one pipelined call and counts the outcome;
    /// returns the SAs that did not go in. A larval SA that expired before
    /// it was filled is added instead; deleting what is already gone is done.
    fn apply(&mut self, now: Instant, changes: &[Change], dp: &mut dyn Datapath) -> Vec<SaId> {
        let mut failed_sas = Vec::new();
        if changes.is_empty() {
            return failed_sas;
        }
        let results = dp.apply(changes);
        for (change, result) in changes.iter().zip(results) {
            let result = match (change, result) {
                (Change::FillSa(sa), Err(e)) if e.kind() == ErrorKind::NotFound => {
                    dp.install_sa(sa)
                }
                (Change::DeleteSa(_) | Change::DeletePolicy(_), Err(e))
                    if e.kind() == ErrorKind::NotFound =>
                {
                    Ok(())
                }
                (_, r) => r,
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
        failed_sas
    }

    /// Records what went in: links whose SAs failed start over with a new
    /// handshake (keys that did not go in are never retried); links whose
    /// SAs are all in become established (re-key timer, confirmation probe).
    fn record(&mut self, now: Instant, failed_sas: &[SaId]) {
        let unix_now = self.unix_secs(now);
        for link in self.links.values_mut() {
            let Some(session) = &link.session else {
                continue;
            };
            let (inb, outb) = sa_ids(&link.target, session);
            if failed_sas.contains(&inb) || failed_sas.contains(&outb) {
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
                let family = AddressFamily::of(link.target.local);
                if session.role == Role::Initiator {
                    // Prove to the responder that we hold the keys: a datagram
                    // through the new outbound SA confirms its session.
                    self.probes.push_back((family, link.target.handshake, outb));
                }
                link.established_at = Some(unix_now);
                info!(peer = %link.target.name, family = %family, "SAs and policies installed");
            }
        }
        // Failed links leave desired state; the next pass removes their leftovers.
        self.dirty = !failed_sas.is_empty();
    }

    /// Wall-clock seconds at `now`, from the anchor taken at start.
    fn unix_secs(&self, now: Instant) -> u64 {
        let (at, unix) = self.wall_anchor;
        (unix + now.saturating_duration_since(at)).as_secs()
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
            let current = link.session.as_ref().filter(|_| link.installed);
            let ids = current.map(|s| sa_ids(&link.target, s));
            let counters = |id: Option<SaId>| {
                id.and_then(|id| self.kernel_counters.get(&id).copied())
                    .unwrap_or_default()
            };
            let st = LinkStatus {
                family: id.family,
                local: link.target.local,
                remote: link.target.remote,
                state: if link.installed {
                    LinkState::Established
                } else if link.session.is_some() || ep_busy {
                    LinkState::Handshaking
                } else {
                    LinkState::None
                },
                spi_in: current.map(|s| s.local_spi),
                spi_out: current.map(|s| s.peer_spi),
                aead: current.map(|s| s.algorithm),
                established_at: link.established_at,
                inbound: counters(ids.map(|(i, _)| i)),
                outbound: counters(ids.map(|(_, o)| o)),
            };
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
    /// This link's input to the planner.
    fn plan(&self) -> LinkPlan<'_> {
        LinkPlan {
            target: &self.target,
            protected: self.protected,
            current: self.session.as_ref(),
            pending: self.pending.as_ref().map(|(s, _)| s),
            retiring: self.retiring.iter().map(|(sa, _)| sa).collect(),
        }
    }

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

#[cfg(test)]
mod tests;
