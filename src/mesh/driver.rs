//! The I/O around [`Mesh`]: one UDP handshake socket per address family
//! (bound to our data address, exempt from XFRM policies), membership
//! updates, timers and periodic resync with the kernel.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{LinkStatus, Mesh, MeshCounters};
use crate::datapath::{bypass_socket, AddressFamily, Datapath};
use crate::gossip::members::Member;

/// How often the kernel state is re-read even when nothing happened
/// (drift repair, counters for the listing).
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(2);

/// What the mesh task publishes for the control API.
#[derive(Debug, Clone, Default)]
pub struct MeshReport {
    /// Links per peer name.
    pub links: BTreeMap<String, Vec<LinkStatus>>,
    /// Mesh counters.
    pub counters: MeshCounters,
    /// Handshake counters (all families).
    pub handshake: BTreeMap<String, u64>,
}

/// The handshake sockets, one per family we have a data address in.
pub struct HandshakeSockets {
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
}

/// Binds the handshake sockets on our first data address of each family.
/// With `bypass`, each socket gets per-socket XFRM bypass policies so the
/// control plane works even when SAs are broken.
pub fn bind_handshake_sockets(addrs: &[IpAddr], port: u16, bypass: bool) -> Result<HandshakeSockets, String> {
    let mut out = HandshakeSockets { v4: None, v6: None };
    for family in [AddressFamily::V4, AddressFamily::V6] {
        let Some(ip) = addrs.iter().find(|a| AddressFamily::of(**a) == family) else { continue };
        let addr = SocketAddr::new(*ip, port);
        let std_sock = std::net::UdpSocket::bind(addr)
            .map_err(|e| format!("--handshake-port: cannot bind the handshake socket to {addr}: {e}"))?;
        if bypass {
            bypass_socket(std_sock.as_fd(), family)
                .map_err(|e| format!("cannot exempt the handshake socket {addr} from XFRM policies: {e}"))?;
        }
        std_sock.set_nonblocking(true).map_err(|e| format!("handshake socket {addr}: {e}"))?;
        let sock = UdpSocket::from_std(std_sock).map_err(|e| format!("handshake socket {addr}: {e}"))?;
        match family {
            AddressFamily::V4 => out.v4 = Some(sock),
            AddressFamily::V6 => out.v6 = Some(sock),
        }
    }
    Ok(out)
}

async fn recv_on(sock: &Option<UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// Runs the mesh until `stop` fires. With `leave`, everything meshsec
/// installed is removed before returning (the node announced leaving, so
/// its peers are removing their side too).
pub async fn run(
    mut mesh: Mesh,
    mut dp: Box<dyn Datapath>,
    sockets: HandshakeSockets,
    mut members: watch::Receiver<Arc<Vec<Member>>>,
    report: watch::Sender<Arc<MeshReport>>,
    mut stop: watch::Receiver<bool>,
    leave: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut buf4 = vec![0u8; 2048];
    let mut buf6 = vec![0u8; 2048];
    let mut next_resync = Instant::now();
    let mut published = MeshCounters::default();
    loop {
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
        let now = Instant::now();
        let wake = mesh.poll_timeout().unwrap_or(next_resync).min(next_resync).max(now);
        tokio::select! {
            _ = stop.changed() => break,
            r = recv_on(&sockets.v4, &mut buf4) => {
                if let Ok((n, from)) = r {
                    mesh.handle_datagram(Instant::now(), AddressFamily::V4, from, &buf4[..n], dp.as_mut());
                }
            }
            r = recv_on(&sockets.v6, &mut buf6) => {
                if let Ok((n, from)) = r {
                    mesh.handle_datagram(Instant::now(), AddressFamily::V6, from, &buf6[..n], dp.as_mut());
                }
            }
            changed = members.changed() => {
                if changed.is_err() { break; }
                let view = members.borrow_and_update().clone();
                mesh.set_members(Instant::now(), &view, dp.as_mut());
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        let now = Instant::now();
        let resync = now >= next_resync;
        if resync {
            next_resync = now + RESYNC_INTERVAL;
        }
        mesh.handle_timeout(now, dp.as_mut(), resync);
        if resync || *mesh.counters() != published {
            published = mesh.counters().clone();
            report.send_replace(Arc::new(MeshReport {
                links: mesh.link_status(),
                counters: mesh.counters().clone(),
                handshake: mesh.handshake_counters(),
            }));
        }
    }
    if leave.load(std::sync::atomic::Ordering::SeqCst) {
        match mesh.remove_all(dp.as_mut()) {
            Ok((sas, policies)) => info!(sas, policies, "left the mesh: removed meshsec's SAs and policies"),
            Err(e) => warn!(error = %e, "could not remove meshsec's SAs and policies"),
        }
    }
}
