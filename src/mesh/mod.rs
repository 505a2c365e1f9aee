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
    AddressFamily, Aead, Datapath, KernelState, Lifetimes, PolicySpec, Prefix, Reqid, SaCounters,
    SaId, SaSpec,
};
use crate::handshake::{
    Config as HsConfig, Counters as HandshakeCounters, Endpoint, Event, PublicKey, Role, Session,
    StaticKeypair,
};
use crate::throttle::LogThrottle;

mod context;
pub mod driver;
mod guard;
mod links;
mod membership;
mod plan;
mod reconcile;
mod status;

use context::Ctx;
pub use guard::{
    current_boot_id, BlockReason, Blocked, Bound, Conflict, GuardFile, GuardFileError, GUARD_FILE,
};
pub use links::{usable_peer_address, wanted_links, LinkId, Target};
pub use plan::{desired, link_objects, plan, sa_ids, AdoptedPlan, LinkPlan, REPLAY_WINDOW};
pub use status::{LinkState, LinkStatus, MeshCounters};

/// How often a pending responder session's inbound counters are checked
/// (a targeted `GETSA` of the pending inbound SAs, no dump).
const CONFIRM_POLL: Duration = Duration::from_millis(100);

/// When an initiator sends its confirmation probe again after the first,
/// all within the responder's confirmation timeout (10 s by default).
const PROBE_AGAIN: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(3),
    Duration::from_secs(6),
];

/// How often the current SAs' counters are read (a targeted `GETSA` of
/// each, one pipelined round trip) for the listing, the metrics and the
/// soft-limit check that backs up the kernel's expire notifications.
pub const COUNTER_POLL: Duration = Duration::from_secs(10);

/// After a failed kernel change, the tables are read again and the plan
/// retried this much later.
const ERROR_RETRY: Duration = Duration::from_secs(2);

/// When an inbound SA reaches its soft limit, the peer (whose outbound SA
/// reached it at the same moment) is expected to re-key; we step in only if
/// it has not within this delay. Keeps the two ends from racing.
pub const INBOUND_LIMIT_DELAY: Duration = Duration::from_secs(2);

/// Kernel table changes are coalesced for this long before a resync.
const KERNEL_EVENT_DELAY: Duration = Duration::from_millis(200);

/// How often the kernel's tables are dumped even when nothing happened: a
/// safety net for drift no notification reported (kernel events, our own
/// writes and targeted reads keep the mesh's view current in between).
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(60);

/// The periodic resync once the kernel's notifications are no longer heard
/// ([`Mesh::monitor_lost`]): nothing then reports somebody else's deletion of
/// a policy, so the tables are read as often as before the mesh kept a
/// record of them.
pub const UNMONITORED_RESYNC: Duration = Duration::from_secs(2);

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
    /// How often the kernel's tables are dumped even when nothing happened.
    pub resync_interval: Duration,
    /// Handshake initiations (each an SPI reservation and a datagram to the
    /// peer's handshake port) started in any one second, over all links;
    /// the rest wait for a later tick, oldest due first.
    pub max_initiations_per_sec: usize,
    /// Links kept at most (one per peer and address family); links a view
    /// wants beyond that are refused until others go.
    pub max_links: usize,
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
            // A 100-host dual-stack cluster (198 links) starts in one go.
            max_initiations_per_sec: 256,
            // 4096 dual-stack peers.
            max_links: 8192,
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
    /// What the kernel holds, as of the last dump plus every change of ours
    /// that succeeded since: the reconciler plans against it. `None`: the
    /// next reconcile dumps (start, an event we did not cause, an overrun,
    /// a failed change).
    kernel: Option<KernelState>,
    /// When the pending sessions' inbound SAs were last read.
    last_confirm_poll: Instant,
    /// When the current SAs' counters are read next ([`COUNTER_POLL`]).
    next_counters: Instant,
    dirty: bool,
    error_log: LogThrottle,
    /// Which session (by id) put each SA into the kernel.
    installed_by: HashMap<SaId, u64>,
    /// Confirmation probes to send through the new outbound SA: (family, peer handshake address).
    probes: std::collections::VecDeque<(AddressFamily, SocketAddr, SaId)>,
    /// Probes sent again later ([`PROBE_AGAIN`] after the first), while the
    /// SA is still its link's outbound SA: one lost probe (or one sent in
    /// clear because somebody deleted the pair's policy at that moment) must
    /// not leave the responder unconfirmed.
    probes_again: Vec<(Instant, AddressFamily, SocketAddr, SaId)>,
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
    /// The kernel's notifications stopped being heard: resync every
    /// [`UNMONITORED_RESYNC`].
    unmonitored: bool,
    /// (monotonic, wall-clock since the epoch) at start: wall time for the
    /// listing without reading a clock.
    wall_anchor: (Instant, Duration),
    /// The kernel's boot id (saved with the guard: a different one at start
    /// means a reboot wiped the kernel's policies, not the operator).
    boot_id: Option<String>,
    /// Address bindings and blocked pairs (fail closed for good).
    guard: guard::Guard,
    /// Claims on addresses bound to another peer, as of the last view.
    conflicts: Vec<Conflict>,
    /// (claimant, key) pairs refused as key claims in the last view.
    key_claims: std::collections::BTreeSet<(String, PublicKey)>,
    /// When the initiations of the last second started (the per-second cap).
    started: std::collections::VecDeque<Instant>,
    /// Strict mode's protected ranges (`--protect`).
    protect: Vec<Prefix>,
    /// meshsec's range policies in the kernel at the last look.
    range_policies_seen: usize,
    /// The last membership view and the instant it arrived. The view is
    /// republished on changes of state only (not as last-heard times grow),
    /// so a dead member's grace is timed here, from its age at arrival.
    view: Vec<crate::gossip::members::Member>,
    view_at: Instant,
    /// When the earliest dead member still linked runs out of grace: the
    /// links are worked out again then ([`Mesh::poll_timeout`] includes it).
    dead_expiry: Option<Instant>,
}

struct Adopted {
    sas: Vec<SaSpec>,
    policies: Vec<PolicySpec>,
    deadline: Instant,
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
            kernel: None,
            last_confirm_poll: now,
            next_counters: now + COUNTER_POLL,
            dirty: true,
            error_log: LogThrottle::new(Duration::from_secs(5)),
            installed_by: HashMap::new(),
            probes: std::collections::VecDeque::new(),
            probes_again: Vec::new(),
            last_reconcile: now,
            adopted: None,
            limits_seen: Default::default(),
            kernel_resync_at: None,
            next_resync: now,
            unmonitored: false,
            wall_anchor: (now, unix_now),
            boot_id: None,
            guard: guard::Guard::default(),
            conflicts: Vec::new(),
            key_claims: Default::default(),
            started: std::collections::VecDeque::new(),
            protect: Vec::new(),
            range_policies_seen: 0,
            view: Vec::new(),
            view_at: now,
            dead_expiry: None,
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
            lifetimes: self.config.lifetimes,
            counters: &mut self.counters,
            kernel: &mut self.kernel,
        };
        if let Err(reason) = ep.handle(now, from, datagram, &mut ctx) {
            self.counters.handshake_rejected += 1;
            debug!(%from, %reason, "handshake datagram rejected");
        }
        self.drain_events(now, family, dp);
    }

    /// Drives timers: retransmits, new initiations, the pending sessions'
    /// confirmation check and the counter check (targeted reads), the
    /// retirement of replaced SAs at their deadline, and reconciliation with
    /// the kernel: against the mesh's own record of it when something
    /// changed, after a full dump when a kernel event, an error or the
    /// periodic resync asks for one. Returns whether the SA counters were
    /// refreshed (for the listing).
    pub fn handle_timeout(&mut self, now: Instant, dp: &mut dyn Datapath) -> bool {
        for ep in self.endpoints.values_mut() {
            ep.handle_timeout(now);
        }
        for family in self.families() {
            self.drain_events(now, family, dp);
        }
        self.queue_probes_again(now);
        if self.dead_expiry.is_some_and(|t| now >= t) {
            self.update_links(now, dp);
        }
        self.initiate_due(now, dp);
        // (Without a trusted record of the kernel, the next reconcile dumps
        // anyway; whatever made it untrusted scheduled one.)
        let mut full = now >= self.next_resync;
        if now >= self.next_resync {
            self.next_resync = now + self.resync_interval();
        }
        if self.kernel_resync_at.is_some_and(|t| now >= t) {
            self.kernel_resync_at = None;
            full = true;
        }
        if self.retire_due().is_some_and(|t| now >= t) {
            self.dirty = true;
        }
        let mut fresh = false;
        if !full {
            if self.links.values().any(|l| l.pending.is_some())
                && now >= self.last_confirm_poll + CONFIRM_POLL
            {
                self.poll_pending(now, dp);
            }
            if now >= self.next_counters {
                fresh = self.poll_counters(now, dp);
            }
        }
        if self.dirty || full {
            fresh |= self.reconcile_with(now, dp, full);
        }
        fresh
    }

    /// The kernel's notifications are no longer heard (the monitor socket
    /// failed): the record of the kernel can go stale unannounced (somebody
    /// deletes a policy and nothing says so), so the mesh reads the kernel
    /// now and then every [`UNMONITORED_RESYNC`] instead of every
    /// [`MeshConfig::resync_interval`].
    pub fn monitor_lost(&mut self, now: Instant) {
        self.unmonitored = true;
        self.kernel = None;
        self.dirty = true;
        self.next_resync = self.next_resync.min(now + UNMONITORED_RESYNC);
    }

    fn resync_interval(&self) -> Duration {
        if self.unmonitored {
            self.config.resync_interval.min(UNMONITORED_RESYNC)
        } else {
            self.config.resync_interval
        }
    }

    /// The next instant [`Mesh::handle_timeout`] is needed: the earliest of
    /// the endpoints' timers, due initiations and re-keys, the confirmation
    /// and counter reads, the earliest retirement or adoption deadline, the
    /// end of a dead member's grace, a kernel event's resync and the
    /// periodic resync (so never `None`
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
            .min()
            .map(|t| self.initiation_slot().map_or(t, |slot| t.max(slot)));
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
            .min()
            .map(|t| self.initiation_slot().map_or(t, |slot| t.max(slot)));
        // Pending confirmations: their inbound SAs are read soon.
        let kernel = self
            .links
            .values()
            .any(|l| l.pending.is_some())
            .then_some(self.last_confirm_poll + CONFIRM_POLL);
        let counters = Some(self.next_counters);
        // Something changed: reconcile, at most once per CONFIRM_POLL (a
        // kernel that keeps failing must not make a driver spin).
        let dirty = self.dirty.then_some(self.last_reconcile + CONFIRM_POLL);
        [
            eps,
            attempts,
            rekeys,
            kernel,
            counters,
            // No sooner than a reconcile may run again (one failing to
            // read the kernel must not make a driver spin).
            self.retire_due()
                .map(|t| t.max(self.last_reconcile + CONFIRM_POLL)),
            self.kernel_resync_at,
            Some(self.next_resync),
            dirty,
            self.dead_expiry,
            self.probes_again.iter().map(|(t, ..)| *t).min(),
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

    /// Queues the later probes that are due, for SAs that are still their
    /// link's outbound SA (a re-key or a removed link ends them).
    fn queue_probes_again(&mut self, now: Instant) {
        if self.probes_again.iter().all(|(t, ..)| *t > now) {
            return;
        }
        let current: std::collections::HashSet<SaId> = self
            .links
            .values()
            .filter_map(|l| l.session.as_ref().map(|s| sa_ids(&l.target, s).1))
            .collect();
        let mut later = Vec::new();
        for (t, family, to, sa) in std::mem::take(&mut self.probes_again) {
            if t > now {
                later.push((t, family, to, sa));
            } else if current.contains(&sa) {
                self.probes.push_back((family, to, sa));
            }
        }
        self.probes_again = later;
    }

    /// The earliest deadline of a retiring SA or of the adopted state.
    fn retire_due(&self) -> Option<Instant> {
        let retiring = self
            .links
            .values()
            .flat_map(|l| l.retiring.iter().map(|(_, t)| *t))
            .min();
        let adopted = self
            .adopted
            .as_ref()
            .filter(|a| !a.sas.is_empty() || !a.policies.is_empty())
            .map(|a| a.deadline);
        retiring.into_iter().chain(adopted).min()
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

    /// Sets strict mode's protected ranges (at start, and on reload). The
    /// next reconcile installs the policies of new ranges and removes those
    /// of ranges no longer listed (also ones a previous run left).
    pub fn set_protect(&mut self, ranges: Vec<Prefix>) {
        if ranges != self.protect {
            info!(ranges = %ranges.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(","), "protected ranges set");
            self.protect = ranges;
            self.dirty = true;
        }
    }

    /// The protected ranges.
    pub fn protect(&self) -> &[Prefix] {
        &self.protect
    }

    /// How many of strict mode's policies (blocks and exemptions) the kernel
    /// held at the last reconcile.
    pub fn range_policies_installed(&self) -> usize {
        self.range_policies_seen
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

    /// When the per-second initiation cap lets the next one start, if it
    /// is reached now (`None`: one may start at once).
    fn initiation_slot(&self) -> Option<Instant> {
        if self.started.len() < self.config.max_initiations_per_sec.max(1) {
            return None;
        }
        self.started.front().map(|t| *t + INITIATION_WINDOW)
    }

    fn initiate_due(&mut self, now: Instant, dp: &mut dyn Datapath) {
        while self
            .started
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= INITIATION_WINDOW)
        {
            self.started.pop_front();
        }
        // Due links, oldest due first, so one held back by the cap is never
        // overtaken by links that became due after it.
        let mut due: Vec<(Instant, LinkId, bool)> = Vec::new();
        for (id, link) in &self.links {
            let rekey = link.session.is_some()
                && link.pending.is_none()
                && link.rekey_at.is_some_and(|t| now >= t);
            if !rekey
                && (link.session.is_some() || link.pending.is_some() || now < link.next_attempt)
            {
                continue;
            }
            let Some(ep) = self.endpoints.get(&id.family) else {
                continue;
            };
            if ep.is_initiating(&id.peer) {
                continue;
            }
            let since = match link.rekey_at {
                Some(t) if rekey => t,
                _ => link.next_attempt,
            };
            due.push((since, *id, rekey));
        }
        due.sort();
        let cap = self.config.max_initiations_per_sec.max(1);
        let room = cap - self.started.len().min(cap);
        let held_back = due.len().saturating_sub(room);
        if held_back > 0 {
            self.counters.initiations_deferred += held_back as u64;
            if let Some(suppressed) = self.error_log.check(now, "initiations_deferred") {
                warn!(
                    held_back,
                    cap,
                    suppressed,
                    "more handshakes due than the per-second cap; the rest start on later ticks"
                );
            }
        }
        for (_, id, rekey) in due.into_iter().take(room) {
            let (Some(link), Some(ep)) =
                (self.links.get_mut(&id), self.endpoints.get_mut(&id.family))
            else {
                continue;
            };
            self.started.push_back(now);
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
                    // Address proof: the response must come from the peer's address.
                    if session.peer_addr.ip() != link.target.remote {
                        warn!(peer = %link.target.name, family = %family, from = %session.peer_addr, "handshake response from another address than the peer's; refused");
                        self.counters.refused_wrong_source += 1;
                        self.counters.handshakes_failed += 1;
                        link.failures += 1;
                        link.next_attempt = now + backoff(link.failures);
                        free_spi(&self.self_addrs, family, session.local_spi, dp);
                        continue;
                    }
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

    /// Removes everything this mesh installed (graceful leave).
    pub fn remove_all(
        &mut self,
        dp: &mut dyn Datapath,
    ) -> Result<(usize, usize), crate::datapath::DatapathError> {
        self.links.clear();
        self.guard.clear();
        let r = dp.flush_owned()?;
        Ok((r.sas, r.policies))
    }

    /// Takes over the guard a previous run saved (bindings and blocked
    /// pairs, see [`guard::GuardFile`]); call before the first
    /// [`Mesh::handle_timeout`]. A restored blocked pair of which the kernel
    /// holds no policy at the first look is released (the operator flushed
    /// it while the agent was down).
    pub fn restore_guard(&mut self, file: &GuardFile) -> Result<(), GuardFileError> {
        let (at, unix) = self.wall_anchor;
        let restored = guard::Guard::from_file(file, |secs| {
            let age = unix.saturating_sub(Duration::from_secs(secs));
            at.checked_sub(age).unwrap_or(at)
        })?;
        info!(
            bindings = file.bindings.len(),
            blocked = file.blocked.len(),
            "restored the address bindings and blocked pairs of the previous run"
        );
        let mut restored = restored;
        let rebooted = matches!((&file.boot_id, &self.boot_id), (Some(a), Some(b)) if a != b);
        if rebooted {
            // The reboot emptied the kernel, not the operator: the pairs stay
            // blocked (their policies go back in), never sent in clear, and
            // so does every pair that was protected (its address is bound)
            // until its link re-keys.
            restored.keep_restored();
            let self_addrs = self.self_addrs.clone();
            let added = restored.block_bound_pairs(at, |remote| {
                self_addrs
                    .iter()
                    .find(|a| AddressFamily::of(**a) == AddressFamily::of(remote))
                    .copied()
            });
            info!(
                added,
                "the host rebooted since the guard was saved: its blocked pairs are put back, and the pairs protected before it stay blocked until their links re-key"
            );
        }
        self.guard = restored;
        self.dirty = true;
        Ok(())
    }

    /// The guard as it should be saved.
    pub fn guard_file(&self) -> GuardFile {
        GuardFile {
            boot_id: self.boot_id.clone(),
            ..self.guard.to_file(|t| self.unix_secs(t))
        }
    }

    /// Sets the kernel's boot id ([`current_boot_id`]), saved with the guard;
    /// call before [`Mesh::restore_guard`].
    pub fn set_boot_id(&mut self, boot_id: Option<String>) {
        self.boot_id = boot_id;
    }

    /// Bumped by every change of the guard: save [`Mesh::guard_file`] when it moved.
    pub fn guard_revision(&self) -> u64 {
        self.guard.revision()
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

/// An SA as the mesh records it in its view of the kernel: without the key
/// (the kernel never gives keys back either; the record only needs ids).
fn keyless(sa: &SaSpec) -> SaSpec {
    SaSpec {
        key: Default::default(),
        ..sa.clone()
    }
}

/// Frees an SPI reserved (ALLOCSPI) on our data address of `family`.
fn free_spi(self_addrs: &[IpAddr], family: AddressFamily, spi: u32, dp: &mut dyn Datapath) {
    if let Some(local) = self_addrs.iter().find(|a| AddressFamily::of(**a) == family) {
        let _ = dp.delete_sa(SaId { dst: *local, spi });
    }
}

/// The window of [`MeshConfig::max_initiations_per_sec`].
const INITIATION_WINDOW: Duration = Duration::from_secs(1);

fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1 << failures.min(5)).min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests;
