//! Typed snapshots of the mesh for the control API: each link's state and
//! kernel counters, and the mesh's own counters. The control module formats
//! them (hex SPIs, family names) for the listing.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::plan::sa_ids;
use crate::datapath::{AddressFamily, Aead, SaCounters, SaId};

/// A link's state as the listing shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    /// No session and no handshake under way.
    None,
    /// A handshake is under way (or keys are being installed).
    Handshaking,
    /// Both SAs and both policies are in the kernel.
    Established,
}

/// One link, typed.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkStatus {
    /// Address family.
    pub family: AddressFamily,
    /// Our address.
    pub local: IpAddr,
    /// Peer address.
    pub remote: IpAddr,
    /// Link state.
    pub state: LinkState,
    /// Inbound SPI (ours), when established.
    pub spi_in: Option<u32>,
    /// Outbound SPI (the peer's), when established.
    pub spi_out: Option<u32>,
    /// AEAD in use, when established.
    pub aead: Option<Aead>,
    /// Unix time (s) the current SAs were installed.
    pub established_at: Option<u64>,
    /// Inbound SA counters from the kernel (at most [`super::COUNTER_POLL`] old).
    pub inbound: SaCounters,
    /// Outbound SA counters from the kernel (at most [`super::COUNTER_POLL`] old).
    pub outbound: SaCounters,
}

/// Counters of the mesh itself (handshake endpoints keep their own).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MeshCounters {
    /// Sessions established.
    pub sessions_established: u64,
    /// Handshakes that failed or timed out.
    pub handshakes_failed: u64,
    /// Kernel changes applied.
    pub changes_applied: u64,
    /// Kernel changes that failed.
    pub changes_failed: u64,
    /// Installed SAs found missing from the kernel (links re-keyed).
    pub sas_vanished: u64,
    /// Datagrams the handshake layer rejected.
    pub handshake_rejected: u64,
    /// Re-keys started (time-based or forced).
    pub rekeys_started: u64,
    /// Responder sessions confirmed by the initiator's first ESP packet.
    pub sessions_confirmed: u64,
    /// Responder sessions dropped unconfirmed (e.g. a replayed initiation).
    pub sessions_unconfirmed: u64,
    /// Soft-expire notifications from the kernel for current SAs (byte,
    /// packet or time limit reached).
    pub kernel_soft_expires: u64,
    /// Hard-expire notifications from the kernel for current SAs (the
    /// kernel deleted one in use: its link re-keyed too late).
    pub kernel_hard_expires: u64,
    /// Current SAs found at a soft limit, by notification or by the
    /// counter check (which covers lost notifications); each
    /// schedules a re-key of its link.
    pub soft_limits_reached: u64,
    /// Kernel event notifications lost to a full socket buffer.
    pub kernel_event_overruns: u64,
    /// Handshakes refused because they did not come from the peer's data
    /// address (address proof; both roles).
    #[serde(default)]
    pub refused_wrong_source: u64,
    /// Claims on an address bound to another peer (each claim once): ignored.
    #[serde(default)]
    pub refused_claims: u64,
    /// Members publishing a peer key bound to another name (each once): ignored.
    #[serde(default)]
    pub refused_key_claims: u64,
    /// Due handshake initiations (new links, retries, re-keys) held back to
    /// a later tick by the per-second cap (`MeshConfig::max_initiations_per_sec`),
    /// never dropped; a link held back at several ticks counts at each.
    #[serde(default)]
    pub initiations_deferred: u64,
    /// Links a membership view wanted but did not get because
    /// `MeshConfig::max_links` links exist (counted at each view change).
    #[serde(default)]
    pub links_refused: u64,
    /// Full reads (dumps) of the kernel's XFRM tables: at start, after a
    /// change somebody else made, lost events or a failed change, and the
    /// periodic resync; never for the mesh's own changes.
    #[serde(default)]
    pub kernel_dumps: u64,
}

impl super::Mesh {
    /// Links per peer name, for the listing.
    pub fn link_status(&self) -> BTreeMap<String, Vec<LinkStatus>> {
        let mut out: BTreeMap<String, Vec<LinkStatus>> = BTreeMap::new();
        for (id, link) in &self.links {
            let ep_busy = self
                .endpoints
                .get(&id.family)
                .is_some_and(|e| e.is_initiating(&id.peer));
            let current = link.session.as_ref().filter(|_| link.installed);
            let ids = current.map(|s| sa_ids(&link.target, s));
            let counters = |id: Option<SaId>| {
                id.and_then(|id| self.kernel_counters.get(&id).copied())
                    .unwrap_or_default()
            };
            let st = LinkStatus {
                family: id.family,
                local: link.target.local,
                remote: link.target.remote,
                state: if link.installed {
                    LinkState::Established
                } else if link.session.is_some() || ep_busy {
                    LinkState::Handshaking
                } else {
                    LinkState::None
                },
                spi_in: current.map(|s| s.local_spi),
                spi_out: current.map(|s| s.peer_spi),
                aead: current.map(|s| s.algorithm),
                established_at: link.established_at,
                inbound: counters(ids.map(|(i, _)| i)),
                outbound: counters(ids.map(|(_, o)| o)),
            };
            out.entry(link.target.name.clone()).or_default().push(st);
        }
        out
    }
}
