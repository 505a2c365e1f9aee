//! Gossip: chitchat behind a sealing transport, the published key schema and
//! the membership view.

pub mod members;
pub mod schema;

use std::collections::BTreeMap;
use std::sync::Arc;

use chitchat::transport::Transport;

use crate::identity::ClusterSecret;

/// The transport the agent hands to chitchat, plus its counters.
pub struct GossipTransport {
    inner: Box<dyn Transport>,
    counters: Arc<dyn Fn() -> BTreeMap<String, u64> + Send + Sync>,
}

impl GossipTransport {
    /// The chitchat transport.
    pub fn as_transport(&self) -> &dyn Transport {
        self.inner.as_ref()
    }

    /// A function reading the transport's counters.
    pub fn counters(&self) -> Arc<dyn Fn() -> BTreeMap<String, u64> + Send + Sync> {
        self.counters.clone()
    }
}

/// Builds the gossip transport for a keyring (first secret seals).
pub fn transport_for(_keyring: &[ClusterSecret]) -> Result<GossipTransport, std::io::Error> {
    // Placeholder until the sealed transport lands: plaintext chitchat UDP.
    Ok(GossipTransport {
        inner: Box::new(chitchat::transport::UdpTransport),
        counters: Arc::new(BTreeMap::new),
    })
}
