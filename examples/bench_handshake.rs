//! Handshakes per second per core, in memory: full Noise IKpsk2 (both sides) + mac1 + ESP key
//! derivation, through the public `Endpoint` API, on one thread.
//!
//! `cargo run --release --example bench_handshake [seconds]`

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshsec::handshake::{
    Config, Endpoint, Event, HandshakeContext, PublicKey, SpiAllocError, StaticKeypair,
};

struct Ctx {
    peer: PublicKey,
    next: u32,
}

impl HandshakeContext for Ctx {
    fn is_member(&self, peer: &PublicKey) -> bool {
        *peer == self.peer
    }
    fn alloc_spi(&mut self, _: &PublicKey) -> Result<u32, SpiAllocError> {
        self.next = self.next.wrapping_add(1).max(256);
        Ok(self.next)
    }
}

/// CPU time of this thread: on a shared machine, wall time would also count other processes.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes into the timespec we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    // The DoS budget is a policy for real networks; here it would only measure cookie replies.
    let cfg = Config {
        load_rate: u32::MAX,
        load_burst: u32::MAX,
        ..Config::default()
    };
    let now = Instant::now();
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    let secret = [[0x42u8; 32]];
    let (ka, kb) = (StaticKeypair::generate(), StaticKeypair::generate());
    let (pa, pb) = (*ka.public(), *kb.public());
    let mut a = Endpoint::new(cfg.clone(), ka, &secret, now, unix).expect("endpoint");
    let mut b = Endpoint::new(cfg, kb, &secret, now, unix).expect("endpoint");
    let mut ctx_a = Ctx {
        peer: pb,
        next: 0x1000,
    };
    let mut ctx_b = Ctx {
        peer: pa,
        next: 0x2000,
    };
    let (addr_a, addr_b): (SocketAddr, SocketAddr) = (
        "127.0.0.1:1".parse().expect("addr"),
        "127.0.0.2:2".parse().expect("addr"),
    );

    let mut one = |i: u32| {
        a.initiate(now, pb, addr_b, 0x10000 + (i & 0xffff))
            .expect("initiate");
        let (_, init) = a.poll_transmit().expect("initiation");
        b.handle(now, addr_a, &init, &mut ctx_b)
            .expect("responder accepts");
        let (_, resp) = b.poll_transmit().expect("response");
        a.handle(now, addr_b, &resp, &mut ctx_a)
            .expect("initiator accepts");
        let ok_a = matches!(a.poll_event(), Some(Event::Established(_)));
        let ok_b = matches!(b.poll_event(), Some(Event::Established(_)));
        assert!(ok_a && ok_b, "handshake {i} did not complete");
    };

    for i in 0..200 {
        one(i);
    }
    let start = Instant::now();
    let cpu0 = thread_cpu_seconds();
    let mut n = 0u32;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        for _ in 0..100 {
            one(n);
            n += 1;
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = thread_cpu_seconds() - cpu0;
    let (per_cpu, per_wall) = (f64::from(n) / cpu, f64::from(n) / wall);
    println!("bench_handshake: {n} full handshakes (initiator + responder work, one thread)");
    println!("bench_handshake: wall {wall:.2} s -> {per_wall:.0}/s; thread CPU {cpu:.2} s -> {per_cpu:.0}/s");
    println!(
        "bench_handshake: {per_cpu:.0} handshakes/s per core ({:.1} us of CPU each, ~{:.0}/s per core for one side); goal >= 4000",
        1e6 / per_cpu,
        2.0 * per_cpu
    );
}
