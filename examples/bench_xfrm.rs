//! SA + policy installs per second through meshsec's XFRM netlink path.
//!
//! Runs in a private network namespace (it unshares one first, so it needs
//! root and never touches the host's XFRM tables). For N peers it installs
//! 2 SAs (in + out, AES-128-GCM, ESN, lifetimes) and 2 policies per peer via
//! `Datapath::apply` (pipelined netlink), then dumps and flushes.
//!
//! ```text
//! cargo run --release --example bench_xfrm -- [--peers N] [--policies-only] [--single] [--v6]
//! ```
//! `--policies-only` for kernels without ESP; `--single` installs one object
//! per request/ack round trip instead of pipelining, for comparison.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use meshsec::datapath::{
    Aead, Change, Datapath, Direction, Lifetimes, PolicySpec, Reqid, SaKey, SaSpec, XfrmDatapath,
};

fn peer_addr(i: u32, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0x6d73,
            0,
            0,
            0,
            0,
            (i >> 16) as u16,
            i as u16 + 2,
        ))
    } else {
        let n = i + 2;
        IpAddr::V4(Ipv4Addr::new(10, (n >> 16) as u8, (n >> 8) as u8, n as u8))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    let peers: u32 = args
        .iter()
        .position(|a| a == "--peers")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    let policies_only = flag("--policies-only");
    let single = flag("--single");
    let v6 = flag("--v6");

    // SAFETY: plain syscall; the whole process moves to a fresh namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!(
            "unshare(CLONE_NEWNET) failed (run as root): {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(2);
    }
    let mut dp = XfrmDatapath::open().expect("open NETLINK_XFRM");
    let local: IpAddr = if v6 {
        "fd00:6d73:ffff::1".parse().unwrap()
    } else {
        "10.255.255.254".parse().unwrap()
    };
    let aead = Aead::Aes128Gcm;
    let lifetimes = Lifetimes {
        soft_seconds: 3000,
        hard_seconds: 3600,
        soft_bytes: 1 << 40,
        hard_bytes: 1 << 41,
        ..Default::default()
    };

    let mut changes = Vec::with_capacity(peers as usize * 4);
    for i in 0..peers {
        let peer = peer_addr(i, v6);
        if !policies_only {
            let key: SaKey = (0..aead.key_len())
                .map(|k| (i as u8) ^ (k as u8))
                .collect::<Vec<u8>>()
                .into();
            changes.push(Change::AddSa(SaSpec {
                src: peer,
                dst: local,
                spi: 0x1000_0000 + i,
                direction: Direction::In,
                reqid: Reqid::DEFAULT,
                aead,
                key: key.clone(),
                replay_window: 1024,
                lifetimes,
            }));
            changes.push(Change::AddSa(SaSpec {
                src: local,
                dst: peer,
                spi: 0x2000_0000 + i,
                direction: Direction::Out,
                reqid: Reqid::DEFAULT,
                aead,
                key,
                replay_window: 1024,
                lifetimes,
            }));
        }
        for p in PolicySpec::pair(local, peer, Reqid::DEFAULT) {
            changes.push(Change::AddPolicy(p));
        }
    }
    let n = changes.len();

    let t = Instant::now();
    let results: Vec<_> = if single {
        changes
            .iter()
            .map(|c| match c {
                Change::AddSa(sa) => dp.install_sa(sa),
                Change::AddPolicy(p) => dp.install_policy(p),
                _ => unreachable!(),
            })
            .collect()
    } else {
        dp.apply(&changes)
    };
    let install = t.elapsed();
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    if let Some(e) = failed.first() {
        eprintln!("{} of {n} installs failed, first: {e}", failed.len());
        std::process::exit(1);
    }

    let t = Instant::now();
    let sas = dp.dump_sas().expect("dump SAs").len();
    let pols = dp.dump_policies().expect("dump policies").len();
    let dump = t.elapsed();
    assert_eq!(pols as u32, peers * 2);
    assert_eq!(sas as u32, if policies_only { 0 } else { peers * 2 });

    let t = Instant::now();
    let report = dp.flush_owned().expect("flush");
    let flush = t.elapsed();
    // IPv6 policies also brought the 4 neighbour-discovery bypass policies.
    assert_eq!(report.sas + report.policies, n + if v6 { 4 } else { 0 });

    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    unsafe { libc::uname(&mut u) };
    let rel: String = u
        .release
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8 as char)
        .collect();
    println!(
        "kernel {rel}, {} peers ({}), {} objects ({}), mode {}",
        peers,
        if v6 { "IPv6" } else { "IPv4" },
        n,
        if policies_only {
            "policies only"
        } else {
            "2 SAs + 2 policies per peer"
        },
        if single {
            "one request per round trip"
        } else {
            "pipelined apply"
        }
    );
    println!(
        "install: {:>8.1} ms  {:>10.0} objects/s",
        install.as_secs_f64() * 1e3,
        n as f64 / install.as_secs_f64()
    );
    println!(
        "dump:    {:>8.1} ms  ({sas} SAs, {pols} policies)",
        dump.as_secs_f64() * 1e3
    );
    println!(
        "flush:   {:>8.1} ms  {:>10.0} objects/s (dump + checked delete)",
        flush.as_secs_f64() * 1e3,
        n as f64 / flush.as_secs_f64()
    );
}
