//! Pairwise handshake: Noise `IKpsk2` over UDP, sans-IO (spec: proto/handshake.md).
//!
//! Every pair of members runs one handshake per session. Both sides already know each other's
//! static X25519 key from gossip, so `IKpsk2` completes in one round trip; the PSK comes from
//! the cluster secret, so only cluster members can complete it. The result is a [`Session`]
//! holding per-direction ESP keys and SPIs for the datapath.
//!
//! Layout:
//! - [`wire`]: datagram layout and length-checked decoding (mirrors proto/handshake.md §2).
//! - [`crypto`]: key derivations, mac1/mac2, cookies, ESP key expansion.
//! - [`dh`]: X25519 for snow with the static key's public half and static-static DH memoised.
//! - [`noise`]: the two Noise messages as pure functions (what the test vectors pin down).
//! - [`types`]: the public vocabulary: [`Config`], [`Session`], [`Event`], [`Rejected`],
//!   [`Counters`], the [`HandshakeContext`] the driver supplies, errors.
//! - `dos`: the responder's DoS defence (load detection, cookies, rate limits), owned by the
//!   endpoint.
//! - [`endpoint`]: the state machine (its responder side, answering initiations, in
//!   `endpoint/responder.rs`). It does no I/O and reads no clock: the driver calls
//!   [`Endpoint::handle`] with each datagram and `now`, [`Endpoint::handle_timeout`] when
//!   [`Endpoint::poll_timeout`] says so, and drains [`Endpoint::poll_transmit`] and
//!   [`Endpoint::poll_event`].
//!
//! ```no_run
//! # use meshsec::handshake::*;
//! # use std::time::{Instant, SystemTime, UNIX_EPOCH};
//! # struct Ctx;
//! # impl HandshakeContext for Ctx {
//! #   fn is_member(&self, _: &PublicKey) -> bool { true }
//! #   fn alloc_spi(&mut self, _: &PublicKey) -> Result<u32, SpiAllocError> { Ok(0x1000) }
//! # }
//! let now = Instant::now();
//! let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
//! let mut ep = Endpoint::new(Config::default(), StaticKeypair::generate(), &[[0u8; 32]], now, unix).unwrap();
//! # let (peer, addr, datagram, from, mut ctx) = ([1u8; 32], "127.0.0.1:1".parse().unwrap(), vec![], "127.0.0.1:2".parse().unwrap(), Ctx);
//! ep.initiate(now, peer, addr, 0x1234).unwrap();
//! while let Some((to, bytes)) = ep.poll_transmit() { /* socket.send_to(&bytes, to) */ }
//! let _ = ep.handle(now, from, &datagram, &mut ctx); // on every received datagram
//! while let Some(ev) = ep.poll_event() {
//!     if let Event::Established(s) = ev { /* install SAs from s */ }
//! }
//! ```

pub mod crypto;
pub mod dh;
mod dos;
pub mod endpoint;
pub mod noise;
mod ratelimit;
pub mod types;
pub mod wire;

pub use crypto::{Aead, EspKey, StaticKeypair};
pub use endpoint::Endpoint;
pub use types::{
    Config, ConfigError, Counters, Event, FailReason, HandshakeContext, InitiateError, PublicKey,
    Rejected, Role, Session, SpiAllocError, COOKIE_LIFETIME, COOKIE_SECRET_LIFETIME, MIN_SPI,
};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod vectors;
