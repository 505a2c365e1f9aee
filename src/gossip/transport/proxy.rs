//! The loopback proxy table: one loopback socket per remote peer address, so the source address
//! chitchat sees maps back to exactly one peer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::task::AbortHandle;

/// One peer's loopback proxy; dropping it stops its outbound pump.
pub(super) struct Proxy {
    pub(super) addr: SocketAddr,
    pub(super) socket: Arc<UdpSocket>,
    pub(super) last_used: Instant,
    pub(super) pump: AbortHandle,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// Peer address ⇄ loopback proxy, one-to-one, bounded.
pub(super) struct ProxyTable {
    by_peer: HashMap<SocketAddr, Proxy>,
    peer_of: HashMap<SocketAddr, SocketAddr>,
    max: usize,
}

impl ProxyTable {
    pub(super) fn new(max: usize) -> Self {
        ProxyTable {
            by_peer: HashMap::new(),
            peer_of: HashMap::new(),
            max: max.max(1),
        }
    }

    pub(super) fn touch(
        &mut self,
        peer: &SocketAddr,
        now: Instant,
    ) -> Option<(SocketAddr, Arc<UdpSocket>)> {
        let p = self.by_peer.get_mut(peer)?;
        p.last_used = now;
        Some((p.addr, p.socket.clone()))
    }

    /// Number of peers with a proxy.
    pub(super) fn len(&self) -> usize {
        self.by_peer.len()
    }

    pub(super) fn peer_of(&self, proxy_addr: &SocketAddr) -> Option<SocketAddr> {
        self.peer_of.get(proxy_addr).copied()
    }

    /// Inserts, evicting the least recently used entries beyond the bound; returns how many.
    pub(super) fn insert(&mut self, peer: SocketAddr, proxy: Proxy) -> usize {
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
    pub(super) fn sweep(&mut self, now: Instant, idle: Duration) -> usize {
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
