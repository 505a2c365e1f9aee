//! A chitchat [`Transport`] whose datagrams are sealed on the wire.
//!
//! chitchat turns envelopes into bytes only inside its own [`chitchat::transport::UdpSocket`], so
//! that socket is used as the codec and the bytes are intercepted on their way out and in:
//!
//! ```text
//!         private network namespace (loopback only)                    host network
//!  chitchat ⇄ codec 127.0.0.1:c ⇄ proxy 127.0.0.1:p(peer) ⇄ seal/open ⇄ network socket ⇄ peer
//! ```
//!
//! - The codec socket and the proxy sockets live on the loopback interface of a network
//!   namespace created for this socket alone: a dedicated thread `unshare`s a new one, brings its
//!   `lo` up and creates every loopback socket there (sockets keep their namespace when handed to
//!   tokio). Reaching that loopback takes CAP_SYS_ADMIN over this process's namespaces, so no
//!   other local process can inject plaintext gossip; on the host network only sealed datagrams
//!   are accepted, and what chitchat hears from an address that is not one of our proxies is
//!   dropped too (`dropped_unmapped`).
//! - There is one proxy socket per remote peer address, so the source address chitchat sees maps
//!   back to exactly one peer, whatever order loopback delivers in. The table is bounded
//!   ([`SealedTransportConfig::max_peers`], least recently used entry evicted) and idle entries
//!   are closed; a datagram still queued from an evicted proxy is dropped, as UDP may.
//! - No datagram on the wire is larger than [`pieces::PIECE_BUDGET`] (1,400 bytes): a chitchat
//!   datagram that fits once sealed goes out as one sealed datagram, as before; a larger one
//!   (chitchat sizes datagrams up to 65,507 bytes, and a SYN's digest grows with the cluster)
//!   goes out as pieces, each sealed on its own, and the receiver puts them back together
//!   within bounds before the SYN guard and chitchat see the message ([`super::pieces`]). A
//!   message chitchat encodes past one UDP payload is counted (`dropped_oversize`) and logged.
//!
//! What the replay defence does and does not cover (see [`super::seal`]): each receiver opens a
//! given datagram at most once and never one older than the window (60 s by default; node clocks
//! must agree within it). A datagram captured on its way to one node can still be delivered once
//! to *another* node within the window. chitchat state is versioned and only moves forward, so
//! this can at most repeat news less than a window old, never roll state back; it does let an
//! attacker who captured traffic make a node send one reply per captured datagram to a spoofed
//! address (bounded reflection). A captured piece ([`super::pieces`]) delivered to another node
//! alone, from a spoofed address, holds a reassembly slot there until it times out or is
//! evicted: within the reassembler's bounds, and evicted before messages still being filled.
//!
//! Cost: unoptimized (debug) builds of the AEAD seal about 5 MB/s, i.e. ~10 ms per 64 KiB
//! datagram; release builds are hundreds of times faster. Run multi-node tests and benchmarks
//! in release mode.

mod counters;
pub mod digest;
mod netns;
mod proxy;

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::{ChitchatEnvelope, ChitchatMessage};
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;
use tracing::{debug, error, warn};

use super::pieces::{self, seal_message, Reassembler, ReassemblyConfig};
use super::seal::{Keyring, Opened, Opener, ReplayConfig};
use crate::throttle::LogThrottle;
use counters::bump;
pub use counters::{ClockOffset, GossipCounters, GossipCountersSnapshot, MAX_CLOCK_SAMPLES};
use netns::{udp_rcvbuf_errors, PrivateNetns};
use proxy::{Proxy, ProxyTable};

/// Largest UDP payload over IPv4 (65,535 − 20 − 8). This node sends nothing above
/// [`pieces::PIECE_BUDGET`], but agents without pieces send (version 1) sealed datagrams up to
/// this size, and they still open here.
pub const MAX_SEALED_DATAGRAM_V4: usize = 65_507;
/// Receive buffer size: above any UDP payload, so nothing is silently truncated.
const RECV_BUF: usize = 65_536;
/// How often the private namespace's loopback drop count is read.
const LOOPBACK_STATS_INTERVAL: Duration = Duration::from_secs(2);

/// Hook run on the network socket right after it is bound and before any traffic (e.g. to
/// install a per-socket XFRM bypass policy). An error aborts opening the transport.
pub type OnBind = Arc<dyn Fn(RawFd) -> io::Result<()> + Send + Sync>;

/// Errors opening the sealed transport. Each renders as one line naming the cause.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The gossip listen address could not be bound (in use, not local, ...).
    #[error("cannot bind the gossip socket to {addr}: {error}")]
    Bind {
        /// The listen address.
        addr: SocketAddr,
        /// The OS error.
        error: io::Error,
    },
    /// The `on_bind` hook refused the socket.
    #[error("gossip socket setup hook failed: {0}")]
    OnBind(io::Error),
    /// The private namespace for the plaintext path could not be created.
    #[error(
        "cannot create the private network namespace that keeps gossip plaintext away from \
         other local processes: {0}; the agent needs CAP_SYS_ADMIN and CAP_NET_ADMIN (run it as root)"
    )]
    Namespace(io::Error),
    /// A loopback socket inside the private namespace could not be created.
    #[error("cannot open a loopback socket in the private gossip namespace: {0}")]
    Loopback(String),
    /// The thread owning the private namespace has stopped.
    #[error("the private gossip namespace thread has stopped")]
    NamespaceGone,
}

/// Settings of the sealed transport.
#[derive(Debug, Clone)]
pub struct SealedTransportConfig {
    /// Freshness and replay rules for inbound datagrams.
    pub replay: ReplayConfig,
    /// Most peers with a loopback proxy at once (each holds one file descriptor). Beyond this
    /// the least recently used one is closed and reopened on demand.
    pub max_peers: usize,
    /// A peer's proxy is closed after this long without traffic.
    pub peer_idle: Duration,
    /// At most one warning per drop reason per this interval; the rest are counted.
    pub log_interval: Duration,
    /// Receive buffer requested for the network socket, so bursts of near-64 KiB datagrams
    /// are not dropped by the kernel while one is being opened (0 keeps the system default).
    pub recv_buffer_bytes: usize,
    /// Bounds on putting pieced messages back together.
    pub reassembly: ReassemblyConfig,
}

impl Default for SealedTransportConfig {
    fn default() -> Self {
        SealedTransportConfig {
            replay: ReplayConfig::default(),
            max_peers: 512,
            peer_idle: Duration::from_secs(120),
            log_interval: Duration::from_secs(10),
            recv_buffer_bytes: 4 << 20,
            reassembly: ReassemblyConfig::default(),
        }
    }
}

// A poisoned lock only means another task panicked mid-update of plain data; keep going.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A chitchat transport that seals every datagram; see the module docs.
#[derive(Clone)]
pub struct SealedTransport {
    keyring: Arc<Keyring>,
    counters: Arc<GossipCounters>,
    config: SealedTransportConfig,
    on_bind: Option<OnBind>,
    state: StateSlot,
}

/// The chitchat instance a transport serves, once spawned: the SYN guard reads its state.
pub type StateSlot = Arc<OnceLock<Arc<tokio::sync::Mutex<chitchat::Chitchat>>>>;

impl fmt::Debug for SealedTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedTransport")
            .field("keyring", &self.keyring)
            .field("config", &self.config)
            .field("on_bind", &self.on_bind.is_some())
            .finish()
    }
}

impl SealedTransport {
    /// A transport sealing with `keyring` and default settings.
    pub fn new(keyring: Arc<Keyring>) -> Self {
        SealedTransport {
            keyring,
            counters: Arc::new(GossipCounters::default()),
            config: SealedTransportConfig::default(),
            on_bind: None,
            state: StateSlot::default(),
        }
    }

    /// Tells the transport which chitchat it serves (call right after `spawn_chitchat`): a SYN
    /// that would make chitchat build an answer it cannot fit (and panic) is then judged
    /// against that state, byte for byte. Until then it is judged against the SYN's digest
    /// alone. Later calls are ignored.
    pub fn attach(&self, chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>) {
        let _ = self.state.set(chitchat);
    }

    /// Replaces the settings.
    pub fn with_config(mut self, config: SealedTransportConfig) -> Self {
        self.config = config;
        self
    }

    /// Runs `hook` on the network socket's fd right after binding it.
    pub fn with_on_bind(
        mut self,
        hook: impl Fn(RawFd) -> io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.on_bind = Some(Arc::new(hook));
        self
    }

    /// The counters every socket opened by this transport updates.
    pub fn counters(&self) -> Arc<GossipCounters> {
        self.counters.clone()
    }

    /// Opens a sealed socket listening on `listen_addr` (what [`Transport::open`] does, with a
    /// typed error).
    pub async fn open_sealed(
        &self,
        listen_addr: SocketAddr,
    ) -> Result<SealedSocket, TransportError> {
        let network = UdpSocket::bind(listen_addr)
            .await
            .map_err(|error| TransportError::Bind {
                addr: listen_addr,
                error,
            })?;
        if self.config.recv_buffer_bytes > 0 {
            if let Err(e) = set_recv_buffer(network.as_raw_fd(), self.config.recv_buffer_bytes) {
                debug!(error = %e, "cannot enlarge the gossip receive buffer; keeping the default");
            }
        }
        if let Some(hook) = &self.on_bind {
            hook(network.as_raw_fd()).map_err(TransportError::OnBind)?;
        }
        let local_addr = network.local_addr().map_err(|error| TransportError::Bind {
            addr: listen_addr,
            error,
        })?;
        let netns = PrivateNetns::spawn(format!("gossip-ns-{}", local_addr.port())).await?;
        let handle = tokio::runtime::Handle::current();
        // chitchat binds its socket itself, so the bind has to run on the namespace's thread.
        let codec = netns
            .run(move || {
                handle.block_on(chitchat::transport::UdpSocket::open(
                    (Ipv4Addr::LOCALHOST, 0).into(),
                ))
            })
            .await?
            .map_err(|e| TransportError::Loopback(format!("{e:#}")))?;
        let codec_addr = codec
            .local_addr()
            .map_err(|e| TransportError::Loopback(format!("{e:#}")))?;
        let shared = Arc::new(Shared {
            network: Arc::new(network),
            keyring: self.keyring.clone(),
            counters: self.counters.clone(),
            config: self.config.clone(),
            proxies: Mutex::new(ProxyTable::new(self.config.max_peers)),
            netns,
            codec_addr,
            log: Arc::new(LogThrottle::new(self.config.log_interval)),
            state: self.state.clone(),
            syns_in_flight: Mutex::new(VecDeque::new()),
        });
        let opener = Opener::new(self.keyring.clone(), self.config.replay);
        let pump_in = tokio::spawn(pump_in(shared.clone(), opener)).abort_handle();
        debug!(listen = %local_addr, codec = %codec_addr, "sealed gossip transport open");
        Ok(SealedSocket {
            codec,
            shared,
            local_addr,
            pump_in,
        })
    }
}

#[async_trait]
impl Transport for SealedTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        Ok(Box::new(self.open_sealed(listen_addr).await?))
    }
}

/// The socket chitchat talks to. Dropping it stops its background tasks, closes its sockets
/// and lets the private namespace go.
pub struct SealedSocket {
    codec: chitchat::transport::UdpSocket,
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    pump_in: AbortHandle,
}

impl fmt::Debug for SealedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedSocket")
            .field("local_addr", &self.local_addr)
            .field("codec_addr", &self.shared.codec_addr)
            .finish()
    }
}

impl Drop for SealedSocket {
    fn drop(&mut self) {
        self.pump_in.abort();
    }
}

impl SealedSocket {
    /// Address of chitchat's codec socket inside the private namespace (diagnostics; it is not
    /// reachable from the host's network namespace).
    pub fn codec_addr(&self) -> SocketAddr {
        self.shared.codec_addr
    }

    /// Number of peers that currently have a loopback proxy.
    pub fn peer_count(&self) -> usize {
        lock(&self.shared.proxies).len()
    }
}

#[async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.local_addr)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let (proxy_addr, _) = proxy_for(&self.shared, to).await?;
        // A SYN is header, digest, u16-prefixed cluster id: its size measures our digest.
        let syn_overhead = match &envelope.message {
            ChitchatMessage::Syn { cluster_id, .. } => Some(4 + 2 + cluster_id.len()),
            _ => None,
        };
        match self.codec.send(proxy_addr, envelope).await {
            Ok(sent) => {
                if let Some(overhead) = syn_overhead {
                    let digest = sent.num_bytes_sent.saturating_sub(overhead);
                    note_digest(&self.shared, digest);
                }
                Ok(sent)
            }
            // chitchat encodes datagrams past one UDP payload when its state is that large;
            // the codec socket refuses them. Counted like a sealed datagram that is too large,
            // and not an error for chitchat (it would log every attempt).
            Err(e) if is_emsgsize(&e) => {
                bump(&self.shared.counters.dropped_oversize, 1);
                if let Some(overhead) = syn_overhead {
                    note_digest(&self.shared, digest::MAX_PAYLOAD + 1 - overhead);
                }
                if let Some(suppressed) = self.shared.log.check(Instant::now(), "oversize") {
                    warn!(
                        peer = %to,
                        max = digest::MAX_PAYLOAD,
                        suppressed,
                        "gossip message larger than a UDP datagram (the cluster state is too large); dropped"
                    );
                }
                Ok(SendOutcome { num_bytes_sent: 0 })
            }
            Err(e) => Err(e),
        }
    }

    // Cancel-safe: chitchat's codec recv is, and the mapping below does not await.
    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let outcome = self.codec.recv().await?;
            let peer = lock(&self.shared.proxies).peer_of(&outcome.from_addr);
            match peer {
                Some(from_addr) => {
                    return Ok(RecvOutcome {
                        from_addr,
                        ..outcome
                    })
                }
                None => bump(&self.shared.counters.dropped_unmapped, 1),
            }
        }
    }
}

struct Shared {
    network: Arc<UdpSocket>,
    keyring: Arc<Keyring>,
    counters: Arc<GossipCounters>,
    config: SealedTransportConfig,
    proxies: Mutex<ProxyTable>,
    netns: PrivateNetns,
    codec_addr: SocketAddr,
    log: Arc<LogThrottle>,
    state: StateSlot,
    /// Node ids that SYNs handed to chitchat carried and our state did not hold yet, for
    /// [`SYN_IN_FLIGHT`]: chitchat adds them when it gets to those SYNs, so a later SYN is
    /// judged with them (a burst of SYNs each under the limit alone must not add up past it).
    syns_in_flight: SynsInFlight,
}

/// The new node ids of SYNs handed to chitchat, with when (see [`judge_syn`]).
pub(crate) type SynsInFlight = Mutex<VecDeque<(tokio::time::Instant, digest::Digest)>>;

/// How long a forwarded SYN's new node ids count towards the guard's prediction: far longer
/// than chitchat takes to process a queued datagram; ids it has added by then are in its
/// state, and merging counts each id once.
const SYN_IN_FLIGHT: Duration = Duration::from_secs(5);

/// Receives from the network, opens, and hands plaintext to chitchat through the peer's proxy.
async fn pump_in(shared: Arc<Shared>, mut opener: Opener) {
    let mut buf = vec![0u8; RECV_BUF];
    let mut sweep = tokio::time::interval(shared.config.peer_idle.max(Duration::from_secs(1)) / 2);
    let mut stats = tokio::time::interval(LOOPBACK_STATS_INTERVAL);
    let mut pieces = Reassembler::new(shared.config.reassembly);
    let started = Instant::now();
    let mono_ms = || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    loop {
        let received = tokio::select! {
            r = shared.network.recv_from(&mut buf) => r,
            _ = stats.tick() => {
                if let Ok(Ok(drops)) = shared.netns.run(udp_rcvbuf_errors).await {
                    shared.counters.loopback_drops.store(drops, Ordering::Relaxed);
                }
                // Incomplete messages leave at their timeout even when no piece follows.
                pieces.expire(mono_ms());
                note_reassembly(&shared, &mut pieces);
                continue;
            }
            _ = sweep.tick() => {
                let closed = lock(&shared.proxies).sweep(Instant::now(), shared.config.peer_idle);
                bump(&shared.counters.proxies_closed, closed as u64);
                continue;
            }
        };
        let (len, from) = match received {
            Ok(r) => r,
            Err(e) => {
                bump(&shared.counters.recv_errors, 1);
                if let Some(suppressed) = shared.log.check(Instant::now(), "recv_error") {
                    warn!(error = %e, suppressed, "gossip socket receive error");
                }
                // Errors are per-datagram (ICMP reports, ENOBUFS); pause so a persistent one
                // cannot spin this task.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let datagram = &buf[..len];
        let now_ms = unix_ms_now();
        let (stamp, opened) = opener.open_any(now_ms, datagram);
        if let Some(sent_at_ms) = stamp {
            shared.counters.record_clock(from, sent_at_ms, now_ms);
        }
        match opened {
            Ok(opened) => {
                bump(&shared.counters.opened_in_datagrams, 1);
                bump(&shared.counters.opened_in_bytes, len as u64);
                let plain = match opened {
                    Opened::Whole(plain) => plain,
                    Opened::Piece(piece) => {
                        let done = pieces.accept(mono_ms(), from, &piece);
                        note_reassembly(&shared, &mut pieces);
                        match done {
                            Ok(Some(plain)) => plain,
                            Ok(None) => continue,
                            Err(reason) => {
                                bump(shared.counters.piece_drop_counter(reason), 1);
                                if let Some(suppressed) =
                                    shared.log.check(Instant::now(), reason.as_str())
                                {
                                    warn!(
                                        from = %from,
                                        reason = reason.as_str(),
                                        suppressed,
                                        "dropped gossip piece: {reason}"
                                    );
                                }
                                continue;
                            }
                        }
                    }
                };
                deliver(&shared, from, plain).await;
            }
            Err(reason) => {
                bump(shared.counters.drop_counter(reason), 1);
                bump(&shared.counters.dropped_in_bytes, len as u64);
                if let Some(suppressed) = shared.log.check(Instant::now(), reason.as_str()) {
                    warn!(
                        from = %from,
                        len,
                        reason = reason.as_str(),
                        suppressed,
                        "dropped gossip datagram: {reason}"
                    );
                }
            }
        }
    }
}

/// Hands an opened (or reassembled) chitchat datagram to chitchat, through the SYN guard.
async fn deliver(shared: &Arc<Shared>, from: SocketAddr, plain: Vec<u8>) {
    if !syn_is_answerable(shared, from, &plain).await {
        return;
    }
    match proxy_for(shared, from).await {
        Ok((_, proxy)) => {
            if let Err(e) = proxy.send(&plain).await {
                bump(&shared.counters.send_errors, 1);
                if let Some(suppressed) = shared.log.check(Instant::now(), "loopback_send") {
                    warn!(error = %e, suppressed, "cannot hand gossip to chitchat");
                }
            }
        }
        Err(e) => {
            bump(&shared.counters.send_errors, 1);
            if let Some(suppressed) = shared.log.check(Instant::now(), "proxy_open") {
                warn!(error = %e, suppressed, "cannot open a gossip proxy");
            }
        }
    }
}

/// Counts what the reassembler completed and dropped; warns (rate-limited) about drops.
fn note_reassembly(shared: &Shared, pieces: &mut Reassembler) {
    let c = pieces.take_counts();
    shared.counters.add_reassembly(c);
    if c.timed_out + c.evicted > 0 {
        if let Some(suppressed) = shared.log.check(Instant::now(), "pieces_incomplete") {
            warn!(
                timed_out = c.timed_out,
                evicted = c.evicted,
                suppressed,
                "dropped incomplete gossip messages (a piece was lost, or reassembly was full)"
            );
        }
    }
}

fn is_emsgsize(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<io::Error>())
        .any(|e| e.raw_os_error() == Some(libc::EMSGSIZE))
}

/// Records our digest size; warns (rate-limited) from half the limit on.
fn note_digest(shared: &Shared, bytes: usize) {
    shared
        .counters
        .digest_bytes
        .store(bytes as u64, Ordering::Relaxed);
    if bytes >= digest::GUARD_LIMIT / 2 {
        if let Some(suppressed) = shared.log.check(Instant::now(), "digest_large") {
            warn!(
                digest_bytes = bytes,
                limit = digest::GUARD_LIMIT,
                suppressed,
                "the gossip digest is at {}% of what one datagram can carry: past it this node stops answering SYNs until dead generations leave the digest (half of --dead-node-grace-secs after their death); see docs/scale.md",
                bytes * 100 / digest::GUARD_LIMIT
            );
        }
    }
}

/// What the SYN guard makes of an opened datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SynVerdict {
    /// Not a SYN, or a SYN chitchat can answer: hand it over. `digest_bytes` is the digest
    /// chitchat will send back, for a SYN.
    Pass {
        /// Predicted size of our answer's digest (None when not a SYN).
        digest_bytes: Option<usize>,
    },
    /// A SYN whose digest does not decode.
    Malformed,
    /// A SYN whose answer would not fit one datagram (chitchat would panic building it).
    TooLarge {
        /// Node ids in the answer's digest.
        nodes: usize,
        /// Its predicted size.
        digest_bytes: usize,
    },
}

/// Judges an opened datagram against the chitchat it is for (see [`digest`]); shared by the
/// real transport and the in-process simulation (`gossip::sim`), so both run the same guard.
pub(crate) async fn judge_syn(
    state: &StateSlot,
    syns_in_flight: &SynsInFlight,
    plain: &[u8],
) -> SynVerdict {
    let syn = match digest::parse_syn(plain) {
        Ok(None) => return SynVerdict::Pass { digest_bytes: None },
        Ok(Some(syn)) => syn,
        Err(_) => return SynVerdict::Malformed,
    };
    // Copied under chitchat's lock, measured outside it.
    let (own, scheduled, self_id) = match state.get() {
        Some(chitchat) => {
            let c = chitchat.lock().await;
            let (own, scheduled) = digest::own_digest(&c);
            (own, scheduled, Some(c.self_chitchat_id().clone()))
        }
        None => Default::default(),
    };
    // What chitchat will hold when it answers: its state, the SYNs still queued ahead of this
    // one, and this SYN.
    let now = tokio::time::Instant::now();
    let mut in_flight = lock(syns_in_flight);
    in_flight.retain(|(at, _)| now.duration_since(*at) < SYN_IN_FLIGHT);
    // Each id is queued once: the ids in flight then all count in a digest that passed, so
    // they stay below the limit (~4,700), and so does the work per judgement. (Queued again
    // per SYN, an id chitchat never adds, e.g. one scheduled for deletion, grew the queue
    // with every SYN: found in review.)
    let fresh: digest::Digest = syn
        .digest
        .iter()
        .filter(|(id, _)| {
            !own.contains_key(*id) && !in_flight.iter().any(|(_, d)| d.contains_key(*id))
        })
        .map(|(id, d)| (id.clone(), *d))
        .collect();
    let mut incoming = syn.digest;
    for (id, d) in in_flight.iter().flat_map(|(_, d)| d) {
        incoming.entry(id.clone()).or_insert(*d);
    }
    let merged = match &self_id {
        Some(me) => digest::merged(&own, &scheduled, me, &incoming),
        None => incoming,
    };
    let predicted = digest::encoded_len(&merged, syn.version);
    if predicted <= digest::GUARD_LIMIT {
        if !fresh.is_empty() {
            in_flight.push_back((now, fresh));
        }
        SynVerdict::Pass {
            digest_bytes: Some(predicted),
        }
    } else {
        SynVerdict::TooLarge {
            nodes: merged.len(),
            digest_bytes: predicted,
        }
    }
}

/// Whether an opened datagram may go to chitchat: anything but a SYN may; a SYN only if the
/// digest chitchat will send back leaves room for a delta. chitchat 0.13 panics otherwise
/// (`assert!(mtu >= 100)`), which stopped the gossip task and the agent: such a SYN is dropped
/// and counted instead, and the peer hears from us when our state is small enough again.
async fn syn_is_answerable(shared: &Shared, from: SocketAddr, plain: &[u8]) -> bool {
    match judge_syn(&shared.state, &shared.syns_in_flight, plain).await {
        SynVerdict::Pass { digest_bytes } => {
            if let Some(bytes) = digest_bytes {
                note_digest(shared, bytes);
            }
            true
        }
        SynVerdict::Malformed => {
            bump(&shared.counters.dropped_syn_malformed, 1);
            if let Some(suppressed) = shared.log.check(Instant::now(), "syn_malformed") {
                warn!(from = %from, suppressed, "dropped gossip SYN: {}", digest::DigestError::Malformed);
            }
            false
        }
        SynVerdict::TooLarge {
            nodes,
            digest_bytes: predicted,
        } => {
            note_digest(shared, predicted);
            bump(&shared.counters.dropped_syn_too_large, 1);
            if let Some(suppressed) = shared.log.check(Instant::now(), "syn_too_large") {
                error!(
                    from = %from,
                    nodes,
                    digest_bytes = predicted,
                    limit = digest::GUARD_LIMIT,
                    suppressed,
                    "gossip state too large to answer a SYN (chitchat would crash building the answer): SYN dropped; gossip resumes once dead generations leave the digest (half of --dead-node-grace-secs after their death); see docs/scale.md"
                );
            }
            false
        }
    }
}

/// Receives what chitchat sends to one peer, seals it and sends it on the network.
async fn pump_out(
    proxy: Arc<UdpSocket>,
    peer: SocketAddr,
    network: Arc<UdpSocket>,
    keyring: Arc<Keyring>,
    counters: Arc<GossipCounters>,
    log: Arc<LogThrottle>,
) {
    loop {
        if proxy.readable().await.is_err() {
            return;
        }
        // Fresh capacity per datagram (not a fixed 64 KiB per peer): only received bytes are
        // touched, so hundreds of idle proxies cost no buffer memory.
        let mut buf = Vec::with_capacity(RECV_BUF);
        let plain = match proxy.try_recv_buf(&mut buf) {
            Ok(_) => buf,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                bump(&counters.recv_errors, 1);
                if let Some(suppressed) = log.check(Instant::now(), "proxy_recv") {
                    warn!(error = %e, suppressed, "gossip proxy receive error");
                }
                continue;
            }
        };
        // At most PIECE_BUDGET bytes per datagram: whole when it fits, else in pieces.
        let Some(datagrams) = seal_message(&keyring, unix_ms_now(), &plain) else {
            bump(&counters.dropped_oversize, 1);
            if let Some(suppressed) = log.check(Instant::now(), "oversize") {
                warn!(
                    peer = %peer,
                    len = plain.len(),
                    max = pieces::MAX_MESSAGE,
                    suppressed,
                    "gossip message larger than the largest chitchat datagram; dropped"
                );
            }
            continue;
        };
        if datagrams.len() > 1 {
            bump(&counters.pieced_out_messages, 1);
        }
        for sealed in datagrams {
            match network.send_to(&sealed, peer).await {
                Ok(n) => {
                    bump(&counters.sealed_out_datagrams, 1);
                    bump(&counters.sealed_out_bytes, n as u64);
                }
                Err(e) => {
                    bump(&counters.send_errors, 1);
                    if let Some(suppressed) = log.check(Instant::now(), "send_error") {
                        warn!(peer = %peer, error = %e, suppressed, "cannot send gossip datagram");
                    }
                }
            }
        }
    }
}

/// The loopback proxy standing for `peer`, opened on first use.
async fn proxy_for(
    shared: &Arc<Shared>,
    peer: SocketAddr,
) -> Result<(SocketAddr, Arc<UdpSocket>), TransportError> {
    if let Some(found) = lock(&shared.proxies).touch(&peer, Instant::now()) {
        return Ok(found);
    }
    let codec_addr = shared.codec_addr;
    let std_socket = shared
        .netns
        .run(move || -> io::Result<std::net::UdpSocket> {
            let s = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
            // Connected: the kernel delivers to the proxy only what the codec sends.
            s.connect(codec_addr)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .await?
        .map_err(|e| TransportError::Loopback(e.to_string()))?;
    let socket =
        UdpSocket::from_std(std_socket).map_err(|e| TransportError::Loopback(e.to_string()))?;
    let addr = socket
        .local_addr()
        .map_err(|e| TransportError::Loopback(e.to_string()))?;
    let socket = Arc::new(socket);
    let mut table = lock(&shared.proxies);
    // Another task may have opened one meanwhile; keep theirs so the mapping stays one-to-one.
    if let Some(found) = table.touch(&peer, Instant::now()) {
        return Ok(found);
    }
    let pump = tokio::spawn(pump_out(
        socket.clone(),
        peer,
        shared.network.clone(),
        shared.keyring.clone(),
        shared.counters.clone(),
        shared.log.clone(),
    ))
    .abort_handle();
    let evicted = table.insert(
        peer,
        Proxy {
            addr,
            socket: socket.clone(),
            last_used: Instant::now(),
            pump,
        },
    );
    bump(&shared.counters.proxies_opened, 1);
    bump(&shared.counters.proxies_closed, evicted as u64);
    Ok((addr, socket))
}

/// Sets SO_RCVBUF, past `net.core.rmem_max` when privileged (SO_RCVBUFFORCE).
fn set_recv_buffer(fd: RawFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let set = |opt| {
        // SAFETY: fd is a live socket; the option value is a c_int we own.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    if set(libc::SO_RCVBUFFORCE) == 0 || set(libc::SO_RCVBUF) == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use chitchat::transport::UdpTransport;
    use chitchat::{
        spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, ChitchatMessage,
        FailureDetectorConfig, ProtocolVersion,
    };
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::gossip::seal::{OpenError, SECRET_LEN};

    const SECRET: [u8; SECRET_LEN] = [0x42; SECRET_LEN];
    const OTHER_SECRET: [u8; SECRET_LEN] = [0x24; SECRET_LEN];

    fn assert_root() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "this test creates a network namespace and must run as root (the CI environment is root)"
        );
    }

    fn transport(secret: [u8; SECRET_LEN]) -> SealedTransport {
        SealedTransport::new(Arc::new(Keyring::new([secret]).unwrap()))
    }

    fn free_addr() -> SocketAddr {
        let s = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        s.local_addr().unwrap()
    }

    fn config(name: &str, addr: SocketAddr, seeds: &[SocketAddr]) -> ChitchatConfig {
        ChitchatConfig {
            chitchat_id: ChitchatId::new(name, 1, addr),
            cluster_id: "meshsec-test".to_string(),
            gossip_interval: Duration::from_millis(50),
            listen_addr: addr,
            seed_nodes: seeds.iter().map(|s| s.to_string()).collect(),
            failure_detector_config: FailureDetectorConfig {
                initial_interval: Duration::from_millis(200),
                ..FailureDetectorConfig::default()
            },
            marked_for_deletion_grace_period: Duration::from_secs(60),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V1,
        }
    }

    async fn spawn(
        name: &str,
        seeds: &[SocketAddr],
        transport: &dyn Transport,
    ) -> (ChitchatHandle, SocketAddr) {
        let addr = free_addr();
        let kv = vec![("who".to_string(), name.to_string())];
        let handle = spawn_chitchat(config(name, addr, seeds), kv, transport)
            .await
            .unwrap();
        (handle, addr)
    }

    /// Whether `handle` holds a node that published `who = name`.
    async fn knows(handle: &ChitchatHandle, name: &str) -> bool {
        handle
            .with_chitchat(|c| {
                c.node_states()
                    .values()
                    .any(|ns| ns.get("who") == Some(name))
            })
            .await
    }

    async fn node_count(handle: &ChitchatHandle) -> usize {
        handle.with_chitchat(|c| c.node_states().len()).await
    }

    async fn eventually<F, Fut>(within: Duration, mut cond: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if cond().await {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Receives `n` datagrams on `sock` (what a node sends to a "seed" we control).
    async fn capture(sock: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; RECV_BUF];
        while out.len() < n {
            let (len, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
                .await
                .expect("no datagram captured within 5 s")
                .unwrap();
            out.push(buf[..len].to_vec());
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn same_secret_converges() {
        assert_root();
        let ta = transport(SECRET);
        let tb = transport(SECRET);
        let (a, a_addr) = spawn("a", &[], &ta).await;
        let (b, _) = spawn("b", &[a_addr], &tb).await;
        let started = Instant::now();
        let converged = eventually(Duration::from_secs(5), || async {
            knows(&a, "b").await && knows(&b, "a").await
        })
        .await;
        assert!(
            converged,
            "a: {:?}, b: {:?}",
            ta.counters().snapshot(),
            tb.counters().snapshot()
        );
        eprintln!("converged in {:?}", started.elapsed());
        for t in [&ta, &tb] {
            let c = t.counters().snapshot();
            assert!(
                c.sealed_out_datagrams > 0 && c.opened_in_datagrams > 0,
                "{c:?}"
            );
            assert_eq!(c.dropped_unopened(), 0, "{c:?}");
        }
        // Liveness too, not only state: each sees the other as a live node.
        assert!(
            eventually(Duration::from_secs(5), || async {
                a.with_chitchat(|c| c.live_nodes().count()).await == 2
                    && b.with_chitchat(|c| c.live_nodes().count()).await == 2
            })
            .await
        );
        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn different_secret_never_joins() {
        assert_root();
        let ta = transport(SECRET);
        let tc = transport(OTHER_SECRET);
        let (a, a_addr) = spawn("a", &[], &ta).await;
        let (c, _) = spawn("c", &[a_addr], &tc).await;
        // c gossips to its seed every 50 ms; a must drop every datagram.
        assert!(
            eventually(Duration::from_secs(5), || async {
                ta.counters().dropped(OpenError::UnknownKey) >= 10
            })
            .await,
            "{:?}",
            ta.counters().snapshot()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!knows(&a, "c").await);
        assert!(!knows(&c, "a").await);
        assert_eq!(node_count(&a).await, 1);
        assert_eq!(node_count(&c).await, 1);
        let sa = ta.counters().snapshot();
        assert_eq!(sa.opened_in_datagrams, 0, "{sa:?}");
        // Nothing reached a's chitchat, so a never answered.
        assert_eq!(tc.counters().snapshot().opened_in_datagrams, 0);
        a.shutdown().await.unwrap();
        c.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_is_counted_and_changes_nothing() {
        assert_root();
        let tb = transport(SECRET);
        let (b, b_addr) = spawn("b", &[], &tb).await;
        let attacker = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let n = 2_000u64;
        for i in 0..n {
            let len = match i % 4 {
                0 => rng.gen_range(0..60),
                1 => rng.gen_range(60..1_500),
                2 => rng.gen_range(1_500..9_000),
                _ => 0,
            };
            let mut d: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if i % 3 == 0 && d.len() > 5 {
                // Plausible header: right version and key id, so the AEAD check runs.
                d[0] = crate::gossip::seal::VERSION;
                d[1..5].copy_from_slice(&Keyring::new([SECRET]).unwrap().sealing_key_id().0);
            }
            attacker.send_to(&d, b_addr).await.unwrap();
            if i % 200 == 0 {
                // Let the receiver keep up so the socket buffer does not overflow.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        assert!(
            eventually(Duration::from_secs(5), || async {
                tb.counters().snapshot().dropped_unopened() == n
            })
            .await,
            "{:?}",
            tb.counters().snapshot()
        );
        let c = tb.counters().snapshot();
        assert!(c.dropped_too_short > 0 && c.dropped_bad_tag > 0 && c.dropped_unknown_key > 0);
        assert_eq!(c.opened_in_datagrams, 0);
        assert_eq!(node_count(&b).await, 1);
        // Still serving: a legitimate node joins afterwards.
        let ta = transport(SECRET);
        let (a, _) = spawn("a", &[b_addr], &ta).await;
        assert!(eventually(Duration::from_secs(5), || async { knows(&b, "a").await }).await);
        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
    }

    /// A holder of the secret sending hostile pieces: every kind is counted, reassembly stays
    /// within its per-source bound, and the node keeps serving.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_pieces_are_counted_and_bounded() {
        assert_root();
        let tb = transport(SECRET);
        let (b, b_addr) = spawn("b", &[], &tb).await;
        let attacker = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let ring = Keyring::new([SECRET]).unwrap();
        let send = |piece: Vec<u8>| {
            let sealed = ring.seal_kind(crate::gossip::seal::PIECE_VERSION, unix_ms_now(), &piece);
            let attacker = &attacker;
            async move { attacker.send_to(&sealed, b_addr).await.unwrap() }
        };
        let piece = |id: u64, index: u16, count: u16| {
            let mut p = id.to_be_bytes().to_vec();
            p.extend_from_slice(&index.to_be_bytes());
            p.extend_from_slice(&count.to_be_bytes());
            p.extend_from_slice(&[0xab; 100]);
            p
        };
        send(piece(1, 3, 3)).await; // index past count: malformed
        send(piece(2, 0, 3)).await;
        send(piece(2, 0, 3)).await; // sealed anew (another nonce): a duplicate piece
        send(piece(2, 1, 4)).await; // another count: inconsistent, message 2 dropped
        for id in 10..20 {
            send(piece(id, 0, 2)).await; // never finished: 4 kept, 6 evicted
        }
        assert!(
            eventually(Duration::from_secs(5), || async {
                tb.counters().snapshot().pieced_in_evicted == 6
            })
            .await,
            "{:?}",
            tb.counters().snapshot()
        );
        let c = tb.counters().snapshot();
        assert_eq!(
            (
                c.dropped_piece_malformed,
                c.dropped_piece_duplicate,
                c.dropped_piece_inconsistent,
                c.pieced_in_reassembled
            ),
            (1, 1, 1, 0),
            "{c:?}"
        );
        // The 4 kept leave at the timeout (checked every 2 s).
        assert!(
            eventually(Duration::from_secs(6), || async {
                tb.counters().snapshot().pieced_in_timed_out == 4
            })
            .await,
            "{:?}",
            tb.counters().snapshot()
        );
        let ta = transport(SECRET);
        let (a, _) = spawn("a", &[b_addr], &ta).await;
        assert!(eventually(Duration::from_secs(5), || async { knows(&b, "a").await }).await);
        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replayed_datagram_opens_once() {
        assert_root();
        let tap = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let tap_addr = tap.local_addr().unwrap();
        let ta = transport(SECRET);
        let (a, _) = spawn("a", &[tap_addr], &ta).await;
        let captured = capture(&tap, 1).await.remove(0);
        a.shutdown().await.unwrap();

        let tb = transport(SECRET);
        let (b, b_addr) = spawn("b", &[], &tb).await;
        let attacker = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        attacker.send_to(&captured, b_addr).await.unwrap();
        assert!(
            eventually(Duration::from_secs(2), || async {
                tb.counters().snapshot().opened_in_datagrams == 1
            })
            .await
        );
        for _ in 0..5 {
            attacker.send_to(&captured, b_addr).await.unwrap();
        }
        assert!(
            eventually(Duration::from_secs(2), || async {
                tb.counters().dropped(OpenError::Replayed) == 5
            })
            .await,
            "{:?}",
            tb.counters().snapshot()
        );
        assert_eq!(tb.counters().snapshot().opened_in_datagrams, 1);
        b.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn old_datagram_of_a_dead_node_does_not_resurrect_it() {
        assert_root();
        let tap = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let tap_addr = tap.local_addr().unwrap();
        let ta = transport(SECRET);
        let (a, _) = spawn("a", &[tap_addr], &ta).await;
        let captured = capture(&tap, 3).await;
        a.shutdown().await.unwrap();

        let window = Duration::from_millis(700);
        let tb = transport(SECRET).with_config(SealedTransportConfig {
            replay: ReplayConfig {
                max_age: window,
                ..ReplayConfig::default()
            },
            ..SealedTransportConfig::default()
        });
        let (b, b_addr) = spawn("b", &[], &tb).await;
        tokio::time::sleep(window + Duration::from_millis(300)).await;
        let attacker = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        for d in &captured {
            attacker.send_to(d, b_addr).await.unwrap();
        }
        assert!(
            eventually(Duration::from_secs(2), || async {
                tb.counters().dropped(OpenError::Stale) == captured.len() as u64
            })
            .await,
            "{:?}",
            tb.counters().snapshot()
        );
        assert_eq!(node_count(&b).await, 1, "the dead node must not reappear");
        b.shutdown().await.unwrap();
    }

    /// Captures a genuine plaintext chitchat datagram (a V1 Syn for our cluster) from a node
    /// running chitchat's own UDP transport.
    async fn plaintext_syn() -> Vec<u8> {
        let tap = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let tap_addr = tap.local_addr().unwrap();
        let (p, _) = spawn("plain", &[tap_addr], &UdpTransport).await;
        let syn = capture(&tap, 1).await.remove(0);
        p.shutdown().await.unwrap();
        syn
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plaintext_chitchat_is_dropped() {
        assert_root();
        let syn = plaintext_syn().await;

        // Control: the captured bytes do make a plain chitchat node learn the sender.
        let (q, q_addr) = spawn("q", &[], &UdpTransport).await;
        let attacker = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        attacker.send_to(&syn, q_addr).await.unwrap();
        assert!(
            eventually(Duration::from_secs(2), || async {
                node_count(&q).await == 2
            })
            .await
        );
        q.shutdown().await.unwrap();

        let tb = transport(SECRET);
        let (b, b_addr) = spawn("b", &[], &tb).await;
        attacker.send_to(&syn, b_addr).await.unwrap();
        assert!(
            eventually(Duration::from_secs(2), || async {
                tb.counters().snapshot().dropped_unopened() == 1
            })
            .await,
            "{:?}",
            tb.counters().snapshot()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(node_count(&b).await, 1);
        assert_eq!(tb.counters().snapshot().opened_in_datagrams, 0);
        b.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn codec_socket_is_unreachable_from_the_host() {
        assert_root();
        let syn = plaintext_syn().await;
        let tb = transport(SECRET);
        let socket = tb.open_sealed(free_addr()).await.unwrap();
        let codec_addr = socket.codec_addr();
        assert!(codec_addr.ip().is_loopback());
        // The same address on the host's loopback is not the codec: a local process sending
        // plaintext there reaches nothing (or some unrelated socket), never chitchat. Were the
        // codec on the host's loopback, the datagram would arrive and be counted as unmapped.
        let mut socket = socket;
        let attacker = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let _ = attacker.send_to(&syn, codec_addr).await;
        let got = tokio::time::timeout(Duration::from_millis(500), socket.recv()).await;
        assert!(
            got.is_err(),
            "plaintext from the host reached chitchat: {got:?}"
        );
        assert_eq!(tb.counters().snapshot().dropped_unmapped, 0);
    }

    #[test]
    fn unprivileged_caller_gets_a_clear_error() {
        assert_root();
        // Drop privileges in one thread only (raw syscall: glibc's wrapper would change every
        // thread of the test process), then try to open.
        let result = std::thread::spawn(|| {
            // SAFETY: affects only this thread's credentials; the thread ends right after.
            let rc = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
            assert_eq!(rc, 0, "setresuid: {}", io::Error::last_os_error());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                transport(SECRET)
                    .open_sealed((Ipv4Addr::LOCALHOST, 0).into())
                    .await
                    .map(|_| ())
            })
        })
        .join()
        .unwrap();
        let err = result.expect_err("an unprivileged thread must not get a namespace");
        assert!(matches!(err, TransportError::Namespace(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("CAP_SYS_ADMIN") && msg.contains("root"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn port_in_use_and_on_bind_errors() {
        assert_root();
        let taken = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = taken.local_addr().unwrap();
        let err = transport(SECRET).open_sealed(addr).await.unwrap_err();
        assert!(matches!(err, TransportError::Bind { .. }), "{err:?}");
        assert!(err.to_string().contains(&addr.to_string()));

        let seen = Arc::new(AtomicU64::new(0));
        let seen2 = seen.clone();
        let t = transport(SECRET).with_on_bind(move |fd| {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: fd is the live network socket; v and len are ours.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(rc, 0);
            assert!(v >= 4 << 20, "receive buffer enlarged before the hook: {v}");
            seen2.store(fd as u64, Ordering::SeqCst);
            Err(io::Error::other("no bypass policy"))
        });
        let err = t.open_sealed(free_addr()).await.unwrap_err();
        assert!(matches!(err, TransportError::OnBind(_)), "{err:?}");
        assert!(seen.load(Ordering::SeqCst) > 2, "hook saw a real fd");
    }

    /// Dead generations of restarted hosts, as a rolling restart leaves them in every node's
    /// state: `hosts` names, each at two generations (start times in ms) and its own loopback
    /// address, none of them heard (chitchat lists them dead at its next round and drops them
    /// from its digest half a dead-node grace later).
    async fn inject_dead_generations(handle: &ChitchatHandle, hosts: usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        handle
            .with_chitchat(|c| {
                for i in 0..hosts {
                    // Loopback only: chitchat gossips to a random dead node now and then.
                    let addr = SocketAddr::from(([127, 1, (i >> 8) as u8, i as u8], 7946));
                    let first: u64 = 1_700_000_000_000 + rng.gen_range(0..86_400_000);
                    for generation in [first, first + rng.gen_range(60_000..600_000)] {
                        let id = ChitchatId::new(format!("node-{i:05}"), generation, addr);
                        let max_version = rng.gen_range(8..64);
                        c.reset_node_state_if_update(&id, std::iter::empty(), max_version, 0);
                    }
                }
            })
            .await;
    }

    /// The guard's arithmetic is chitchat's: the digest predicted from the state is, byte for
    /// byte, the one in the SYN chitchat sends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn predicted_digest_is_the_one_chitchat_sends() {
        assert_root();
        let t = transport(SECRET);
        let sink = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let mut cfg = config("a", free_addr(), &[]);
        // One round at start, then only the SYN asked for below.
        cfg.gossip_interval = Duration::from_secs(3_600);
        let a = spawn_chitchat(cfg, vec![("who".into(), "a".into())], &t)
            .await
            .unwrap();
        for hosts in [0, 40, 3_000] {
            inject_dead_generations(&a, hosts).await;
            let want = a
                .with_chitchat(|c| {
                    digest::encoded_len(&digest::own_digest(c).0, ProtocolVersion::V1)
                })
                .await;
            a.gossip(sink.local_addr().unwrap()).unwrap();
            let measured = eventually(Duration::from_secs(5), || async {
                t.counters().snapshot().digest_bytes == want as u64
            })
            .await;
            assert!(
                measured,
                "{hosts}: predicted {want}, sent {:?}",
                t.counters().snapshot()
            );
        }
        assert!(t.counters().snapshot().digest_bytes > 40_000);
        a.shutdown().await.unwrap();
    }

    /// Issue 12: past a few thousand node ids chitchat's SYN-ACK has less than 100 bytes left
    /// for its delta and chitchat 0.13 panics (`assert!(mtu >= 100)` in its delta serializer):
    /// the gossip task died, and with it every agent that a peer sent a SYN to. Here a node
    /// holds 2 × 3,500 dead generations (a rolling restart of 3,500 hosts), a peer keeps
    /// sending it SYNs, and it must live through it and gossip again once the dead generations
    /// leave its digest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_state_past_the_crash_point_does_not_kill_the_node() {
        assert_root();
        let (ta, tb) = (transport(SECRET), transport(SECRET));
        let grace = Duration::from_secs(4);
        let with_grace = |mut c: ChitchatConfig| {
            c.gossip_interval = Duration::from_millis(100);
            c.failure_detector_config.dead_node_grace_period = grace;
            c
        };
        let a_addr = free_addr();
        let kv = |n: &str| vec![("who".to_string(), n.to_string())];
        let a = spawn_chitchat(with_grace(config("a", a_addr, &[])), kv("a"), &ta)
            .await
            .unwrap();
        ta.attach(a.chitchat());
        inject_dead_generations(&a, 4_500).await;
        // Past today's crash point: chitchat could not fit a delta next to this digest.
        let digest_len = a
            .with_chitchat(|c| digest::encoded_len(&digest::own_digest(c).0, ProtocolVersion::V1))
            .await;
        assert!(
            digest_len > digest::CRASH_DIGEST_LEN,
            "only {digest_len} bytes"
        );
        let mut a_died = Box::pin(a.termination_watcher());
        let b = spawn_chitchat(
            with_grace(config("b", free_addr(), &[a_addr])),
            kv("b"),
            &tb,
        )
        .await
        .unwrap();
        // b's SYNs reach a while a's digest is past the crash point (about grace / 2).
        let survived = tokio::time::timeout(grace / 2, &mut a_died).await;
        assert!(survived.is_err(), "a's gossip task ended: {survived:?}");
        // Once the dead generations leave a's digest, the two gossip again.
        let resumed = eventually(grace * 3, || async {
            knows(&a, "b").await && knows(&b, "a").await
        })
        .await;
        assert!(
            resumed,
            "a: {:?}, b: {:?}",
            ta.counters().snapshot(),
            tb.counters().snapshot()
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(10), &mut a_died)
                .await
                .is_err(),
            "a's gossip task ended"
        );
        // What kept it alive, counted: b's SYNs refused, a's own too-large SYNs not sent.
        let c = ta.counters().snapshot();
        assert!(c.dropped_syn_too_large > 0, "{c:?}");
        assert!(c.dropped_oversize > 0, "{c:?}");
        assert!(c.digest_bytes < 4_000, "digest small again: {c:?}");
        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
    }

    /// An id is queued in flight once, however many SYNs carry it (review: repeated SYNs
    /// grew the queue without bound).
    #[tokio::test]
    async fn ids_in_flight_are_queued_once() {
        let d: digest::Digest = (0..100u32)
            .map(|i| {
                let addr = SocketAddr::from(([127, 4, 0, i as u8], 7946));
                (
                    ChitchatId::new(format!("n{i}"), 1, addr),
                    digest::NodeDigest::default(),
                )
            })
            .collect();
        let plain = digest::encode_syn(&d, ProtocolVersion::V1, "meshsec-test");
        let (state, in_flight) = (StateSlot::default(), SynsInFlight::default());
        for _ in 0..10 {
            assert!(matches!(
                judge_syn(&state, &in_flight, &plain).await,
                SynVerdict::Pass { .. }
            ));
        }
        let queued: usize = lock(&in_flight).iter().map(|(_, d)| d.len()).sum();
        assert_eq!(queued, 100);
    }

    /// The guard judges each SYN against chitchat's state, and SYNs it forwarded earlier that
    /// chitchat has not processed yet are not in that state (found in review). A secret holder
    /// sends a burst of six SYNs, each with 700 fresh node ids (~26 KB of digest): each passes
    /// alone, chitchat adds them all (report_heartbeats_in_digest) and panicked answering a
    /// later one (`assert!(mtu >= 100)`; 4 of 4 bursts) until the ids of forwarded SYNs
    /// counted towards the prediction.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_syns_in_flight_does_not_crash_chitchat() {
        assert_root();
        let keyring = Arc::new(Keyring::new([SECRET]).unwrap());
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut next = 0u32;
        for attempt in 0..5 {
            let ta = SealedTransport::new(keyring.clone());
            let a_addr = free_addr();
            let mut cfg = config("a", a_addr, &[]);
            cfg.gossip_interval = Duration::from_secs(3_600);
            let a = spawn_chitchat(cfg, vec![("who".into(), "a".into())], &ta)
                .await
                .unwrap();
            ta.attach(a.chitchat());
            let mut a_died = Box::pin(a.termination_watcher());
            let tap = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
            let mut syns = Vec::new();
            for _ in 0..6 {
                let d: digest::Digest = (0..700)
                    .map(|_| {
                        next += 1;
                        let addr =
                            SocketAddr::from(([127, 3, (next >> 8) as u8, next as u8], 7946));
                        let id = ChitchatId::new(format!("f{next}"), rng.gen(), addr);
                        let nd = digest::NodeDigest {
                            heartbeat: rng.gen_range(1..u64::MAX / 2),
                            last_gc_version: rng.gen(),
                            max_version: rng.gen(),
                        };
                        (id, nd)
                    })
                    .collect();
                assert!(digest::encoded_len(&d, ProtocolVersion::V1) < digest::GUARD_LIMIT / 2);
                let plain = digest::encode_syn(&d, ProtocolVersion::V1, "meshsec-test");
                syns.push(keyring.seal(unix_ms_now(), &plain));
            }
            for s in &syns {
                tap.send_to(s, a_addr).await.unwrap();
            }
            let died = tokio::time::timeout(Duration::from_secs(2), &mut a_died)
                .await
                .is_ok();
            assert!(
                !died,
                "attempt {attempt}: chitchat's task died of SYNs each under the guard's limit: {:?}",
                ta.counters().snapshot()
            );
            a.shutdown().await.unwrap();
        }
    }

    /// A state far above one datagram (≈ 200 KB of base64-like values) still converges: it
    /// travels as a series of near-64 KiB sealed datagrams.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_state_converges() {
        assert_root();
        let ta = transport(SECRET);
        let tb = transport(SECRET);
        let a_addr = free_addr();
        let mut kv = vec![("who".to_string(), "a".to_string())];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for i in 0..1_200 {
            let v: String = (0..150)
                .map(|_| rng.sample(rand::distributions::Alphanumeric) as char)
                .collect();
            kv.push((format!("key-{i:04}"), v));
        }
        let a = spawn_chitchat(config("a", a_addr, &[]), kv, &ta)
            .await
            .unwrap();
        let (b, _) = spawn("b", &[a_addr], &tb).await;
        let kvs = || async {
            b.with_chitchat(|c| {
                c.node_states()
                    .values()
                    .map(|n| n.num_key_values())
                    .sum::<usize>()
            })
            .await
        };
        let ok = eventually(Duration::from_secs(30), || async { kvs().await == 1_202 }).await;
        let (ca, cb) = (ta.counters().snapshot(), tb.counters().snapshot());
        assert!(ok, "b has {} key-values; a: {ca:?}; b: {cb:?}", kvs().await);
        // The state went over in messages of many pieces, none larger than the budget.
        assert!(ca.pieced_out_messages > 0, "expected big messages: {ca:?}");
        assert!(cb.pieced_in_reassembled > 0, "{cb:?}");
        assert_eq!(ca.dropped_oversize, 0);
        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
    }

    /// chitchat applies a delta for any node id, the receiver's own included:
    /// an impostor holding the secret and a victim's id writes values over the
    /// victim's record everywhere, and into the victim's own state, where
    /// they stay after the impostor is gone (evicted by a rotation). The
    /// victim's check of its own state ([`crate::gossip::own::restore`])
    /// puts its record back everywhere.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn values_forged_under_our_id_are_put_back_everywhere() {
        assert_root();
        let (ta, tb, tm) = (transport(SECRET), transport(SECRET), transport(SECRET));
        let (a, a_addr) = spawn("a", &[], &ta).await;
        let b_addr = free_addr();
        let published = vec![
            ("who".to_string(), "b".to_string()),
            ("x".to_string(), "honest".to_string()),
        ];
        let b = spawn_chitchat(config("b", b_addr, &[a_addr]), published.clone(), &tb)
            .await
            .unwrap();
        let b_id = ChitchatId::new("b", 1, b_addr);
        let x_at = |h: &ChitchatHandle| {
            let (id, c) = (b_id.clone(), h.chitchat());
            async move {
                let c = c.lock().await;
                c.node_state(&id)
                    .and_then(|n| n.get("x").map(str::to_string))
            }
        };
        assert!(
            eventually(Duration::from_secs(10), || async {
                x_at(&a).await.as_deref() == Some("honest")
            })
            .await
        );
        // The impostor: b's id, its own socket, newer versions.
        let mut cfg = config("b", free_addr(), &[a_addr]);
        cfg.chitchat_id = b_id.clone();
        let forged: Vec<(String, String)> = (0..8)
            .map(|i| (format!("f{i}"), "y".to_string()))
            .chain([("x".to_string(), "forged".to_string())])
            .collect();
        let m = spawn_chitchat(cfg, forged, &tm).await.unwrap();
        let forged_everywhere = eventually(Duration::from_secs(10), || async {
            x_at(&a).await.as_deref() == Some("forged")
                && x_at(&b).await.as_deref() == Some("forged")
        })
        .await;
        assert!(
            forged_everywhere,
            "a: {:?}, b itself: {:?}",
            x_at(&a).await,
            x_at(&b).await
        );
        m.shutdown().await.unwrap();
        // Evicted; what it wrote stays until b checks its own state.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(x_at(&a).await.as_deref(), Some("forged"));
        let restored = b
            .with_chitchat(|c| crate::gossip::own::restore(c.self_node_state(), &published))
            .await;
        assert_eq!(restored.rewritten, vec!["x".to_string()]);
        let healed = eventually(Duration::from_secs(10), || async {
            x_at(&a).await.as_deref() == Some("honest")
                && a.with_chitchat(|c| c.node_state(&b_id).is_some_and(|n| n.get("f0").is_none()))
                    .await
        })
        .await;
        assert!(healed, "a still has {:?}", x_at(&a).await);
        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
    }

    fn bad_cluster() -> ChitchatEnvelope {
        // The one message that can be built outside chitchat; enough to drive the plumbing.
        ChitchatEnvelope {
            version: ProtocolVersion::V1,
            message: ChitchatMessage::BadCluster,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_peer_maps_back_exactly_and_the_table_is_bounded() {
        assert_root();
        let keyring = Arc::new(Keyring::new([SECRET]).unwrap());
        let t = SealedTransport::new(keyring.clone()).with_config(SealedTransportConfig {
            max_peers: 2,
            ..SealedTransportConfig::default()
        });
        let mut socket = t.open_sealed(free_addr()).await.unwrap();
        let mut taps = Vec::new();
        for _ in 0..3 {
            taps.push(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap());
        }
        // Outbound: each tap gets a sealed datagram whose content is chitchat's encoding.
        let mut opener = Opener::new(keyring.clone(), ReplayConfig::default());
        let mut plain = Vec::new();
        for tap in &taps {
            socket
                .send(tap.local_addr().unwrap(), bad_cluster())
                .await
                .unwrap();
            let sealed = capture(tap, 1).await.remove(0);
            plain.push(
                opener
                    .open(unix_ms_now(), &sealed)
                    .expect("peer can open it"),
            );
        }
        assert!(plain.windows(2).all(|w| w[0] == w[1]));
        let c = t.counters().snapshot();
        assert_eq!((c.proxies_opened, c.proxies_closed), (3, 1), "{c:?}");
        assert_eq!(socket.peer_count(), 2);

        // Inbound, interleaved from all three: each envelope carries its own sender. (A table
        // big enough for all of them: evicting a proxy with a datagram in flight loses that
        // datagram, which is what UDP may do anyway, but would make this test timing-dependent.)
        drop(socket);
        let t = SealedTransport::new(keyring.clone());
        let mut socket = t.open_sealed(free_addr()).await.unwrap();
        let addr = socket.local_addr().unwrap();
        for round in 0..3 {
            for tap in &taps {
                let sealed = keyring.seal(unix_ms_now(), &plain[0]);
                tap.send_to(&sealed, addr).await.unwrap();
            }
            let mut from = Vec::new();
            for _ in 0..taps.len() {
                let got = tokio::time::timeout(Duration::from_secs(2), socket.recv())
                    .await
                    .expect("envelope delivered")
                    .unwrap();
                assert_eq!(got.envelope, bad_cluster());
                from.push(got.from_addr);
            }
            from.sort();
            let mut want: Vec<SocketAddr> = taps.iter().map(|t| t.local_addr().unwrap()).collect();
            want.sort();
            assert_eq!(from, want, "round {round}");
        }
        assert_eq!(socket.peer_count(), 3);
        assert_eq!(t.counters().snapshot().proxies_opened, 3);
    }

    #[tokio::test]
    async fn pump_out_sends_the_largest_message_in_bounded_pieces() {
        // The pump itself, on host loopback: codec -> proxy -> seal -> network -> peer.
        let codec = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let proxy = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap());
        proxy.connect(codec.local_addr().unwrap()).await.unwrap();
        let network = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap());
        let peer = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let counters = Arc::new(GossipCounters::default());
        let pump = tokio::spawn(pump_out(
            proxy.clone(),
            peer.local_addr().unwrap(),
            network,
            Arc::new(Keyring::new([SECRET]).unwrap()),
            counters.clone(),
            Arc::new(LogThrottle::new(Duration::from_secs(10))),
        ));
        let proxy_addr = proxy.local_addr().unwrap();
        let largest: Vec<u8> = (0..pieces::MAX_MESSAGE).map(|i| (i % 251) as u8).collect();
        // (Nothing larger reaches the proxy: it is one UDP payload.)
        codec.send_to(&largest, proxy_addr).await.unwrap();
        codec.send_to(b"small", proxy_addr).await.unwrap();
        let got = capture(&peer, pieces::MAX_PIECES + 1).await;
        assert!(got.iter().all(|d| d.len() <= pieces::PIECE_BUDGET));
        let mut opener = Opener::new(
            Arc::new(Keyring::new([SECRET]).unwrap()),
            ReplayConfig::default(),
        );
        let mut r = Reassembler::new(ReassemblyConfig::default());
        let from = peer.local_addr().unwrap();
        let mut whole = Vec::new();
        for d in &got {
            match opener.open_any(unix_ms_now(), d).1.unwrap() {
                Opened::Whole(p) => whole.push(p),
                Opened::Piece(p) => whole.extend(r.accept(0, from, &p).unwrap()),
            }
        }
        assert_eq!(whole, vec![largest, b"small".to_vec()]);
        let c = counters.snapshot();
        assert_eq!(
            (
                c.dropped_oversize,
                c.sealed_out_datagrams,
                c.pieced_out_messages
            ),
            (0, pieces::MAX_PIECES as u64 + 1, 1),
            "{c:?}"
        );
        pump.abort();
    }

    fn thread_alive(name: &str) -> bool {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .any(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
            })
    }

    // Single-threaded runtime on purpose: opening must not depend on a second worker thread.
    #[tokio::test]
    async fn dropping_the_socket_releases_everything() {
        assert_root();
        let t = transport(SECRET);
        let addr = free_addr();
        let mut socket = t.open_sealed(addr).await.unwrap();
        let tap = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        socket
            .send(tap.local_addr().unwrap(), bad_cluster())
            .await
            .unwrap();
        capture(&tap, 1).await;
        let thread = format!("gossip-ns-{}", addr.port());
        assert!(thread_alive(&thread));
        // chitchat's own transport contract: the address can be opened again after a drop.
        assert!(
            t.open_sealed(addr).await.is_err(),
            "address is in use while open"
        );
        drop(socket);
        assert!(
            eventually(Duration::from_secs(2), || async { !thread_alive(&thread) }).await,
            "namespace thread still running"
        );
        let reopened = eventually(Duration::from_secs(2), || async {
            t.open_sealed(addr).await.is_ok()
        })
        .await;
        assert!(reopened, "address not released");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn converges_over_ipv6() {
        assert_root();
        let free6 = || {
            let s = std::net::UdpSocket::bind("[::1]:0").unwrap();
            s.local_addr().unwrap()
        };
        let (ta, tb) = (transport(SECRET), transport(SECRET));
        let (a_addr, b_addr) = (free6(), free6());
        let kv = |n: &str| vec![("who".to_string(), n.to_string())];
        let a = spawn_chitchat(config("a", a_addr, &[]), kv("a"), &ta)
            .await
            .unwrap();
        let b = spawn_chitchat(config("b", b_addr, &[a_addr]), kv("b"), &tb)
            .await
            .unwrap();
        assert!(
            eventually(Duration::from_secs(5), || async {
                knows(&a, "b").await && knows(&b, "a").await
            })
            .await
        );
        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loopback_drops_are_counted() {
        assert_root();
        let keyring = Arc::new(Keyring::new([SECRET]).unwrap());
        let t = SealedTransport::new(keyring.clone());
        // Nobody calls recv, so the codec's queue fills up.
        let socket = t.open_sealed(free_addr()).await.unwrap();
        let tap = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let big = vec![0u8; 60_000];
        for _ in 0..20 {
            let sealed = keyring.seal(unix_ms_now(), &big);
            tap.send_to(&sealed, socket.local_addr().unwrap())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            eventually(Duration::from_secs(5), || async {
                t.counters().snapshot().loopback_drops > 0
            })
            .await,
            "{:?}",
            t.counters().snapshot()
        );
        // The kernel may drop some of the 1.2 MB itself on a loaded machine
        // (the socket's receive buffer), before the transport reads them: what
        // counts is that of those it opened, some waited in the queue.
        let c = t.counters().snapshot();
        assert!(c.opened_in_datagrams <= 20, "{c:?}");
        assert!(c.loopback_drops < c.opened_in_datagrams, "{c:?}");
    }
}
