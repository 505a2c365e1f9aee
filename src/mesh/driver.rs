//! The I/O around [`Mesh`]: one UDP handshake socket per address family
//! (bound to our data address, exempt from XFRM policies), membership
//! updates, timers and periodic resync with the kernel.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{GuardFile, LinkStatus, Mesh, MeshCounters};
use crate::datapath::{bypass_socket, AddressFamily, Datapath, KernelEvent, XfrmMonitor};
use crate::gossip::members::Member;
use crate::handshake::Counters as HandshakeCounters;
use crate::shutdown::{self, Stop, StopReceiver};

/// What the mesh task publishes for the control API.
#[derive(Debug, Clone, Default)]
pub struct MeshReport {
    /// Links per peer name.
    pub links: BTreeMap<String, Vec<LinkStatus>>,
    /// Mesh counters.
    pub counters: MeshCounters,
    /// Handshake counters (all families).
    pub handshake: HandshakeCounters,
    /// Pairs kept blocked (policies without SAs), and why.
    pub blocked: Vec<super::Blocked>,
    /// Claims on addresses bound to another peer (ignored).
    pub conflicts: Vec<super::Conflict>,
    /// Strict mode's protected ranges.
    pub protect: Vec<crate::datapath::Prefix>,
    /// Strict mode's policies (blocks and exemptions) in the kernel at the
    /// last reconcile.
    pub range_policies: usize,
}

/// Start of a confirmation probe (see [`Mesh::poll_probe`]), followed by
/// the SPI of the SA it travels on (big-endian), so that a datapath that
/// carries no packets can count it where the kernel would
/// ([`Datapath::probe_arrived`]).
pub const PROBE_PAYLOAD: &[u8] = b"meshsec-confirm";

/// Length of a probe datagram's payload.
pub const PROBE_LEN: usize = PROBE_PAYLOAD.len() + 4;

/// The probe for the SA with this SPI.
pub fn probe_datagram(spi: u32) -> [u8; PROBE_LEN] {
    let mut out = [0u8; PROBE_LEN];
    out[..PROBE_PAYLOAD.len()].copy_from_slice(PROBE_PAYLOAD);
    out[PROBE_PAYLOAD.len()..].copy_from_slice(&spi.to_be_bytes());
    out
}

/// Whether `bytes` is a probe (never a handshake datagram), and the SPI it
/// names when it has one (a probe from an older agent names none).
pub fn parse_probe(bytes: &[u8]) -> Option<Option<u32>> {
    let rest = bytes.strip_prefix(PROBE_PAYLOAD)?;
    Some(rest.try_into().ok().map(u32::from_be_bytes))
}

/// Cluster secrets in transit to the mesh: wiped on drop, never printed.
pub struct Secrets(pub zeroize::Zeroizing<Vec<[u8; 32]>>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets(<{} redacted>)", self.0.len())
    }
}

/// Commands from the control API.
#[derive(Debug)]
pub enum MeshCommand {
    /// Re-key every link, or those to one peer; answers how many.
    Rekey {
        /// Peer name, or all.
        peer: Option<String>,
        /// Where the count goes.
        reply: tokio::sync::oneshot::Sender<usize>,
    },
    /// Release the bindings and blocked pairs of a peer (name or address);
    /// answers how many entries were released.
    Forget {
        /// Node name or peer address.
        name: String,
        /// Where the count goes.
        reply: tokio::sync::oneshot::Sender<usize>,
    },
    /// Replace the handshake keyring (cluster secrets, the first initiates).
    SetKeyring {
        /// The secrets.
        secrets: Secrets,
        /// The outcome.
        reply: tokio::sync::oneshot::Sender<Result<(), crate::handshake::ConfigError>>,
    },
    /// Replace strict mode's protected ranges (reload).
    SetProtect {
        /// The ranges.
        ranges: Vec<crate::datapath::Prefix>,
        /// Answered once the mesh has them (the next reconcile applies them).
        reply: tokio::sync::oneshot::Sender<()>,
    },
    /// Answer at once: proves the driver's loop is turning (the service
    /// watchdog, see `crate::notify`).
    Ping {
        /// Where the answer goes.
        reply: tokio::sync::oneshot::Sender<()>,
    },
}

/// The handshake sockets, one per family we have a data address in, plus
/// one unbound-port socket per family *without* XFRM bypass, whose datagrams
/// go through ESP (confirmation probes).
pub struct HandshakeSockets {
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
    probe_v4: Option<UdpSocket>,
    probe_v6: Option<UdpSocket>,
}

/// Why the handshake sockets could not be set up (each names the flag or
/// the socket to look at).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeSocketError {
    /// The data address is not one of this host's.
    #[error("--data-address: {ip} is not an address of this host: {error}")]
    NotLocal {
        /// The address.
        ip: IpAddr,
        /// What bind said.
        error: std::io::Error,
    },
    /// The port cannot be bound.
    #[error("--handshake-port: cannot bind the handshake socket to {addr}: {error}")]
    Bind {
        /// Address and port.
        addr: SocketAddr,
        /// What bind said.
        error: std::io::Error,
    },
    /// The per-socket XFRM bypass was refused.
    #[error("cannot exempt the handshake socket {addr} from XFRM policies: {reason}")]
    Bypass {
        /// Address and port.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// Making the socket non-blocking or registering it failed.
    #[error("handshake socket {addr}: {error}")]
    Setup {
        /// Address and port.
        addr: SocketAddr,
        /// What failed.
        error: std::io::Error,
    },
    /// The confirmation-probe socket failed.
    #[error("probe socket on {ip}: {error}")]
    Probe {
        /// Our data address.
        ip: IpAddr,
        /// What failed.
        error: std::io::Error,
    },
}

/// Binds the handshake sockets on our first data address of each family.
/// With `bypass`, each socket gets per-socket XFRM bypass policies so the
/// control plane works even when SAs are broken.
pub fn bind_handshake_sockets(
    addrs: &[IpAddr],
    port: u16,
    bypass: bool,
) -> Result<HandshakeSockets, HandshakeSocketError> {
    let mut out = HandshakeSockets {
        v4: None,
        v6: None,
        probe_v4: None,
        probe_v6: None,
    };
    for family in [AddressFamily::V4, AddressFamily::V6] {
        let Some(ip) = addrs.iter().find(|a| AddressFamily::of(**a) == family) else {
            continue;
        };
        let addr = SocketAddr::new(*ip, port);
        let std_sock = std::net::UdpSocket::bind(addr).map_err(|error| {
            if error.kind() == std::io::ErrorKind::AddrNotAvailable {
                HandshakeSocketError::NotLocal { ip: *ip, error }
            } else {
                HandshakeSocketError::Bind { addr, error }
            }
        })?;
        if bypass {
            bypass_socket(std_sock.as_fd(), family).map_err(|e| HandshakeSocketError::Bypass {
                addr,
                reason: e.to_string(),
            })?;
        }
        let setup = |error| HandshakeSocketError::Setup { addr, error };
        std_sock.set_nonblocking(true).map_err(setup)?;
        let sock = UdpSocket::from_std(std_sock).map_err(setup)?;
        let probe = std::net::UdpSocket::bind(SocketAddr::new(*ip, 0))
            .and_then(|p| p.set_nonblocking(true).map(|_| p))
            .and_then(UdpSocket::from_std)
            .map_err(|error| HandshakeSocketError::Probe { ip: *ip, error })?;
        match family {
            AddressFamily::V4 => (out.v4, out.probe_v4) = (Some(sock), Some(probe)),
            AddressFamily::V6 => (out.v6, out.probe_v6) = (Some(sock), Some(probe)),
        }
    }
    Ok(out)
}

/// Waits for kernel events; never resolves without a monitor. A monitor that
/// fails is dropped and `false` returned: the mesh must then read the kernel
/// often ([`Mesh::monitor_lost`]); the counter check still catches soft limits.
async fn kernel_events(
    monitor: &mut Option<AsyncFd<XfrmMonitor>>,
    out: &mut Vec<KernelEvent>,
) -> bool {
    let Some(fd) = monitor.as_mut() else {
        return std::future::pending().await;
    };
    let result = match fd.readable_mut().await {
        Ok(mut guard) => {
            let r = guard.get_inner_mut().read_events(out);
            guard.clear_ready();
            r
        }
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        warn!(error = %e, "kernel XFRM event socket failed; reading the kernel's tables every 2 s instead");
        *monitor = None;
        return false;
    }
    true
}

async fn recv_on(sock: &Option<UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// A datagram on a handshake socket bound to `local`: a probe did its work
/// in the kernel (counted on the inbound SA; the datapath is told, for a
/// datapath without packets), anything else goes to the mesh.
fn received(
    mesh: &mut Mesh,
    dp: &mut dyn Datapath,
    sockets: &HandshakeSockets,
    family: AddressFamily,
    from: SocketAddr,
    bytes: &[u8],
) {
    match parse_probe(bytes) {
        Some(Some(spi)) => {
            if let Some(dst) = sockets.local(family) {
                dp.probe_arrived(crate::datapath::SaId { dst, spi });
            }
        }
        Some(None) => {}
        None => mesh.handle_datagram(Instant::now(), family, from, bytes, dp),
    }
}

impl HandshakeSockets {
    /// The data address the handshake socket of `family` is bound to.
    fn local(&self, family: AddressFamily) -> Option<IpAddr> {
        let sock = match family {
            AddressFamily::V4 => self.v4.as_ref(),
            AddressFamily::V6 => self.v6.as_ref(),
        };
        sock.and_then(|s| s.local_addr().ok()).map(|a| a.ip())
    }
}

/// The channels the mesh task talks through.
pub struct MeshChannels {
    /// Membership views from gossip.
    pub members: watch::Receiver<Arc<Vec<Member>>>,
    /// Where the mesh publishes its report.
    pub report: watch::Sender<Arc<MeshReport>>,
    /// Commands from the control API.
    pub commands: tokio::sync::mpsc::Receiver<MeshCommand>,
    /// Where the guard (bindings and blocked pairs) is saved after each
    /// change (`state_dir/guard.json`); none keeps it in memory only.
    pub guard_file: Option<std::path::PathBuf>,
}

/// Loads the guard saved by a previous run (`None` when there is none).
/// The error names the file and what is wrong with it.
pub fn load_guard(path: &Path) -> Result<Option<GuardFile>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("--state-dir: {}: unreadable: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("--state-dir: {}: {e}", path.display())),
    }
}

/// Saves the guard (owner-only, replaced atomically).
pub fn save_guard(path: &Path, file: &GuardFile) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(file).map_err(std::io::Error::other)? + "\n";
    crate::identity::write_owner_only(path, &path.with_extension("json.tmp"), text.as_bytes())
}

/// Saves the guard when it changed since the last save; a failed save is
/// logged once per failure streak and retried at the next change.
struct GuardSaver {
    path: Option<std::path::PathBuf>,
    saved: Option<u64>,
    failing: bool,
}

impl GuardSaver {
    fn save_if_changed(&mut self, mesh: &Mesh) {
        let Some(path) = &self.path else { return };
        let rev = mesh.guard_revision();
        if self.saved == Some(rev) {
            return;
        }
        match save_guard(path, &mesh.guard_file()) {
            Ok(()) => {
                self.saved = Some(rev);
                self.failing = false;
            }
            Err(e) => {
                if !self.failing {
                    warn!(path = %path.display(), error = %e, "cannot save the bindings and blocked pairs; a restart would start without them");
                }
                self.failing = true;
            }
        }
    }
}

/// Runs the mesh until `stop` fires. On [`Stop::Leave`] everything meshsec
/// installed is removed before returning (the node announced leaving, so its
/// peers are removing their side too); on [`Stop::Stop`] it all stays.
pub async fn run(
    mut mesh: Mesh,
    mut dp: Box<dyn Datapath>,
    sockets: HandshakeSockets,
    channels: MeshChannels,
    mut stop: StopReceiver,
    monitor: Option<XfrmMonitor>,
) {
    let MeshChannels {
        mut members,
        report,
        mut commands,
        guard_file,
    } = channels;
    let mut saver = GuardSaver {
        path: guard_file,
        // Saved once at start even when nothing changed: the file then
        // carries this boot's id (a file from an older version has none,
        // and a later reboot would not be recognised) and the pairs
        // restore_guard added after a reboot.
        saved: None,
        failing: false,
    };
    let had_monitor = monitor.is_some();
    let mut monitor = monitor.and_then(|m| {
        // SAFETY: the monitor owns its netlink socket, which stays open (and
        // the same descriptor) until the monitor, hence the AsyncFd, is dropped.
        unsafe { AsyncFd::register_with_interest(m, tokio::io::Interest::READABLE) }
            .map_err(|e| warn!(error = %e, "cannot watch kernel XFRM events; reading the kernel's tables every 2 s instead"))
            .ok()
    });
    if had_monitor && monitor.is_none() {
        mesh.monitor_lost(Instant::now());
    }
    let mut events = Vec::new();
    let mut buf4 = vec![0u8; 2048];
    let mut buf6 = vec![0u8; 2048];
    let mut published = MeshCounters::default();
    let how = loop {
        while let Some((family, to, bytes)) = mesh.poll_transmit() {
            let sock = match family {
                AddressFamily::V4 => sockets.v4.as_ref(),
                AddressFamily::V6 => sockets.v6.as_ref(),
            };
            if let Some(s) = sock {
                if let Err(e) = s.send_to(&bytes, to).await {
                    tracing::debug!(%to, error = %e, "handshake send failed");
                }
            }
        }
        while let Some((family, to, sa)) = mesh.poll_probe() {
            let sock = match family {
                AddressFamily::V4 => sockets.probe_v4.as_ref(),
                AddressFamily::V6 => sockets.probe_v6.as_ref(),
            };
            if let Some(s) = sock {
                // A few copies: one lost probe would cost the peer a confirm timeout.
                for _ in 0..3 {
                    let _ = s.send_to(&probe_datagram(sa.spi), to).await;
                }
            }
        }
        let now = Instant::now();
        let wake = mesh
            .poll_timeout()
            .unwrap_or(now + crate::mesh::RESYNC_INTERVAL)
            .max(now);
        tokio::select! {
            how = shutdown::fired(&mut stop) => break how,
            r = recv_on(&sockets.v4, &mut buf4) => {
                if let Ok((n, from)) = r {
                    received(&mut mesh, dp.as_mut(), &sockets, AddressFamily::V4, from, &buf4[..n]);
                }
            }
            r = recv_on(&sockets.v6, &mut buf6) => {
                if let Ok((n, from)) = r {
                    received(&mut mesh, dp.as_mut(), &sockets, AddressFamily::V6, from, &buf6[..n]);
                }
            }
            heard = kernel_events(&mut monitor, &mut events) => {
                for ev in events.drain(..) {
                    mesh.handle_kernel_event(Instant::now(), ev);
                }
                if !heard {
                    mesh.monitor_lost(Instant::now());
                }
            }
            Some(cmd) = commands.recv() => match cmd {
                MeshCommand::Forget { name, reply } => {
                    let _ = reply.send(mesh.forget(&name));
                }
                MeshCommand::Rekey { peer, reply } => {
                    let n = mesh.force_rekey(Instant::now(), peer.as_deref());
                    let _ = reply.send(n);
                }
                MeshCommand::SetKeyring { secrets, reply } => {
                    let _ = reply.send(mesh.set_keyring(Instant::now(), &secrets.0, dp.as_mut()));
                }
                MeshCommand::SetProtect { ranges, reply } => {
                    mesh.set_protect(ranges);
                    let _ = reply.send(());
                }
                MeshCommand::Ping { reply } => {
                    let _ = reply.send(());
                }
            },
            changed = members.changed() => {
                if changed.is_err() { break Stop::Stop; }
                let view = members.borrow_and_update().clone();
                mesh.set_members(Instant::now(), &view, dp.as_mut());
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        let resync = mesh.handle_timeout(Instant::now(), dp.as_mut());
        saver.save_if_changed(&mesh);
        if resync || *mesh.counters() != published {
            published = mesh.counters().clone();
            report.send_replace(Arc::new(MeshReport {
                links: mesh.link_status(),
                counters: mesh.counters().clone(),
                handshake: mesh.handshake_counters(),
                blocked: mesh.blocked(),
                conflicts: mesh.conflicts().to_vec(),
                protect: mesh.protect().to_vec(),
                range_policies: mesh.range_policies_installed(),
            }));
        }
    };
    // The loop can also end because the membership channel closed (its task
    // heard the same shutdown first): the shutdown value decides, never
    // which of the two the select saw first.
    let how = (*stop.borrow()).unwrap_or(how);
    if how == Stop::Leave {
        match mesh.remove_all(dp.as_mut()) {
            Ok((sas, policies)) => info!(
                sas,
                policies, "left the mesh: removed meshsec's SAs and policies"
            ),
            Err(e) => warn!(error = %e, "could not remove meshsec's SAs and policies"),
        }
        // Nothing is held any more, for anyone.
        saver.save_if_changed(&mesh);
    }
}

#[cfg(test)]
mod guard_file_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_guard_file_round_trips_owner_only_and_a_broken_one_is_named() {
        let dir = std::env::temp_dir().join(format!("meshsec-guard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(crate::mesh::GUARD_FILE);
        assert_eq!(
            load_guard(&path).unwrap(),
            None,
            "absent: nothing saved yet"
        );
        let file = GuardFile {
            version: 1,
            ..GuardFile::default()
        };
        save_guard(&path, &file).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "owner-only: {mode:o}");
        assert_eq!(load_guard(&path).unwrap(), Some(file));
        std::fs::write(&path, "{\"version\": 1, \"bindings\": [").unwrap();
        let e = load_guard(&path).unwrap_err();
        assert!(
            e.starts_with("--state-dir: ") && e.contains("guard.json: unreadable"),
            "{e}"
        );
        assert!(!e.contains('\n'));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod probe_tests {
    use super::*;
    use crate::datapath::{MemoryDatapath, SaId};

    #[test]
    fn a_probe_names_its_sa_and_the_memory_datapath_counts_it() {
        let p = probe_datagram(0x0102_0304);
        assert_eq!(parse_probe(&p), Some(Some(0x0102_0304)));
        assert_eq!(
            parse_probe(PROBE_PAYLOAD),
            Some(None),
            "an older agent's probe"
        );
        assert_eq!(parse_probe(&p[..PROBE_LEN - 1]), Some(None));
        assert_eq!(parse_probe(b"meshsec-confirX\0\0\0\x01"), None);
        assert_eq!(parse_probe(&[]), None);
        // Nothing installed: nothing to count, nothing created.
        let mut dp = MemoryDatapath::new();
        let sa = SaId {
            dst: "192.0.2.1".parse().unwrap(),
            spi: 0x0102_0304,
        };
        dp.probe_arrived(sa);
        assert!(dp.dump_sas().unwrap().is_empty());
    }
}
