//! meshsec: every pair of hosts gets kernel transport-mode ESP, keyed by Noise,
//! discovered through a sealed gossip cluster.
//!
//! Layout (each module is one concern; imports only run downwards, see
//! docs/architecture.md for the map and one membership change end to end):
//! - [`aead`], [`throttle`], [`shutdown`]: the ESP transform enum, the log
//!   throttle, the stop/leave signal (they depend on nothing in the crate).
//! - [`identity`]: the node's static X25519 key pair and the cluster secret files.
//! - [`handshake`]: the sans-IO Noise endpoint that keys each link.
//! - [`datapath`]: the kernel's XFRM tables behind one trait (kernel and in-memory).
//! - [`gossip`]: chitchat behind a sealing transport; the published key schema;
//!   the typed membership view.
//! - [`mesh`]: which links, the pure planner, reconciliation, the I/O driver.
//! - [`control`]: the Unix-socket JSON API (listing rows, status) and its client.
//! - [`metrics`]: the Prometheus endpoint, rendered from the status at each scrape.
//! - [`config`]: flags + TOML file → a validated [`config::AgentConfig`].
//! - [`agent`]: task wiring and the single shutdown path.
//! - [`notify`]: systemd notifications (ready, status, watchdog, stopping).
//! - [`doctor`]: `meshsec doctor`: pure checks over what it gathers (status,
//!   kernel counters, foreign policies, MTUs, file modes).
//! - [`cli`]: the `meshsec` command line (the binary only calls [`cli::main`]).
#![warn(missing_docs)]

pub mod aead;
pub mod agent;
pub mod cert;
pub mod cli;
pub mod config;
pub mod control;
pub mod datapath;
pub mod doctor;
pub mod gossip;
pub mod handshake;
pub mod identity;
pub mod mesh;
pub mod metrics;
pub mod notify;
pub mod shutdown;
#[cfg(test)]
pub(crate) mod sim;
pub mod throttle;
