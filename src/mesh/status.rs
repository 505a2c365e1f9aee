//! Typed snapshots of the mesh for the control API: each link's state and
//! kernel counters, and the mesh's own counters. The control module formats
//! them (hex SPIs, family names) for the listing.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::datapath::{AddressFamily, Aead, SaCounters};

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
    /// Inbound SA counters from the kernel (last resync).
    pub inbound: SaCounters,
    /// Outbound SA counters from the kernel (last resync).
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
    /// counter check at resync (which covers lost notifications); each
    /// schedules a re-key of its link.
    pub soft_limits_reached: u64,
    /// Kernel event notifications lost to a full socket buffer.
    pub kernel_event_overruns: u64,
}
