//! The control API: newline-delimited JSON over a Unix socket that only the
//! agent's owner can open, plus the client side used by the CLI.
//!
//! Requests are one JSON object per line: `{"cmd":"members"}`,
//! `{"cmd":"status"}`, `{"cmd":"watch"}`. Each reply is one JSON object per
//! line; `watch` keeps the connection open and sends one line per change.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, watch};

use crate::datapath::AddressFamily;
use crate::gossip::members::{Change, Member, MemberState};
use crate::gossip::records::RecordCounters;
use crate::gossip::transport::GossipCountersSnapshot;
use crate::handshake::Counters as HandshakeCounters;
use crate::mesh::{LinkState, LinkStatus, MeshCounters};

/// Longest request line accepted; the API has no large requests.
const MAX_REQUEST: usize = 4096;

/// A request from a client.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// The membership listing.
    Members,
    /// This node's description.
    Status,
    /// The listing, then a line per membership change.
    Watch,
    /// Leave the cluster: announce it, remove everything meshsec installed
    /// here, stop the agent.
    Leave,
    /// Re-key every link now (make-before-break), or only those to `peer`.
    Rekey {
        /// Peer name; all peers when absent.
        #[serde(default)]
        peer: Option<String>,
    },
    /// Re-read the cluster secret files (same paths as at start) and use
    /// them for gossip and handshakes from now on; re-read the config
    /// file's `protect` ranges (unless `--protect` set them).
    Reload,
    /// Release what is held for a peer that will not come back (its address
    /// bindings and blocked pairs): by node name, or by peer address.
    Forget {
        /// Node name or peer address.
        name: String,
    },
}

/// What a keyring reload did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reloaded {
    /// Secrets in the keyring now.
    pub secrets: usize,
    /// Gossip key ids, sealing key first (not secret).
    pub key_ids: Vec<String>,
    /// Strict mode's protected ranges from now on.
    #[serde(default)]
    pub protect: Vec<String>,
    /// Trusted CA keys now (0: no CA).
    #[serde(default)]
    pub cas: usize,
    /// Fingerprints on the blocklist now.
    #[serde(default)]
    pub blocklisted: usize,
    /// This node's certificate now (fingerprint), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
}

/// A keyring reload request: the agent answers on the channel.
pub type ReloadRequest = tokio::sync::oneshot::Sender<Result<Reloaded, ReloadError>>;

/// Why a keyring reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// A secret file cannot be read (names the file and line).
    #[error(transparent)]
    Secrets(#[from] crate::identity::IdentityError),
    /// A CA, certificate or blocklist file cannot be used (names the flag and file).
    #[error(transparent)]
    Trust(#[from] crate::cert::FileError),
    /// The handshake endpoints refused the keyring.
    #[error(transparent)]
    Handshake(#[from] crate::handshake::ConfigError),
    /// Gossip refused the keyring.
    #[error("gossip keyring: {0}")]
    Gossip(#[from] crate::gossip::seal::KeyringError),
    /// The config file's `protect` key is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The mesh task is gone.
    #[error("the mesh is shutting down")]
    MeshGone,
}

/// A reply line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    /// The full listing.
    Members(Vec<MemberRow>),
    /// This node.
    Status(Box<Status>),
    /// Changes since the previous line, with the listing after them.
    Changes {
        /// What changed.
        changes: Vec<Change>,
        /// The listing after the change.
        members: Vec<MemberRow>,
    },
    /// A re-key was started on this many links.
    Rekeying(usize),
    /// The agent is leaving.
    Leaving,
    /// The keyring was reloaded.
    Reloaded(Reloaded),
    /// This many bindings and blocked pairs were released.
    Forgot(usize),
    /// The request could not be served.
    Error(String),
}

/// `meshsec status`: a description of the local node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// Node name.
    pub name: String,
    /// meshsec version.
    pub version: String,
    /// Base64 static public key.
    pub public_key: String,
    /// Its fingerprint.
    pub fingerprint: String,
    /// Fingerprint of the Ed25519 key that signs this node's gossip record.
    pub signing_fingerprint: String,
    /// Current generation.
    pub generation: u64,
    /// Gossip bind address.
    pub gossip_listen: String,
    /// Gossip address advertised.
    pub gossip_advertise: String,
    /// Data-plane addresses published.
    pub data_addrs: Vec<String>,
    /// Handshake port.
    pub handshake_port: u16,
    /// Protocol version.
    pub protocol: u32,
    /// Seconds since the agent started.
    pub uptime_secs: u64,
    /// Members per state.
    pub members: MemberCounts,
    /// Gossip transport counters (datagrams sealed/opened and drops by reason).
    pub gossip: GossipCountersSnapshot,
    /// Signed-record counters (proto/records.md): bad signatures (total),
    /// incomplete records (now).
    pub records: RecordCounters,
    /// `kernel` or `memory`.
    pub datapath: String,
    /// Cluster-wide ESP transform.
    pub esp_algorithm: String,
    /// ESP GSO offload per family ("v4", "v6"): `loaded`, `autoloaded`,
    /// `modprobed` (all three: active) or `absent` (ESP without GSO). Empty
    /// for the in-memory datapath.
    #[serde(default)]
    pub esp_offload: BTreeMap<String, crate::datapath::offload::OffloadState>,
    /// Handshake counters (datagrams, rejections by reason, cookies).
    pub handshake: HandshakeCounters,
    /// Mesh counters (sessions, kernel changes).
    pub mesh: MeshCounters,
    /// Pairs kept blocked (policies without SAs: the kernel drops, never
    /// sends in clear), and why.
    #[serde(default)]
    pub blocked: Vec<BlockedRow>,
    /// Members' claims on addresses bound to another peer: ignored.
    #[serde(default)]
    pub conflicts: Vec<crate::mesh::Conflict>,
    /// Records refused because their name is pinned to another signing
    /// identity (impersonation), now, and how many so far.
    #[serde(default)]
    pub identity_conflicts: crate::gossip::pins::Conflicts,
    /// This node's certificate (proto/certs.md), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<CertStatus>,
    /// Trusted CA key ids (empty: no CA; certificates are not required).
    #[serde(default)]
    pub cas: Vec<String>,
    /// Fingerprints on the blocklist.
    #[serde(default)]
    pub blocklisted: usize,
    /// Records refused by the CA or the blocklist, now, and totals by reason.
    #[serde(default)]
    pub trust_refusals: crate::gossip::trust::TrustReport,
    /// The last clock offset measured per gossip source address, from the sealed timestamps
    /// of the datagrams received (what `meshsec doctor` checks against the seal's window).
    #[serde(default)]
    pub clock_offsets: Vec<crate::gossip::transport::ClockOffset>,
    /// Strict mode (`--protect`): the protected ranges and meshsec's range
    /// policies in the kernel.
    #[serde(default)]
    pub protect: ProtectStatus,
}

/// Strict mode in `meshsec status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectStatus {
    /// Protected ranges (CIDR).
    pub ranges: Vec<String>,
    /// Of meshsec's range policies in the kernel at the last reconcile:
    /// blocks and the host's own exemptions together.
    pub policies: usize,
}

/// This node's certificate in `meshsec status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertStatus {
    /// The certificate's facts.
    #[serde(flatten)]
    pub info: crate::cert::CertInfo,
    /// Seconds until it expires (negative: expired that long ago).
    pub expires_in_secs: i64,
    /// Whether it expires within 30 days (or has expired).
    pub expiring: bool,
}

impl CertStatus {
    /// The status of `c` at `now` (seconds since the epoch).
    pub fn new(c: &crate::cert::Certificate, now: u64) -> CertStatus {
        let expires_in_secs = i64::try_from(c.not_after)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(now).unwrap_or(i64::MAX));
        CertStatus {
            info: c.into(),
            expires_in_secs,
            expiring: expires_in_secs < crate::cert::EXPIRY_WARNING_SECS as i64,
        }
    }
}

/// A blocked pair in `meshsec status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockedRow {
    /// Our address.
    pub local: std::net::IpAddr,
    /// The peer address.
    pub remote: std::net::IpAddr,
    /// The peer's node name, when known.
    pub peer: Option<String>,
    /// The peer key's fingerprint, when known.
    pub fingerprint: Option<String>,
    /// Why it is blocked.
    pub reason: crate::mesh::BlockReason,
    /// Seconds since it was blocked.
    pub since_secs: u64,
}

impl BlockedRow {
    /// The row for `b`, timed against `now`.
    pub fn new(b: &crate::mesh::Blocked, now: std::time::Instant) -> BlockedRow {
        BlockedRow {
            local: b.local,
            remote: b.remote,
            peer: b.peer.as_ref().map(|(n, _)| n.clone()),
            fingerprint: b
                .peer
                .as_ref()
                .map(|(_, k)| crate::identity::fingerprint(k)),
            reason: b.reason,
            since_secs: now.saturating_duration_since(b.since).as_secs(),
        }
    }
}

/// One row of `meshsec members` and its `--json` form (stable): a member
/// as gossip knows it, in display form, with the mesh's links to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberRow {
    /// Node name (unique in the cluster).
    pub name: String,
    /// Address used for gossip.
    pub gossip_addr: std::net::SocketAddr,
    /// Published data-plane addresses.
    pub data_addrs: Vec<std::net::IpAddr>,
    /// Liveness.
    pub state: MemberState,
    /// Short fingerprint of the static public key, or `None` if it published none.
    pub fingerprint: Option<String>,
    /// Base64 static public key.
    pub public_key: Option<String>,
    /// Generation (start time of that agent, ms since the epoch).
    pub generation: u64,
    /// Handshake UDP port.
    pub handshake_port: Option<u16>,
    /// Protocol version it speaks.
    pub protocol: Option<u32>,
    /// Milliseconds since its heartbeat last advanced (0 for this node).
    pub last_heard_ms: u64,
    /// Whether this row is the local node.
    pub is_self: bool,
    /// The encrypted links to this node (one per address family); empty for
    /// this node itself.
    #[serde(default)]
    pub links: Vec<LinkRow>,
    /// Set when gossip carries a record under this name signed by another
    /// identity than the pinned one: "pinned FP, refused FP" (the impostor
    /// gets nothing; `meshsec forget NAME` accepts the new identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_conflict: Option<String>,
    /// Set when the CA or the blocklist refuses this member's record: the
    /// reason (proto/certs.md); the member gets no links.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// When the certificate of the record in use expires (seconds since the
    /// epoch), with a CA configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_not_after: Option<u64>,
}

impl MemberRow {
    /// The row for `m` with its links.
    pub fn new(m: &Member, links: &[LinkStatus]) -> MemberRow {
        MemberRow {
            name: m.name.clone(),
            gossip_addr: m.gossip_addr,
            data_addrs: m.data_addrs.clone(),
            state: m.state,
            fingerprint: m.public_key.as_ref().map(crate::identity::fingerprint),
            public_key: m.public_key.as_ref().map(crate::identity::encode_public),
            generation: m.generation,
            handshake_port: m.handshake_port,
            protocol: m.protocol,
            last_heard_ms: m.last_heard_ms,
            is_self: m.is_self,
            links: links.iter().map(LinkRow::from).collect(),
            identity_conflict: None,
            refused: None,
            cert_not_after: None,
        }
    }
}

/// One link in the listing (display form of [`LinkStatus`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkRow {
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// Our address.
    pub local: std::net::IpAddr,
    /// Peer address.
    pub remote: std::net::IpAddr,
    /// Link state.
    pub sa: LinkState,
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

impl From<&LinkStatus> for LinkRow {
    fn from(l: &LinkStatus) -> LinkRow {
        LinkRow {
            family: family_name(l.family).into(),
            local: l.local,
            remote: l.remote,
            sa: l.state,
            spi_in: l.spi_in.map(hex_spi),
            spi_out: l.spi_out.map(hex_spi),
            aead: l.aead.map(|a| a.to_string()),
            established_at: l.established_at,
            bytes_in: l.inbound.bytes,
            packets_in: l.inbound.packets,
            bytes_out: l.outbound.bytes,
            packets_out: l.outbound.packets,
            replay_drops: l.inbound.replay,
            integrity_failures: l.inbound.integrity_failed,
        }
    }
}

/// The listing's name of an address family.
pub fn family_name(f: AddressFamily) -> &'static str {
    match f {
        AddressFamily::V4 => "ipv4",
        AddressFamily::V6 => "ipv6",
    }
}

fn hex_spi(spi: u32) -> String {
    format!("0x{spi:08x}")
}

/// Members per state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MemberCounts {
    /// Alive.
    pub alive: usize,
    /// Suspect.
    pub suspect: usize,
    /// Dead.
    pub dead: usize,
    /// Left.
    pub left: usize,
    /// Nodes gossip knows whose name breaks the node-name rule: not listed,
    /// not linked (a real agent never publishes such a name).
    #[serde(default)]
    pub refused: usize,
}

/// What the server reads to answer requests.
#[derive(Clone)]
pub struct ControlState {
    /// The latest listing.
    pub members: watch::Receiver<Arc<Vec<Member>>>,
    /// Membership changes as they happen.
    pub changes: broadcast::Sender<Arc<(Vec<Change>, Vec<Member>)>>,
    /// Produces a fresh status.
    pub status: Arc<dyn Fn() -> Status + Send + Sync>,
    /// Commands to the mesh.
    pub mesh: tokio::sync::mpsc::Sender<crate::mesh::driver::MeshCommand>,
    /// Asks the agent to leave the cluster.
    pub leave: tokio::sync::mpsc::Sender<()>,
    /// Asks the agent to reload its keyring.
    pub reload: tokio::sync::mpsc::Sender<ReloadRequest>,
    /// Links per peer name, merged into the listing.
    /// Name → pinned signing identity (`forget` drops a pin).
    pub pins: Arc<std::sync::Mutex<crate::gossip::pins::Pins>>,
    /// Records refused for an identity other than their name's pin.
    pub identity_conflicts: watch::Receiver<crate::gossip::pins::Conflicts>,
    /// Records refused by the CA or the blocklist, and accepted certificates.
    pub trust: watch::Receiver<crate::gossip::trust::TrustReport>,
    /// Links per peer name, from the mesh.
    pub links:
        watch::Receiver<Arc<std::collections::BTreeMap<String, Vec<crate::mesh::LinkStatus>>>>,
}

/// Errors preparing the control socket.
#[derive(Debug, thiserror::Error)]
#[error("--control-socket: {path}: {reason}")]
pub struct ControlSocketError {
    /// The socket path.
    pub path: PathBuf,
    /// Why it cannot be used.
    pub reason: String,
}

/// Binds the control socket with owner-only permissions. A stale socket file
/// (no agent answering) is replaced; a live one is an error.
pub async fn bind(path: &Path) -> Result<UnixListener, ControlSocketError> {
    let err = |reason: String| ControlSocketError {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| err(format!("cannot create directory: {e}")))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| err(e.to_string()))?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        // Only ever remove a stale *socket*: a typo must not delete a file.
        if !meta.file_type().is_socket() {
            return Err(err(
                "exists and is not a socket; refusing to replace it".into()
            ));
        }
        if UnixStream::connect(path).await.is_ok() {
            return Err(err("another agent is already serving this socket".into()));
        }
        std::fs::remove_file(path).map_err(|e| err(format!("cannot remove stale socket: {e}")))?;
    }
    // Tighten the umask around bind so the socket is never briefly world-connectable.
    // SAFETY: umask is process-wide but only changes file-creation defaults.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let listener = listener.map_err(|e| err(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(e.to_string()))?;
    Ok(listener)
}

/// Serves clients until `shutdown` fires. Each connection gets its own task;
/// all of them stop on shutdown.
pub async fn serve(
    listener: UnixListener,
    state: ControlState,
    mut shutdown: crate::shutdown::StopReceiver,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = crate::shutdown::fired(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let state = state.clone();
                    let shutdown = shutdown.clone();
                    tasks.spawn(async move {
                        if let Err(e) = handle(stream, state, shutdown).await {
                            tracing::debug!(error = %e, "control connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
}

async fn write_line(w: &mut (impl AsyncWriteExt + Unpin), reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

fn snapshot(state: &ControlState) -> Vec<MemberRow> {
    let members = state.members.borrow().clone();
    let links = state.links.borrow().clone();
    with_conflicts(rows(&members, &links), state)
}

/// Marks the rows whose name is claimed by another identity than its pin.
fn with_conflicts(mut rows: Vec<MemberRow>, state: &ControlState) -> Vec<MemberRow> {
    let conflicts = state.identity_conflicts.borrow();
    for r in rows.iter_mut() {
        if let Some(c) = conflicts.current.iter().find(|c| c.name == r.name) {
            r.identity_conflict = Some(format!("pinned {}, refused {}", c.pinned, c.offered));
        }
    }
    let trust = state.trust.borrow();
    for r in rows.iter_mut() {
        // The newest refused generation explains the row (an older one may still carry links).
        if let Some(t) = trust
            .current
            .iter()
            .filter(|t| t.name == r.name && t.generation >= r.generation)
            .max_by_key(|t| t.generation)
        {
            r.refused = Some(t.reason.as_str().to_string());
        }
        r.cert_not_after = trust.certs.get(&r.name).map(|c| c.not_after);
    }
    rows
}

/// The listing: each member with the mesh's links to it.
pub fn rows(members: &[Member], links: &BTreeMap<String, Vec<LinkStatus>>) -> Vec<MemberRow> {
    members
        .iter()
        .map(|m| MemberRow::new(m, links.get(&m.name).map_or(&[][..], |l| l)))
        .collect()
}

async fn handle(
    stream: UnixStream,
    state: ControlState,
    mut shutdown: crate::shutdown::StopReceiver,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r).take(MAX_REQUEST as u64);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let req: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => return write_line(&mut w, &Reply::Error(format!("bad request: {e}"))).await,
    };
    match req {
        Request::Members => write_line(&mut w, &Reply::Members(snapshot(&state))).await,
        Request::Status => write_line(&mut w, &Reply::Status(Box::new((state.status)()))).await,
        Request::Leave => {
            let _ = state.leave.try_send(());
            write_line(&mut w, &Reply::Leaving).await
        }
        Request::Forget { name } => {
            let unpinned = usize::from(
                state
                    .pins
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .forget(&name),
            );
            let (tx, rx) = tokio::sync::oneshot::channel();
            let cmd = crate::mesh::driver::MeshCommand::Forget { name, reply: tx };
            let reply = match state.mesh.send(cmd).await {
                Ok(()) => match rx.await {
                    Ok(n) => Reply::Forgot(n + unpinned),
                    Err(_) => Reply::Error("the mesh is shutting down".into()),
                },
                Err(_) => Reply::Error("the mesh is shutting down".into()),
            };
            write_line(&mut w, &reply).await
        }
        Request::Rekey { peer } => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let cmd = crate::mesh::driver::MeshCommand::Rekey { peer, reply: tx };
            let reply = match state.mesh.send(cmd).await {
                Ok(()) => match rx.await {
                    Ok(n) => Reply::Rekeying(n),
                    Err(_) => Reply::Error("the mesh is shutting down".into()),
                },
                Err(_) => Reply::Error("the mesh is shutting down".into()),
            };
            write_line(&mut w, &reply).await
        }
        Request::Reload => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let reply = match state.reload.send(tx).await {
                Ok(()) => match rx.await {
                    Ok(Ok(r)) => Reply::Reloaded(r),
                    Ok(Err(e)) => Reply::Error(e.to_string()),
                    Err(_) => Reply::Error("the agent is shutting down".into()),
                },
                Err(_) => Reply::Error("the agent is shutting down".into()),
            };
            write_line(&mut w, &reply).await
        }
        Request::Watch => {
            let mut rx = state.changes.subscribe();
            write_line(&mut w, &Reply::Members(snapshot(&state))).await?;
            loop {
                tokio::select! {
                    _ = crate::shutdown::fired(&mut shutdown) => return Ok(()),
                    ev = rx.recv() => match ev {
                        Ok(ev) => {
                            let members = with_conflicts(rows(&ev.1, &state.links.borrow().clone()), &state);
                            write_line(&mut w, &Reply::Changes { changes: ev.0.clone(), members }).await?
                        }
                        // A slow reader skipped some changes: resend the full listing.
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            write_line(&mut w, &Reply::Members(snapshot(&state))).await?
                        }
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    }
                }
            }
        }
    }
}

/// Client errors, worded for the CLI.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No agent at that path.
    #[error("--control-socket: cannot connect to {path}: {reason} (is the agent running?)")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        reason: String,
    },
    /// The connection broke or the agent sent something unreadable.
    #[error("control socket: {0}")]
    Protocol(String),
    /// The agent answered with an error.
    #[error("agent: {0}")]
    Agent(String),
}

/// A connected client.
pub struct Client {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
}

impl Client {
    /// Connects and sends one request.
    pub async fn request(path: &Path, req: &Request) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| ClientError::Connect {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let (r, mut w) = stream.into_split();
        let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        w.write_all(&line)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(Client {
            lines: BufReader::new(r).lines(),
        })
    }

    /// The next reply line; `None` when the agent closed the connection.
    pub async fn next(&mut self) -> Result<Option<Reply>, ClientError> {
        match self
            .lines
            .next_line()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            None => Ok(None),
            Some(l) => match serde_json::from_str::<Reply>(&l) {
                Ok(Reply::Error(e)) => Err(ClientError::Agent(e)),
                Ok(r) => Ok(Some(r)),
                Err(e) => Err(ClientError::Protocol(format!("unreadable reply: {e}"))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        Status {
            name: "n1".into(),
            version: "0".into(),
            public_key: "k".into(),
            fingerprint: "f".into(),
            signing_fingerprint: "s".into(),
            generation: 1,
            gossip_listen: "l".into(),
            gossip_advertise: "a".into(),
            data_addrs: vec![],
            handshake_port: 1,
            protocol: 1,
            uptime_secs: 0,
            members: MemberCounts::default(),
            gossip: Default::default(),
            records: Default::default(),
            datapath: "memory".into(),
            esp_algorithm: "aes128-gcm".into(),
            esp_offload: [(
                "v4".to_string(),
                crate::datapath::offload::OffloadState::Autoloaded,
            )]
            .into_iter()
            .collect(),
            handshake: Default::default(),
            mesh: Default::default(),
            blocked: vec![],
            conflicts: vec![],
            identity_conflicts: Default::default(),
            clock_offsets: vec![],
            protect: Default::default(),
            cert: None,
            cas: vec![],
            blocklisted: 0,
            trust_refusals: Default::default(),
        }
    }

    #[tokio::test]
    async fn socket_is_owner_only_and_serves_requests() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/control.sock");
        let listener = bind(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (_mtx, mrx) = watch::channel(Arc::new(vec![]));
        let (ctx, _) = broadcast::channel(16);
        let (_ltx, lrx) = watch::channel(Arc::new(std::collections::BTreeMap::new()));
        let (mesh_tx, _mesh_rx) = tokio::sync::mpsc::channel(4);
        let (leave_tx, _leave_rx) = tokio::sync::mpsc::channel(1);
        let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<ReloadRequest>(1);
        let state = ControlState {
            members: mrx,
            changes: ctx.clone(),
            status: Arc::new(status),
            links: lrx,
            mesh: mesh_tx,
            leave: leave_tx,
            reload: reload_tx,
            pins: Arc::new(std::sync::Mutex::new(crate::gossip::pins::Pins::in_memory())),
            identity_conflicts: watch::channel(Default::default()).1,
            trust: watch::channel(Default::default()).1,
        };
        // The agent's side of reloads: refuse the first, accept the second.
        tokio::spawn(async move {
            if let Some(tx) = reload_rx.recv().await {
                let _ = tx.send(Err(ReloadError::Secrets(
                    crate::identity::IdentityError::Secret {
                        path: "/x".into(),
                        reason: "line 2: not base64".into(),
                    },
                )));
            }
            if let Some(tx) = reload_rx.recv().await {
                let _ = tx.send(Ok(Reloaded {
                    secrets: 2,
                    key_ids: vec!["aa".into(), "bb".into()],
                    protect: vec!["10.0.0.0/24".into()],
                    cas: 0,
                    blocklisted: 0,
                    cert: None,
                }));
            }
        });
        let (stx, srx) = crate::shutdown::channel();
        let server = tokio::spawn(serve(listener, state, srx));

        // A second agent on the same socket is refused while the first serves.
        let e = bind(&path).await.unwrap_err();
        assert!(e.reason.contains("already serving"), "{e}");

        let mut c = Client::request(&path, &Request::Status).await.unwrap();
        match c.next().await.unwrap() {
            Some(Reply::Status(s)) => assert_eq!(*s, status()),
            other => panic!("unexpected {other:?}"),
        }

        let mut w = Client::request(&path, &Request::Watch).await.unwrap();
        assert!(matches!(w.next().await.unwrap(), Some(Reply::Members(m)) if m.is_empty()));
        // Wait until the watcher subscribed, then publish one change.
        for _ in 0..100 {
            if ctx.receiver_count() > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        ctx.send(Arc::new((vec![], vec![]))).unwrap();
        assert!(matches!(
            w.next().await.unwrap(),
            Some(Reply::Changes { .. })
        ));

        let mut r = Client::request(&path, &Request::Reload).await.unwrap();
        // An agent's refusal reaches the client as an error (the CLI exits 1).
        let e = r.next().await.unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        let mut r = Client::request(&path, &Request::Reload).await.unwrap();
        assert!(matches!(
            r.next().await.unwrap(),
            Some(Reply::Reloaded(Reloaded { secrets: 2, .. }))
        ));

        // Garbage gets an error reply, not a crash.
        let mut raw = UnixStream::connect(&path).await.unwrap();
        raw.write_all(b"{\"cmd\":\"nope\"}\n").await.unwrap();
        let mut buf = String::new();
        BufReader::new(raw).read_line(&mut buf).await.unwrap();
        assert!(buf.contains("bad request"), "{buf}");

        stx.send_replace(Some(crate::shutdown::Stop::Stop));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_regular_file_at_the_socket_path_is_never_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        std::fs::write(&path, "precious").unwrap();
        let e = bind(&path).await.unwrap_err();
        assert!(e.reason.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[tokio::test]
    async fn stale_socket_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        bind(&path).await.unwrap();
    }
}
