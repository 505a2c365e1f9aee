//! Gossip: chitchat behind a sealing transport, the published key schema and
//! the membership view.
//!
//! - [`seal`]: the datagram sealing format and the replay-refusing opener.
//! - [`pieces`]: messages larger than one bounded datagram, sent as sealed pieces and put
//!   back together within bounds.
//! - [`transport`]: a chitchat `Transport` whose datagrams are sealed on the wire.
//! - [`schema`]: the key-values each node publishes.
//! - [`records`]: signed records (proto/records.md): signing, checking, counting.
//! - [`members`]: the membership view (pure) behind `meshsec members`.
//! - [`sim`]: many nodes' gossip in one process over an in-memory network (issue 12).

pub mod members;
pub mod own;
pub mod pieces;
pub mod pins;
pub mod records;
pub mod schema;
pub mod seal;
pub mod sim;
pub mod transport;
pub mod trust;

use std::os::fd::RawFd;
use std::sync::Arc;

use chitchat::transport::Transport;

use crate::identity::ClusterSecret;
use seal::Keyring;
use transport::{GossipCounters, SealedTransport};

/// The transport the agent hands to chitchat, plus its counters.
pub struct GossipTransport {
    inner: SealedTransport,
    keyring: Arc<Keyring>,
}

impl GossipTransport {
    /// The chitchat transport.
    pub fn as_transport(&self) -> &dyn Transport {
        &self.inner
    }

    /// The live keyring ([`Keyring::replace`] takes effect on the next datagram).
    pub fn keyring(&self) -> Arc<Keyring> {
        self.keyring.clone()
    }

    /// Hands the spawned chitchat to the transport's SYN guard (see
    /// [`SealedTransport::attach`]); call right after `spawn_chitchat`.
    pub fn attach(&self, chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>) {
        self.inner.attach(chitchat);
    }

    /// The transport's live counters; [`GossipCounters::snapshot`] reads them (for
    /// `meshsec status`).
    pub fn counters(&self) -> Arc<GossipCounters> {
        self.inner.counters()
    }
}

/// Errors building the gossip transport.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    /// The keyring is empty.
    #[error("--secret-file: at least one cluster secret is required")]
    EmptyKeyring,
}

/// Builds the sealed gossip transport for a keyring (the first secret seals).
/// `on_bind` runs on the network socket before any traffic (XFRM bypass).
pub fn transport_for(
    keyring: &[ClusterSecret],
    on_bind: Option<Arc<dyn Fn(RawFd) -> std::io::Result<()> + Send + Sync>>,
) -> Result<GossipTransport, GossipError> {
    let ring = Keyring::new(keyring.iter().map(|s| *s.0)).map_err(|_| GossipError::EmptyKeyring)?;
    let keyring = Arc::new(ring);
    let mut inner = SealedTransport::new(keyring.clone());
    if let Some(hook) = on_bind {
        inner = inner.with_on_bind(move |fd| hook(fd));
    }
    Ok(GossipTransport { inner, keyring })
}
