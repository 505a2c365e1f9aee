//! meshsec: every pair of hosts gets kernel transport-mode ESP, keyed by Noise,
//! discovered through a sealed gossip cluster.
//!
//! Layout (each module is one concern; the agent wires them together):
//! - [`aead`]: the one ESP transform enum (config, handshake and datapath share it).
//! - [`config`]: flags + TOML file → a validated [`config::AgentConfig`].
//! - [`identity`]: the node's static X25519 key pair and the cluster secret files.
//! - [`gossip`]: chitchat behind a sealing transport; the published key schema;
//!   the membership view.
//! - [`control`]: the Unix-socket JSON API and its client.
//! - [`agent`]: task wiring and the single shutdown path.
//! - [`cli`]: the `meshsec` command line (the binary only calls [`cli::main`]).
#![warn(missing_docs)]

pub mod aead;
pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod datapath;
pub mod gossip;
pub mod handshake;
pub mod identity;
pub mod mesh;
pub mod shutdown;
#[cfg(test)]
pub(crate) mod sim;
pub mod throttle;
