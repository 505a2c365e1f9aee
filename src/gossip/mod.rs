//! Gossip: chitchat membership over a sealed transport.

pub mod seal;
pub mod transport;
