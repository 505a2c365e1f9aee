//! Whole endpoints on arbitrary datagrams. mac1 is fixed up with the real key when the length
//! fits, so inputs get past the cheap checks into Noise, payload, replay and cookie handling.
//! Must never panic; every datagram must be counted as received.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use meshsec::handshake::{
    crypto, noise, wire, Config, Endpoint, HandshakeContext, PublicKey, SpiAllocError,
    StaticKeypair,
};

struct Ctx;

impl HandshakeContext for Ctx {
    fn is_member(&self, _: &PublicKey) -> bool {
        true
    }
    fn alloc_spi(&mut self, _: &PublicKey) -> Result<u32, SpiAllocError> {
        Ok(0x1000)
    }
}

const SECRET: [u8; 32] = [0x33; 32];

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let a = StaticKeypair::from_private([1; 32]);
    let b = StaticKeypair::from_private([2; 32]);
    let (pa, pb) = (*a.public(), *b.public());
    let cfg = Config {
        load_rate: 2,
        load_burst: 2,
        ..Config::default()
    };
    let mut ea =
        Endpoint::with_seed(cfg.clone(), a, &[SECRET], now, Duration::from_secs(1), 1).unwrap();
    let mut eb = Endpoint::with_seed(cfg, b, &[SECRET], now, Duration::from_secs(1), 2).unwrap();
    let from: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let to_b: SocketAddr = "127.0.0.2:2".parse().unwrap();
    // A has an outstanding initiation so responses and cookie replies have somewhere to go.
    ea.initiate(now, pb, to_b, 0x2000).unwrap();
    let (_, init) = ea.poll_transmit().unwrap();
    let idx = &init[4..8];

    // Several datagrams per input, split on a marker-free scheme: chunks of the first byte's length.
    let mut rest = data;
    let mut n = 0u64;
    while !rest.is_empty() && n < 8 {
        let len = (rest[0] as usize * 2).min(rest.len() - 1);
        let mut dg = rest[1..1 + len].to_vec();
        rest = &rest[1 + len..];
        if dg.len() == wire::INITIATION_LEN {
            noise::put_mac(
                &mut dg,
                wire::INITIATION_MAC1_OFF,
                &crypto::derive_mac1_key(&SECRET, &pb),
            );
            let _ = eb.handle(now + Duration::from_millis(n), from, &dg, &mut Ctx);
        } else if dg.len() == wire::RESPONSE_LEN {
            dg[8..12].copy_from_slice(idx);
            noise::put_mac(
                &mut dg,
                wire::RESPONSE_MAC1_OFF,
                &crypto::derive_mac1_key(&SECRET, &pa),
            );
            let _ = ea.handle(now, to_b, &dg, &mut Ctx);
        } else {
            let _ = ea.handle(now, to_b, &dg, &mut Ctx);
            let _ = eb.handle(now, from, &dg, &mut Ctx);
        }
        n += 1;
        while eb.poll_transmit().is_some() {}
        while ea.poll_transmit().is_some() {}
        ea.handle_timeout(now + Duration::from_secs(n));
    }
    while ea.poll_event().is_some() {}
    while eb.poll_event().is_some() {}
});
