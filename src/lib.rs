//! meshsec: every pair of hosts gets kernel transport-mode ESP, keyed by Noise,
//! discovered through a sealed gossip cluster.
#![warn(missing_docs)]

pub mod datapath;
