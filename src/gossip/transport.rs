//! A chitchat [`Transport`] whose datagrams are sealed on the wire.
//!
//! chitchat turns envelopes into bytes only inside its own [`chitchat::transport::UdpSocket`], so
//! that socket is used as the codec and the bytes are intercepted on their way out and in:
//!
//! ```text
//!            private network namespace (loopback only)          host network
//!  chitchat ─ codec UdpSocket 127.0.0.1:c ⇄ proxy 127.0.0.1:p(peer) ⇄ seal/open ⇄ network socket ⇄ peer
//! ```
//!
//! - The codec socket and the proxy sockets live on the loopback interface of a network
//!   namespace created for this transport alone (a dedicated thread `unshare`s a new one and
//!   creates every loopback socket there). Another process cannot reach that loopback without
//!   CAP_SYS_ADMIN to enter the namespace, so no local process can inject plaintext gossip; on the
//!   host network only sealed datagrams are accepted.
//! - There is one proxy socket per remote peer address, so the source address chitchat sees maps
//!   back to exactly one peer, whatever order loopback delivers in. The table is bounded
//!   (least recently used entry evicted) and idle entries are collected.
//! - A sealed datagram is the chitchat datagram plus [`OVERHEAD`](super::seal::OVERHEAD) bytes. chitchat fills
//!   datagrams up to 65,507 bytes when the cluster state is that large; a sealed datagram above
//!   [`MAX_SEALED_DATAGRAM_V4`] (IPv4) or [`MAX_SEALED_DATAGRAM_V6`] (IPv6) cannot be sent, and is
//!   counted (`dropped_oversize`) and logged instead. With a few hundred bytes of keys per node
//!   this is reached only with hundreds of nodes.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::ChitchatEnvelope;
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use super::seal::{Keyring, OpenError, Opener, ReplayConfig};

/// Largest UDP payload over IPv4 (65,535 − 20 − 8); larger sealed datagrams are dropped.
pub const MAX_SEALED_DATAGRAM_V4: usize = 65_507;
/// Largest UDP payload over IPv6 without jumbograms (65,535 − 8).
pub const MAX_SEALED_DATAGRAM_V6: usize = 65_527;
/// Receive buffer size: above any UDP payload, so nothing is silently truncated.
const RECV_BUF: usize = 65_536;

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
}

impl Default for SealedTransportConfig {
    fn default() -> Self {
        SealedTransportConfig {
            replay: ReplayConfig::default(),
            max_peers: 512,
            peer_idle: Duration::from_secs(120),
            log_interval: Duration::from_secs(10),
        }
    }
}

/// Live counters of the sealed transport, shared with whoever reports status.
#[derive(Debug, Default)]
pub struct GossipCounters {
    sealed_out_datagrams: AtomicU64,
    sealed_out_bytes: AtomicU64,
    opened_in_datagrams: AtomicU64,
    opened_in_bytes: AtomicU64,
    dropped_in_bytes: AtomicU64,
    dropped: [AtomicU64; OpenError::ALL.len()],
    dropped_oversize: AtomicU64,
    dropped_unmapped: AtomicU64,
    send_errors: AtomicU64,
    recv_errors: AtomicU64,
    proxies_opened: AtomicU64,
    proxies_closed: AtomicU64,
}

/// A point-in-time copy of [`GossipCounters`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GossipCountersSnapshot {
    /// Sealed datagrams sent to peers.
    pub sealed_out_datagrams: u64,
    /// Bytes of sealed datagrams sent (UDP payload).
    pub sealed_out_bytes: u64,
    /// Datagrams that opened and were handed to chitchat.
    pub opened_in_datagrams: u64,
    /// Bytes of those datagrams as received (UDP payload).
    pub opened_in_bytes: u64,
    /// Bytes of received datagrams that were dropped.
    pub dropped_in_bytes: u64,
    /// Dropped: shorter than a sealed datagram.
    pub dropped_too_short: u64,
    /// Dropped: unknown seal version.
    pub dropped_bad_version: u64,
    /// Dropped: sealed under a key we do not hold.
    pub dropped_unknown_key: u64,
    /// Dropped: authentication failed.
    pub dropped_bad_tag: u64,
    /// Dropped: outside the freshness window.
    pub dropped_stale: u64,
    /// Dropped: already received.
    pub dropped_replayed: u64,
    /// Outbound datagrams too large to send once sealed.
    pub dropped_oversize: u64,
    /// Inbound envelopes whose loopback source no longer maps to a peer (proxy just evicted).
    pub dropped_unmapped: u64,
    /// Errors sending on the network socket.
    pub send_errors: u64,
    /// Errors receiving on the network or proxy sockets.
    pub recv_errors: u64,
    /// Peer proxies opened so far.
    pub proxies_opened: u64,
    /// Peer proxies closed so far (idle or evicted).
    pub proxies_closed: u64,
}

impl GossipCountersSnapshot {
    /// Sum of every inbound datagram dropped for failing to open.
    pub fn dropped_unopened(&self) -> u64 {
        self.dropped_too_short
            + self.dropped_bad_version
            + self.dropped_unknown_key
            + self.dropped_bad_tag
            + self.dropped_stale
            + self.dropped_replayed
    }
}

impl GossipCounters {
    /// Copies the current values.
    pub fn snapshot(&self) -> GossipCountersSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let dropped = |e: OpenError| get(self.drop_counter(e));
        GossipCountersSnapshot {
            sealed_out_datagrams: get(&self.sealed_out_datagrams),
            sealed_out_bytes: get(&self.sealed_out_bytes),
            opened_in_datagrams: get(&self.opened_in_datagrams),
            opened_in_bytes: get(&self.opened_in_bytes),
            dropped_in_bytes: get(&self.dropped_in_bytes),
            dropped_too_short: dropped(OpenError::TooShort),
            dropped_bad_version: dropped(OpenError::BadVersion),
            dropped_unknown_key: dropped(OpenError::UnknownKey),
            dropped_bad_tag: dropped(OpenError::BadTag),
            dropped_stale: dropped(OpenError::Stale),
            dropped_replayed: dropped(OpenError::Replayed),
            dropped_oversize: get(&self.dropped_oversize),
            dropped_unmapped: get(&self.dropped_unmapped),
            send_errors: get(&self.send_errors),
            recv_errors: get(&self.recv_errors),
            proxies_opened: get(&self.proxies_opened),
            proxies_closed: get(&self.proxies_closed),
        }
    }

    /// Datagrams dropped for `reason`.
    pub fn dropped(&self, reason: OpenError) -> u64 {
        self.drop_counter(reason).load(Ordering::Relaxed)
    }

    fn drop_counter(&self, reason: OpenError) -> &AtomicU64 {
        let i = OpenError::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        &self.dropped[i]
    }
}

fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

/// Lets one log line per key through per interval and counts the ones it held back, so a
/// flood of bad datagrams costs counters, not log volume.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    slots: Mutex<HashMap<&'static str, (Option<Instant>, u64)>>,
}

impl RateLimiter {
    /// A limiter letting one line per key through every `interval`.
    pub fn new(interval: Duration) -> Self {
        RateLimiter {
            interval,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed_since_last_line)` if a line for `key` may be logged at `now`.
    pub fn check(&self, now: Instant, key: &'static str) -> Option<u64> {
        let mut slots = lock(&self.slots);
        let (last, suppressed) = slots.entry(key).or_insert((None, 0));
        match last {
            Some(t) if now.saturating_duration_since(*t) < self.interval => {
                *suppressed += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(suppressed))
            }
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

fn max_sealed_len(to: &SocketAddr) -> usize {
    match to {
        SocketAddr::V4(_) => MAX_SEALED_DATAGRAM_V4,
        SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_some() => MAX_SEALED_DATAGRAM_V4,
        SocketAddr::V6(_) => MAX_SEALED_DATAGRAM_V6,
    }
}

/// A chitchat transport that seals every datagram; see the module docs.
#[derive(Clone)]
pub struct SealedTransport {
    keyring: Arc<Keyring>,
    counters: Arc<GossipCounters>,
    config: SealedTransportConfig,
    on_bind: Option<OnBind>,
}

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
        }
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
        if let Some(hook) = &self.on_bind {
            hook(network.as_raw_fd()).map_err(TransportError::OnBind)?;
        }
        let local_addr = network.local_addr().map_err(|error| TransportError::Bind {
            addr: listen_addr,
            error,
        })?;
        let netns = PrivateNetns::spawn().await?;
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
            log: Arc::new(RateLimiter::new(self.config.log_interval)),
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
    /// Number of peers that currently have a loopback proxy.
    pub fn peer_count(&self) -> usize {
        lock(&self.shared.proxies).by_peer.len()
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
        self.codec.send(proxy_addr, envelope).await
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
    log: Arc<RateLimiter>,
}

/// Receives from the network, opens, and hands plaintext to chitchat through the peer's proxy.
async fn pump_in(shared: Arc<Shared>, mut opener: Opener) {
    let mut buf = vec![0u8; RECV_BUF];
    let mut sweep = tokio::time::interval(shared.config.peer_idle.max(Duration::from_secs(1)) / 2);
    loop {
        let received = tokio::select! {
            r = shared.network.recv_from(&mut buf) => r,
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
        match opener.open(unix_ms_now(), datagram) {
            Ok(plain) => {
                bump(&shared.counters.opened_in_datagrams, 1);
                bump(&shared.counters.opened_in_bytes, len as u64);
                match proxy_for(&shared, from).await {
                    Ok((_, proxy)) => {
                        if let Err(e) = proxy.send(&plain).await {
                            bump(&shared.counters.send_errors, 1);
                            if let Some(suppressed) =
                                shared.log.check(Instant::now(), "loopback_send")
                            {
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

/// Receives what chitchat sends to one peer, seals it and sends it on the network.
async fn pump_out(
    proxy: Arc<UdpSocket>,
    peer: SocketAddr,
    network: Arc<UdpSocket>,
    keyring: Arc<Keyring>,
    counters: Arc<GossipCounters>,
    log: Arc<RateLimiter>,
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
        let sealed = keyring.seal(unix_ms_now(), &plain);
        if sealed.len() > max_sealed_len(&peer) {
            bump(&counters.dropped_oversize, 1);
            if let Some(suppressed) = log.check(Instant::now(), "oversize") {
                warn!(
                    peer = %peer,
                    len = sealed.len(),
                    max = max_sealed_len(&peer),
                    suppressed,
                    "gossip datagram too large to send once sealed; dropped"
                );
            }
            continue;
        }
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

struct Proxy {
    addr: SocketAddr,
    socket: Arc<UdpSocket>,
    last_used: Instant,
    pump: AbortHandle,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// Peer address ⇄ loopback proxy, one-to-one, bounded.
struct ProxyTable {
    by_peer: HashMap<SocketAddr, Proxy>,
    peer_of: HashMap<SocketAddr, SocketAddr>,
    max: usize,
}

impl ProxyTable {
    fn new(max: usize) -> Self {
        ProxyTable {
            by_peer: HashMap::new(),
            peer_of: HashMap::new(),
            max: max.max(1),
        }
    }

    fn touch(&mut self, peer: &SocketAddr, now: Instant) -> Option<(SocketAddr, Arc<UdpSocket>)> {
        let p = self.by_peer.get_mut(peer)?;
        p.last_used = now;
        Some((p.addr, p.socket.clone()))
    }

    fn peer_of(&self, proxy_addr: &SocketAddr) -> Option<SocketAddr> {
        self.peer_of.get(proxy_addr).copied()
    }

    /// Inserts, evicting the least recently used entries beyond the bound; returns how many.
    fn insert(&mut self, peer: SocketAddr, proxy: Proxy) -> usize {
        let mut evicted = 0;
        while self.by_peer.len() >= self.max {
            let Some(oldest) = self
                .by_peer
                .iter()
                .min_by_key(|(_, p)| p.last_used)
                .map(|(a, _)| *a)
            else {
                break;
            };
            self.remove(&oldest);
            evicted += 1;
        }
        self.peer_of.insert(proxy.addr, peer);
        self.by_peer.insert(peer, proxy);
        evicted
    }

    fn remove(&mut self, peer: &SocketAddr) {
        if let Some(p) = self.by_peer.remove(peer) {
            self.peer_of.remove(&p.addr);
        }
    }

    /// Closes proxies idle for at least `idle`; returns how many.
    fn sweep(&mut self, now: Instant, idle: Duration) -> usize {
        let stale: Vec<SocketAddr> = self
            .by_peer
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.last_used) >= idle)
            .map(|(a, _)| *a)
            .collect();
        for peer in &stale {
            self.remove(peer);
        }
        stale.len()
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread living in a network namespace of its own, creating sockets there on request. The
/// namespace lasts as long as the thread or any socket created in it.
struct PrivateNetns {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl PrivateNetns {
    async fn spawn() -> Result<Self, TransportError> {
        let (jobs, job_rx) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("meshsec-gossip-ns".into())
            .spawn(move || {
                let entered = enter_private_netns();
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if !ok {
                    return;
                }
                // Ends when the transport drops its sender.
                while let Ok(job) = job_rx.recv() {
                    job();
                }
            })
            .map_err(TransportError::Namespace)?;
        ready_rx
            .await
            .map_err(|_| TransportError::NamespaceGone)?
            .map_err(TransportError::Namespace)?;
        Ok(PrivateNetns { jobs })
    }

    /// Runs `f` on the namespace's thread.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, TransportError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| TransportError::NamespaceGone)?;
        rx.await.map_err(|_| TransportError::NamespaceGone)
    }
}

/// Moves the calling thread (only) into a new network namespace and brings its loopback up.
fn enter_private_netns() -> io::Result<()> {
    // SAFETY: plain syscall; CLONE_NEWNET affects only the calling thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    bring_loopback_up()
}

fn bring_loopback_up() -> io::Result<()> {
    // SAFETY: plain syscall; the fd is owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an ifreq we own, with a NUL-terminated name.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut ifr) < 0 {
            return Err(io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &ifr) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
