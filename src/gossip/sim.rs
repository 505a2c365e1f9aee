//! Many agents' gossip in one process, over an in-memory network with loss and latency
//! (issue 12's scale simulation; `examples/gossip_sim.rs` prints its table, docs/benchmarks.md
//! has today's figures).
//!
//! Each simulated node runs what the agent runs for gossip, minus the sockets:
//! - chitchat with the agent's settings (cluster id, gossip interval, failure detector,
//!   protocol V1) and the agent's signed record ([`super::records::signed_key_values`]);
//! - meshsec's sealing on every datagram ([`super::seal::Keyring::seal`] out,
//!   [`super::seal::Opener::open`] with the replay window in), and the transport's SYN guard
//!   (`transport::judge_syn`, the same function the real transport calls);
//! - the membership view the agent computes every 250 ms: `agent::ObservedCache`, the
//!   [`super::members::HeardTracker`], the [`super::records::RecordTracker`] (signature
//!   checks), [`super::pins::Pins`] and [`super::members::view`].
//!
//! What is not run: the loopback proxies and private namespace of the real transport (they
//! carry the same bytes), the mesh (no handshakes, no datapath: gossip only), the control
//! socket, the agent's logging. The wire figures are sealed datagrams, what a host's UDP socket
//! would send. The view is the agent's with [`ViewMode::Agent`]; [`ViewMode::Cached`] skips
//! re-verifying unchanged records (same views, less CPU) so that large sizes fit the machine.
//!
//! Time: run inside a tokio runtime with a paused clock (`start_paused`); chitchat's timers and
//! failure detector use tokio's clock, so the clock jumps whenever every task waits and the
//! figures are in virtual time, whatever the machine's load. Seal stamps and the view's
//! instants are derived from the same clock. CPU per node is the CPU time of the simulation's
//! one thread divided by the nodes and the virtual seconds it covered: the share of one core a
//! real node would spend. chitchat encodes and decodes only inside its own UDP socket, so each
//! message makes one round trip through a loopback socket (see `Codec`); should the kernel
//! defer that delivery (it does on a loaded machine), the paused clock is held until it arrives.
//!
//! Nothing here reaches the network: addresses are 198.18.0.0/15 (RFC 2544, benchmarking) and
//! only name mailboxes in this process.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::{
    spawn_chitchat, ChitchatConfig, ChitchatEnvelope, ChitchatHandle, ChitchatId, ProtocolVersion,
};
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::members::{self, HeardTracker, Member, MemberState};
use super::pieces::{seal_message, Reassembler, ReassemblyConfig};
use super::pins::Pins;
use super::records::{check, signed_key_values, Check, RecordTracker, SignedRecord};
use super::schema::{NodeInfo, PROTOCOL_VERSION};
use super::seal::{Keyring, Opened, Opener, ReplayConfig};
use super::transport::{judge_syn, StateSlot, SynVerdict, SynsInFlight, MAX_SEALED_DATAGRAM_V4};
use crate::identity::SigningKey;

/// The datagram size the issue asks never to exceed (no IP fragmentation on a 1,500-byte path
/// with tunnels or options in front).
pub const DATAGRAM_GOAL: usize = 1_400;
const GOSSIP_PORT: u16 = 9340;
/// Unix ms at the simulation's start (seal stamps).
const EPOCH_MS: u64 = 1_790_000_000_000;

/// Network and cluster settings of one simulation.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Hosts started cold at once.
    pub nodes: usize,
    /// Seed addresses every host is given (the first hosts).
    pub seeds: usize,
    /// chitchat's gossip interval (the agent's default is 500 ms).
    pub gossip_interval: Duration,
    /// How often each node computes its membership view (the agent: 250 ms). Longer saves the
    /// machine at large sizes, at the cost of that resolution on the times measured; a
    /// witness (see [`ViewMode`]) keeps the agent's interval.
    pub view_interval: Duration,
    /// One-way latency of every datagram.
    pub latency: Duration,
    /// Extra latency, uniform in [0, jitter].
    pub jitter: Duration,
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// How long each phase may take before it is reported as not reached.
    pub phase_limit: Duration,
    /// The idle window over which traffic and CPU are measured.
    pub idle_window: Duration,
    /// Seed of the network's randomness (loss, jitter); chitchat's own peer choice is random.
    pub seed: u64,
    /// How records are judged in the views.
    pub view: ViewMode,
}

/// How the simulated nodes judge signed records each view round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ViewMode {
    /// As the agent does today: every node's `RecordTracker` verifies every record's Ed25519
    /// signature every round (N verifications per node per 250 ms).
    Agent,
    /// Every node takes a record whose exact content already verified from a process-wide
    /// cache (checking only new content), so large clusters fit in the machine; the views are
    /// the same. With `witness`, node 0 runs the agent's view instead, and its CPU is the
    /// per-node view figure reported (without, that figure is the cached view's).
    Cached {
        /// Node 0 runs the agent's view.
        witness: bool,
    },
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 50,
            seeds: 3,
            gossip_interval: Duration::from_millis(500),
            view_interval: crate::agent::VIEW_INTERVAL,
            latency: Duration::from_millis(5),
            jitter: Duration::from_millis(5),
            loss: 0.01,
            phase_limit: Duration::from_secs(60),
            idle_window: Duration::from_secs(10),
            seed: 1,
            view: ViewMode::Agent,
        }
    }
}

/// Traffic seen on the simulated wire (sealed datagrams, before loss).
#[derive(Debug, Clone, Default)]
pub struct WireStats {
    /// Datagrams sent.
    pub datagrams: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Datagrams larger than [`DATAGRAM_GOAL`].
    pub over_goal: u64,
    /// Datagrams lost on purpose.
    pub lost: u64,
    /// Messages chitchat built that no UDP datagram could carry (not sent).
    pub oversize: u64,
    /// Messages sent in pieces (each piece is one of `datagrams`).
    pub pieced: u64,
    sizes: Vec<u64>,
}

impl WireStats {
    fn record(&mut self, len: usize) {
        if self.sizes.is_empty() {
            self.sizes = vec![0; MAX_SEALED_DATAGRAM_V4 + 1];
        }
        self.datagrams += 1;
        self.bytes += len as u64;
        self.over_goal += u64::from(len > DATAGRAM_GOAL);
        self.sizes[len.min(MAX_SEALED_DATAGRAM_V4)] += 1;
    }

    /// The size at or below which `q` (0..=1) of the datagrams were.
    pub fn quantile(&self, q: f64) -> usize {
        let want = ((self.datagrams as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (len, n) in self.sizes.iter().enumerate() {
            seen += n;
            if seen >= want {
                return len;
            }
        }
        0
    }

    fn add(&mut self, o: &WireStats) {
        self.datagrams += o.datagrams;
        self.bytes += o.bytes;
        self.over_goal += o.over_goal;
        self.lost += o.lost;
        self.oversize += o.oversize;
        self.pieced += o.pieced;
        if self.sizes.len() < o.sizes.len() {
            self.sizes.resize(o.sizes.len(), 0);
        }
        for (a, b) in self.sizes.iter_mut().zip(&o.sizes) {
            *a += b;
        }
    }

    /// The largest datagram.
    pub fn max(&self) -> usize {
        self.sizes.iter().rposition(|&n| n > 0).unwrap_or(0)
    }
}

/// A sealed datagram on its way: (from, bytes).
type Mailbox = mpsc::UnboundedSender<(SocketAddr, Vec<u8>)>;

struct NetInner {
    boxes: HashMap<SocketAddr, Mailbox>,
    rng: rand::rngs::StdRng,
    stats: WireStats,
}

/// The in-memory network: one mailbox per address, each datagram delayed and maybe lost.
struct Network {
    latency: Duration,
    jitter: Duration,
    loss: f64,
    inner: Mutex<NetInner>,
}

impl Network {
    fn lock(&self) -> std::sync::MutexGuard<'_, NetInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, from: SocketAddr, to: SocketAddr, datagram: Vec<u8>) {
        let (tx, delay) = {
            let mut n = self.lock();
            n.stats.record(datagram.len());
            if self.loss > 0.0 && n.rng.gen_bool(self.loss) {
                n.stats.lost += 1;
                return;
            }
            let Some(tx) = n.boxes.get(&to).cloned() else {
                return;
            };
            let jitter = if self.jitter.is_zero() {
                Duration::ZERO
            } else {
                self.jitter.mul_f64(n.rng.gen::<f64>())
            };
            (tx, self.latency + jitter)
        };
        if delay.is_zero() {
            let _ = tx.send((from, datagram));
        } else {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = tx.send((from, datagram));
            });
        }
    }
}

/// The simulation's clock: tokio's (virtual when paused) as the values the agent reads.
#[derive(Clone, Copy)]
struct Clock {
    start: Instant,
}

impl Clock {
    fn unix_ms(&self) -> u64 {
        EPOCH_MS + self.mono_ms()
    }

    fn mono_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

/// chitchat's own codec. chitchat 0.13 encodes and decodes envelopes only inside its
/// `UdpSocket` (the real transport uses it the same way, see `transport`): `enc` writes an
/// envelope to the loopback `sink`, read back at once; bytes written to `dec` are read back as
/// an envelope. One codec serves every node, one datagram at a time under its lock, so what is
/// read back is what was just written. Linux's loopback normally delivers before `send_to`
/// returns, so tokio's paused clock does not move while a datagram is in there.
struct Codec {
    enc: chitchat::transport::UdpSocket,
    sink: std::net::UdpSocket,
    dec: Box<dyn Socket>,
    dec_addr: SocketAddr,
    buf: Vec<u8>,
}

/// Encoding or decoding through the loopback codec failed (not expected: the simulation only
/// decodes what it encoded).
#[derive(Debug, thiserror::Error)]
#[error("the simulation's loopback codec failed: {0}")]
struct CodecError(String);

impl Codec {
    async fn open() -> anyhow::Result<Codec> {
        let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let sink = std::net::UdpSocket::bind(local)?;
        sink.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        let enc = chitchat::transport::UdpSocket::open(local).await?;
        let dec: Box<dyn Socket> = Box::new(chitchat::transport::UdpSocket::open(local).await?);
        let dec_addr = dec.local_addr()?;
        Ok(Codec {
            enc,
            sink,
            dec,
            dec_addr,
            buf: vec![0; 65_536],
        })
    }

    /// chitchat's bytes for `env`, or None when chitchat cannot send them as one UDP datagram
    /// (EMSGSIZE; the real transport counts those as `dropped_oversize`).
    async fn encode(&mut self, env: ChitchatEnvelope) -> anyhow::Result<Option<Vec<u8>>> {
        let to = self.sink.local_addr()?;
        if self.enc.send(to, env).await.is_err() {
            return Ok(None);
        }
        let (n, _) = self
            .sink
            .recv_from(&mut self.buf)
            .map_err(|e| CodecError(format!("sink: {e}")))?;
        Ok(Some(self.buf[..n].to_vec()))
    }

    async fn decode(&mut self, plain: &[u8]) -> anyhow::Result<ChitchatEnvelope> {
        self.sink.send_to(plain, self.dec_addr)?;
        let recv = self.dec.recv();
        tokio::pin!(recv);
        let ready = tokio::select! {
            biased;
            r = &mut recv => Some(r),
            _ = std::future::ready(()) => None,
        };
        let received = match ready {
            Some(r) => r,
            None => {
                // Loopback has not delivered yet (the kernel defers it on a loaded machine):
                // hold the paused clock until it has, or virtual time jumps meanwhile and the
                // figures with it. A running blocking task stops tokio's auto-advance.
                let (done, wait) = std::sync::mpsc::channel::<()>();
                let hold = tokio::task::spawn_blocking(move || {
                    let _ = wait.recv_timeout(std::time::Duration::from_secs(5));
                });
                let r = tokio::time::timeout(Duration::from_secs(1), recv).await;
                drop(done);
                let _ = hold.await;
                match r {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(
                            CodecError("a datagram chitchat encoded did not decode".into()).into(),
                        )
                    }
                }
            }
        };
        Ok(received?.envelope)
    }
}

type SharedCodec = Arc<tokio::sync::Mutex<Codec>>;

/// A chitchat transport over the in-memory network, sealing like the real one.
struct SimTransport {
    net: Arc<Network>,
    keyring: Arc<Keyring>,
    clock: Clock,
    state: StateSlot,
    counters: Arc<NodeCounters>,
    codec: SharedCodec,
}

#[derive(Default)]
struct NodeCounters {
    open_failed: std::sync::atomic::AtomicU64,
    syn_dropped: std::sync::atomic::AtomicU64,
    /// Messages sent in pieces that never completed (a piece lost, or evicted).
    pieces_lost: std::sync::atomic::AtomicU64,
}

struct SimSocket {
    addr: SocketAddr,
    net: Arc<Network>,
    keyring: Arc<Keyring>,
    clock: Clock,
    codec: SharedCodec,
    inbox: mpsc::UnboundedReceiver<RecvOutcome>,
    pump: JoinHandle<()>,
}

impl Drop for SimSocket {
    fn drop(&mut self) {
        self.pump.abort();
        self.net.lock().boxes.remove(&self.addr);
    }
}

#[async_trait]
impl Transport for SimTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let (tx, mut rx) = mpsc::unbounded_channel::<(SocketAddr, Vec<u8>)>();
        if self.net.lock().boxes.insert(listen_addr, tx).is_some() {
            anyhow::bail!("address {listen_addr} in use");
        }
        let (in_tx, inbox) = mpsc::unbounded_channel();
        let mut opener = Opener::new(self.keyring.clone(), ReplayConfig::default());
        let (clock, state, counters) = (self.clock, self.state.clone(), self.counters.clone());
        let codec = self.codec.clone();
        // Opened, judged and decoded outside chitchat's recv (which must stay cancel-safe), as
        // the real transport's pump does.
        let pump = tokio::spawn(async move {
            use std::sync::atomic::Ordering::Relaxed;
            let in_flight = SynsInFlight::default();
            let mut pieces = Reassembler::new(ReassemblyConfig::default());
            while let Some((from, datagram)) = rx.recv().await {
                // Incomplete messages are counted lost at their timeout, pieces or not (the
                // real transport checks every 2 s).
                pieces.expire(clock.mono_ms());
                let c = pieces.take_counts();
                counters
                    .pieces_lost
                    .fetch_add(c.timed_out + c.evicted, Relaxed);
                let plain = match opener.open_any(clock.unix_ms(), &datagram).1 {
                    Ok(Opened::Whole(plain)) => plain,
                    Ok(Opened::Piece(piece)) => {
                        let done = pieces.accept(clock.mono_ms(), from, &piece);
                        match done {
                            Ok(Some(plain)) => plain,
                            Ok(None) => continue,
                            Err(_) => {
                                counters.open_failed.fetch_add(1, Relaxed);
                                continue;
                            }
                        }
                    }
                    Err(_) => {
                        counters.open_failed.fetch_add(1, Relaxed);
                        continue;
                    }
                };
                if !matches!(
                    judge_syn(&state, &in_flight, &plain).await,
                    SynVerdict::Pass { .. }
                ) {
                    counters.syn_dropped.fetch_add(1, Relaxed);
                    continue;
                }
                let envelope = match codec.lock().await.decode(&plain).await {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!("{e:#}");
                        counters.open_failed.fetch_add(1, Relaxed);
                        continue;
                    }
                };
                let outcome = RecvOutcome {
                    from_addr: from,
                    envelope,
                    num_bytes_received: datagram.len(),
                };
                if in_tx.send(outcome).is_err() {
                    return;
                }
            }
        });
        Ok(Box::new(SimSocket {
            addr: listen_addr,
            net: self.net.clone(),
            keyring: self.keyring.clone(),
            clock: self.clock,
            codec: self.codec.clone(),
            inbox,
            pump,
        }))
    }
}

#[async_trait]
impl Socket for SimSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.addr)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let Some(plain) = self.codec.lock().await.encode(envelope).await? else {
            // The real transport drops and counts these (`dropped_oversize`).
            self.net.lock().stats.oversize += 1;
            return Ok(SendOutcome { num_bytes_sent: 0 });
        };
        match seal_message(&self.keyring, self.clock.unix_ms(), &plain) {
            Some(datagrams) => {
                if datagrams.len() > 1 {
                    self.net.lock().stats.pieced += 1;
                }
                for sealed in datagrams {
                    self.net.send(self.addr, to, sealed);
                }
            }
            None => self.net.lock().stats.oversize += 1,
        }
        Ok(SendOutcome {
            num_bytes_sent: plain.len(),
        })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        match self.inbox.recv().await {
            Some(r) => Ok(r),
            None => anyhow::bail!("simulated socket closed"),
        }
    }
}

struct Node {
    name: String,
    handle: Option<ChitchatHandle>,
    view: Arc<Mutex<Arc<Vec<Member>>>>,
    tracker: JoinHandle<()>,
}

/// One cluster of simulated nodes.
struct Cluster {
    cfg: SimConfig,
    net: Arc<Network>,
    keyring: Arc<Keyring>,
    clock: Clock,
    nodes: Vec<Node>,
    counters: Arc<NodeCounters>,
    /// CPU time spent computing views: every node's, node 0's.
    view_cpu: Arc<Mutex<(Duration, Duration)>>,
    codec: SharedCodec,
    verified: VerifiedCache,
}

/// Records whose exact content verified, by a digest of that content ([`ViewMode::Cached`]).
type VerifiedCache = Arc<Mutex<HashMap<[u8; 32], SignedRecord>>>;

fn addr_of(i: usize) -> SocketAddr {
    SocketAddr::from((
        Ipv4Addr::new(198, 18 + (i >> 16) as u8, (i >> 8) as u8, i as u8),
        GOSSIP_PORT,
    ))
}

fn name_of(i: usize) -> String {
    format!("node-{i:05}")
}

impl Cluster {
    async fn new(cfg: SimConfig) -> anyhow::Result<Self> {
        let net = Arc::new(Network {
            latency: cfg.latency,
            jitter: cfg.jitter,
            loss: cfg.loss,
            inner: Mutex::new(NetInner {
                boxes: HashMap::new(),
                rng: rand::rngs::StdRng::seed_from_u64(cfg.seed),
                stats: WireStats::default(),
            }),
        });
        let keyring = Arc::new(Keyring::new([[0x5e; 32]]).expect("one secret"));
        Ok(Cluster {
            cfg,
            net,
            keyring,
            clock: Clock {
                start: Instant::now(),
            },
            nodes: Vec::new(),
            counters: Arc::default(),
            view_cpu: Arc::default(),
            verified: Arc::default(),
            codec: Arc::new(tokio::sync::Mutex::new(Codec::open().await?)),
        })
    }

    async fn start_node(&mut self) -> anyhow::Result<()> {
        let i = self.nodes.len();
        let name = name_of(i);
        let generation = self.clock.unix_ms();
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        let signing = SigningKey::from_seed(seed);
        let mut public = [0u8; 32];
        public[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let info = NodeInfo {
            public_key: Some(public),
            data_addrs: vec![addr_of(i).ip()],
            handshake_port: Some(9341),
            protocol: Some(PROTOCOL_VERSION),
            left: false,
        };
        let published = signed_key_values(&info, &name, generation, &signing);
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(name.clone(), generation, addr_of(i)),
            cluster_id: crate::agent::CLUSTER_ID.to_string(),
            gossip_interval: self.cfg.gossip_interval,
            listen_addr: addr_of(i),
            seed_nodes: (0..self.cfg.seeds.max(1))
                .filter(|&s| s != i)
                .map(|s| addr_of(s).to_string())
                .collect(),
            failure_detector_config: crate::agent::failure_detector_for(
                self.cfg.gossip_interval,
                Duration::from_secs(600),
            ),
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V1,
        };
        let state = StateSlot::default();
        let transport = SimTransport {
            net: self.net.clone(),
            keyring: self.keyring.clone(),
            clock: self.clock,
            state: state.clone(),
            counters: self.counters.clone(),
            codec: self.codec.clone(),
        };
        let handle = spawn_chitchat(config, published.clone(), &transport).await?;
        let _ = state.set(handle.chitchat());
        let view = Arc::new(Mutex::new(Arc::new(Vec::new())));
        let judge = match (self.cfg.view, i) {
            (ViewMode::Agent, _) | (ViewMode::Cached { witness: true }, 0) => {
                Judge::Agent(RecordTracker::default())
            }
            (ViewMode::Cached { .. }, _) => Judge::Cached {
                cache: self.verified.clone(),
                last: HashMap::new(),
            },
        };
        // The witness computes its view as often as the agent does, whatever the others do.
        let interval = match judge {
            Judge::Agent(_) => crate::agent::VIEW_INTERVAL.min(self.cfg.view_interval),
            Judge::Cached { .. } => self.cfg.view_interval,
        };
        let tracker = tokio::spawn(track(
            handle.chitchat(),
            name.clone(),
            published,
            view.clone(),
            interval,
            judge,
            (self.view_cpu.clone(), i == 0),
        ));
        self.nodes.push(Node {
            name,
            handle: Some(handle),
            view,
            tracker,
        });
        Ok(())
    }

    /// Stops a node without a word (a crash or a pulled cable).
    async fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.tracker.abort();
        if let Some(h) = node.handle.take() {
            let _ = h.shutdown().await;
        }
        self.net.lock().boxes.remove(&addr_of(i));
    }

    fn running(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.handle.is_some())
    }

    /// Waits (checking every view interval) until `done` holds for every running node's view.
    async fn until(&self, done: impl Fn(&[Member]) -> bool) -> Option<Duration> {
        let start = Instant::now();
        loop {
            if self
                .running()
                .all(|n| done(&n.view.lock().unwrap_or_else(|e| e.into_inner())))
            {
                return Some(start.elapsed());
            }
            if start.elapsed() > self.cfg.phase_limit {
                return None;
            }
            tokio::time::sleep(crate::agent::VIEW_INTERVAL).await;
        }
    }

    fn take_stats(&self) -> WireStats {
        std::mem::take(&mut self.net.lock().stats)
    }
}

/// How one node judges records.
enum Judge {
    /// The agent's tracker.
    Agent(RecordTracker),
    /// The process-wide cache, and this node's last valid record per (name, generation) (what
    /// `RecordTracker` falls back to while a re-signature is arriving).
    Cached {
        cache: VerifiedCache,
        last: HashMap<(String, u64), SignedRecord>,
    },
}

fn content_key(o: &members::Observed) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update((o.name.len() as u64).to_be_bytes());
    h.update(o.name.as_bytes());
    h.update(o.generation.to_be_bytes());
    for (k, v) in &o.key_values {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_be_bytes());
        h.update(v.as_bytes());
    }
    h.finalize().into()
}

impl Judge {
    fn valid(
        &mut self,
        observed: &[members::Observed],
        now: std::time::Instant,
    ) -> HashMap<(String, u64), SignedRecord> {
        match self {
            Judge::Agent(t) => t.observe(observed, now).valid,
            Judge::Cached { cache, last } => {
                let mut valid = HashMap::new();
                for o in observed {
                    let key = (o.name.clone(), o.generation);
                    let content = content_key(o);
                    let known = cache
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&content)
                        .cloned();
                    let record = match known {
                        Some(r) => Some(r),
                        None => match check(o) {
                            Check::Valid(r) => {
                                cache
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .insert(content, r.clone());
                                Some(r)
                            }
                            _ => last.get(&key).cloned(),
                        },
                    };
                    if let Some(r) = record {
                        valid.insert(key, r);
                    }
                }
                last.clone_from(&valid);
                valid
            }
        }
    }
}

/// The agent's membership view loop (`agent::track_members`), minus logs and channels.
async fn track(
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    self_name: String,
    published: Vec<(String, String)>,
    out: Arc<Mutex<Arc<Vec<Member>>>>,
    interval: Duration,
    mut judge: Judge,
    (cpu, witness): (Arc<Mutex<(Duration, Duration)>>, bool),
) {
    let mut heard = HeardTracker::default();
    let mut cache = crate::agent::ObservedCache::default();
    let mut pins = Pins::in_memory();
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        let t0 = cpu_time();
        {
            let mut c = chitchat.lock().await;
            let _ = super::own::restore(c.self_node_state(), &published);
            cache.refresh(&c);
        }
        let observed = cache.nodes();
        // The view's sans-IO functions take the instant as a value: virtual time, as std.
        let now = Instant::now().into_std();
        let h = heard.observe(observed, now);
        let mut valid = judge.valid(observed, now);
        pins.apply(&mut valid);
        let view = members::view(
            observed,
            &h,
            &valid,
            &self_name,
            now,
            crate::agent::suspect_after(),
        );
        // As the agent: a new view only when more than last-heard times changed.
        let mut shown = out.lock().unwrap_or_else(|e| e.into_inner());
        if !members::same_but_heard(&shown, &view) {
            *shown = Arc::new(view);
        }
        drop(shown);
        let spent = cpu_time().saturating_sub(t0);
        let mut c = cpu.lock().unwrap_or_else(|e| e.into_inner());
        c.0 += spent;
        if witness {
            c.1 += spent;
        }
    }
}

/// Figures of one simulation run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SimReport {
    /// Hosts started cold.
    pub nodes: usize,
    /// Virtual seconds until every node listed every node alive (None: not within the limit).
    pub converge_secs: Option<f64>,
    /// Virtual seconds until one more host was listed alive everywhere (and listed everyone).
    pub join_secs: Option<f64>,
    /// Virtual seconds until a killed host was listed dead everywhere.
    pub dead_secs: Option<f64>,
    /// Idle gossip per node: sealed bytes sent per second.
    pub idle_bytes_per_node_s: f64,
    /// Idle gossip per node: datagrams sent per second.
    pub idle_datagrams_per_node_s: f64,
    /// Median sealed datagram at idle.
    pub idle_p50_bytes: usize,
    /// 99th percentile sealed datagram at idle.
    pub idle_p99_bytes: usize,
    /// Largest sealed datagram of the whole run.
    pub max_datagram_bytes: usize,
    /// Datagrams of the whole run above 1,400 bytes.
    pub datagrams_over_goal: u64,
    /// Datagrams of the whole run.
    pub datagrams: u64,
    /// Messages no UDP datagram could carry.
    pub oversize: u64,
    /// Messages sent in pieces (chitchat datagrams larger than one 1,400-byte datagram).
    pub pieced_messages: u64,
    /// Of those, messages that never completed at their receiver (a piece lost or late).
    pub pieced_lost: u64,
    /// SYNs the guard dropped (or that did not decode) and datagrams that did not open.
    pub dropped_in: u64,
    /// How records were judged.
    pub view: ViewMode,
    /// Share of one core per node at idle for gossip: chitchat, sealing, the SYN guard (CPU
    /// outside the views / nodes / virtual seconds).
    pub idle_gossip_cpu_per_node: f64,
    /// Share of one core per node at idle for the membership view: the agent's view as it is
    /// today (the mean in [`ViewMode::Agent`], node 0's with a witness), else node 0's cached.
    pub idle_view_cpu_per_node: f64,
    /// Largest sealed datagram at idle.
    pub idle_max_bytes: usize,
    /// Virtual seconds simulated.
    pub virtual_secs: f64,
    /// Wall seconds it took.
    pub wall_secs: f64,
}

/// CPU time of this thread: the simulation runs on one (a current-thread runtime), and on a
/// shared machine wall time would also count other processes.
fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes into the timespec we pass.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn all_alive(n: usize) -> impl Fn(&[Member]) -> bool {
    move |v: &[Member]| v.iter().filter(|m| m.state == MemberState::Alive).count() >= n
}

/// Memory a simulation of `nodes` hosts needs, roughly: chitchat's failure detector keeps a
/// window of 1,000 samples (8 KB) per peer in every node, plus ~5 KB per peer for its state and
/// the view (13 GB measured at 1,000 hosts).
pub fn memory_estimate(nodes: usize) -> u64 {
    (nodes as u64).pow(2) * 13_000
}

/// Runs the scenario: `nodes` hosts start cold and converge; idle traffic and CPU are measured;
/// one more host joins; a host (not a seed) is killed. Call inside a runtime with a paused
/// clock (see the module docs) for virtual time, on one thread (a current-thread runtime: the
/// CPU figures read this thread's CPU clock).
pub async fn run(cfg: SimConfig) -> anyhow::Result<SimReport> {
    anyhow::ensure!(cfg.nodes >= 2, "--nodes: at least 2");
    anyhow::ensure!(cfg.nodes < 1 << 17, "--nodes: at most 131,071");
    let wall = std::time::Instant::now();
    let mut c = Cluster::new(cfg.clone()).await?;
    let n = cfg.nodes;
    for _ in 0..n {
        c.start_node().await?;
    }
    let converge = c.until(all_alive(n)).await;
    tracing::info!(nodes = n, secs = ?converge, "converged (virtual time)");

    // Idle: every node up and listed; gossip carries heartbeats only.
    let mut all = c.take_stats();
    let view_cpu = || *c.view_cpu.lock().unwrap_or_else(|e| e.into_inner());
    let (cpu0, view0, t0) = (cpu_time(), view_cpu(), Instant::now());
    tokio::time::sleep(cfg.idle_window).await;
    let idle = c.take_stats();
    let secs = t0.elapsed().as_secs_f64();
    tracing::info!(nodes = n, "idle window measured");
    let (cpu1, view1) = (cpu_time(), view_cpu());
    let all_views = (view1.0 - view0.0).as_secs_f64();
    let idle_gossip = ((cpu1 - cpu0).as_secs_f64() - all_views).max(0.0) / n as f64 / secs;
    let idle_view = match cfg.view {
        ViewMode::Agent => all_views / n as f64 / secs,
        ViewMode::Cached { .. } => (view1.1 - view0.1).as_secs_f64() / secs,
    };

    // One more host.
    c.start_node().await?;
    let newcomer = c.nodes[n].name.clone();
    let join = c
        .until(|v| {
            v.iter()
                .any(|m| m.name == newcomer && m.state == MemberState::Alive)
        })
        .await;
    tracing::info!(nodes = n, secs = ?join, "joined (virtual time)");

    // A host dies without a word.
    let victim = cfg.seeds.max(1).min(n - 1);
    let victim_name = c.nodes[victim].name.clone();
    c.kill(victim).await;
    let dead = c
        .until(|v| {
            v.iter()
                .any(|m| m.name == victim_name && m.state == MemberState::Dead)
        })
        .await;
    tracing::info!(nodes = n, secs = ?dead, "listed dead (virtual time)");

    all.add(&idle);
    all.add(&c.take_stats());
    let virtual_secs = c.clock.start.elapsed().as_secs_f64();
    for i in 0..c.nodes.len() {
        c.kill(i).await;
    }
    use std::sync::atomic::Ordering::Relaxed;
    Ok(SimReport {
        nodes: n,
        converge_secs: converge.map(|d| d.as_secs_f64()),
        join_secs: join.map(|d| d.as_secs_f64()),
        dead_secs: dead.map(|d| d.as_secs_f64()),
        idle_bytes_per_node_s: idle.bytes as f64 / n as f64 / secs,
        idle_datagrams_per_node_s: idle.datagrams as f64 / n as f64 / secs,
        idle_p50_bytes: idle.quantile(0.5),
        idle_p99_bytes: idle.quantile(0.99),
        max_datagram_bytes: all.max(),
        datagrams_over_goal: all.over_goal,
        datagrams: all.datagrams,
        oversize: all.oversize,
        pieced_messages: all.pieced,
        pieced_lost: c.counters.pieces_lost.load(Relaxed),
        dropped_in: c.counters.open_failed.load(Relaxed) + c.counters.syn_dropped.load(Relaxed),
        view: cfg.view,
        idle_gossip_cpu_per_node: idle_gossip,
        idle_view_cpu_per_node: idle_view,
        idle_max_bytes: idle.max(),
        virtual_secs,
        wall_secs: wall.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_stats_quantiles_and_max() {
        let mut w = WireStats::default();
        for len in [100, 100, 200, 300, 1_500] {
            w.record(len);
        }
        assert_eq!(
            (w.quantile(0.5), w.quantile(0.99), w.max()),
            (200, 1_500, 1_500)
        );
        assert_eq!((w.datagrams, w.bytes, w.over_goal), (5, 2_200, 1));
        let mut sum = WireStats::default();
        sum.add(&w);
        sum.add(&w);
        assert_eq!(
            (sum.datagrams, sum.quantile(0.2), sum.max()),
            (10, 100, 1_500)
        );
    }

    /// The small simulation (CI): 50 nodes with meshsec's sealing, SYN guard and signed
    /// records over a lossy network, in virtual time. Every node lists all 50 alive within the
    /// issue's 10 s; one more is listed everywhere and a killed one is listed dead everywhere
    /// within bounds; every datagram opened; at idle no datagram exceeds 1,400 bytes. (The cold
    /// start's deltas do exceed it: docs/benchmarks.md reports by how much.)
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn fifty_nodes_converge_and_idle_datagrams_fit() {
        let r = run(SimConfig {
            nodes: 50,
            idle_window: Duration::from_secs(1),
            phase_limit: Duration::from_secs(15),
            view: ViewMode::Cached { witness: false },
            ..SimConfig::default()
        })
        .await
        .unwrap();
        let fail = format!("{r:#?}");
        assert!(r.converge_secs.is_some_and(|s| s <= 10.0), "{fail}");
        assert!(r.join_secs.is_some_and(|s| s <= 5.0), "{fail}");
        assert!(r.dead_secs.is_some_and(|s| s <= 10.0), "{fail}");
        assert_eq!((r.dropped_in, r.oversize), (0, 0), "{fail}");
        // Every datagram of the run, the cold start included, fits the goal.
        assert!(
            r.max_datagram_bytes > 0 && r.max_datagram_bytes <= DATAGRAM_GOAL,
            "{fail}"
        );
        assert_eq!(r.datagrams_over_goal, 0, "{fail}");
        // The cold start's deltas do not fit one datagram: they went in pieces.
        assert!(r.pieced_messages > 0, "{fail}");
        assert!(r.idle_bytes_per_node_s <= 20_000.0, "{fail}");
    }
}
