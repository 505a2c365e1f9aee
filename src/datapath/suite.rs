//! One behaviour suite for every [`Datapath`]: the in-memory model runs it
//! always; the kernel runs it in a throwaway network namespace (policy parts
//! on any kernel with XFRM netlink, SA parts only on a kernel with ESP).

use std::net::IpAddr;

use super::*;

pub(crate) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub(crate) fn key(aead: Aead, fill: u8) -> SaKey {
    (0..aead.key_len())
        .map(|i| fill.wrapping_add(i as u8))
        .collect::<Vec<u8>>()
        .into()
}

#[test]
fn debug_of_an_sa_spec_or_its_key_shows_no_key_bytes() {
    let mut s = sa("192.0.2.1", "192.0.2.2", 1, Direction::In, Aead::Aes128Gcm);
    s.key = vec![0xab; Aead::Aes128Gcm.key_len()].into();
    for text in [format!("{s:?}"), format!("{s:#?}"), format!("{:?}", s.key)] {
        assert!(!text.contains("171") && !text.contains("ab, ab"), "{text}");
        assert!(!text.contains("0xab") && !text.contains("[ab"), "{text}");
        assert!(text.contains("20 bytes redacted"), "{text}");
    }
}

pub(crate) fn sa(src: &str, dst: &str, spi: u32, direction: Direction, aead: Aead) -> SaSpec {
    SaSpec {
        src: ip(src),
        dst: ip(dst),
        spi,
        direction,
        reqid: Reqid::DEFAULT,
        aead,
        key: key(aead, spi as u8),
        replay_window: 2048,
        lifetimes: Lifetimes {
            soft_bytes: 1 << 40,
            hard_bytes: 1 << 41,
            soft_packets: 1 << 30,
            hard_packets: 1 << 31,
            soft_seconds: 3000,
            hard_seconds: 3600,
        },
    }
}

/// Policies: add, dump (owned, exact), duplicate, delete, delete-missing,
/// batch apply, flush. Both families.
pub(crate) fn policies(dp: &mut dyn Datapath) {
    assert!(dp.dump_policies().unwrap().is_empty());
    let v4 = PolicySpec::pair(ip("10.9.0.1"), ip("10.9.0.2"), Reqid::DEFAULT);
    let v6 = PolicySpec::pair(ip("fd00:9::1"), ip("fd00:9::2"), Reqid::new(2).unwrap());
    for p in v4.iter().chain(v6.iter()) {
        dp.install_policy(p).unwrap();
    }
    assert_eq!(
        dp.nd_bypass_count().unwrap(),
        4,
        "IPv6 policies bring the ND bypass"
    );
    let dump = dp.dump_policies().unwrap();
    let mut got: Vec<PolicySpec> = dump.iter().map(|p| p.spec).collect();
    got.sort();
    let mut want: Vec<PolicySpec> = v4.iter().chain(v6.iter()).copied().collect();
    want.sort();
    assert_eq!(got, want);

    let e = dp.install_policy(&v4[0]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert!(
        e.to_string().contains("XFRM_MSG_NEWPOLICY") || e.to_string().contains("NEWPOLICY"),
        "{e}"
    );

    dp.delete_policy(v4[0].id).unwrap();
    let e = dp.delete_policy(v4[0].id).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let never = PolicyId {
        src: ip("10.9.9.9"),
        dst: ip("10.9.9.8"),
        direction: Direction::In,
    };
    assert_eq!(
        dp.delete_policy(never).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(dp.dump_policies().unwrap().len(), 3);

    // Mixed families are refused before the kernel sees them.
    let bad = PolicySpec {
        id: PolicyId {
            src: ip("10.9.0.1"),
            dst: ip("fd00::1"),
            direction: Direction::Out,
        },
        reqid: Reqid::DEFAULT,
    };
    assert_eq!(
        dp.install_policy(&bad).unwrap_err().kind(),
        ErrorKind::Invalid
    );

    // Batch: 100 peers, one of them a duplicate of what exists.
    let mut changes = Vec::new();
    for i in 0..100u32 {
        let peer = IpAddr::from([10, 10, (i >> 8) as u8, i as u8]);
        for p in PolicySpec::pair(ip("10.10.255.1"), peer, Reqid::DEFAULT) {
            changes.push(Change::AddPolicy(p));
        }
    }
    changes.push(Change::AddPolicy(v4[1]));
    changes.push(Change::DeletePolicy(v6[0].id));
    changes.push(Change::DeletePolicy(never));
    let res = dp.apply(&changes);
    assert_eq!(res.len(), 203);
    assert!(
        res[..200].iter().all(|r| r.is_ok()),
        "{:?}",
        res.iter().find(|r| r.is_err())
    );
    assert_eq!(
        res[200].as_ref().unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    assert!(res[201].is_ok(), "{:?}", res[201]);
    assert_eq!(res[202].as_ref().unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(dp.dump_policies().unwrap().len(), 202);

    let report = dp.flush_owned().unwrap();
    assert_eq!(report.policies, 202 + 4, "peer policies + ND bypass");
    assert!(dp.dump_policies().unwrap().is_empty());
    assert_eq!(dp.nd_bypass_count().unwrap(), 0);
    // Idempotent.
    dp.ensure_nd_bypass().unwrap();
    dp.ensure_nd_bypass().unwrap();
    assert_eq!(dp.nd_bypass_count().unwrap(), 4);
    assert_eq!(dp.remove_nd_bypass().unwrap(), 4);
    assert_eq!(dp.remove_nd_bypass().unwrap(), 0);
}

/// Foreign objects (already installed by the caller) are invisible to dumps,
/// refused by deletes, survive flushes; a meshsec policy on a foreign
/// selector collides with EEXIST instead of replacing it.
pub(crate) fn ownership(dp: &mut dyn Datapath, foreign_policy: PolicyId, foreign_sa: Option<SaId>) {
    assert!(dp.dump_policies().unwrap().is_empty());
    assert!(dp.dump_sas().unwrap().is_empty());
    let e = dp.delete_policy(foreign_policy).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotOwned, "{e}");
    let e = dp
        .install_policy(&PolicySpec {
            id: foreign_policy,
            reqid: Reqid::DEFAULT,
        })
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    if let Some(id) = foreign_sa {
        let e = dp.delete_sa(id).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotOwned, "{e}");
        let e = dp
            .apply(&[Change::DeleteSa(id)])
            .pop()
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotOwned, "{e}");
    }
    let e = dp
        .apply(&[Change::DeletePolicy(foreign_policy)])
        .pop()
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotOwned, "{e}");
    let ours = PolicySpec::pair(ip("10.11.0.1"), ip("10.11.0.2"), Reqid::DEFAULT);
    for p in &ours {
        dp.install_policy(p).unwrap();
    }
    let report = dp.flush_owned().unwrap();
    assert_eq!(
        report,
        FlushReport {
            sas: 0,
            policies: 2
        }
    );
    // The foreign policy is still there: adding ours on it still collides.
    let e = dp
        .install_policy(&PolicySpec {
            id: foreign_policy,
            reqid: Reqid::DEFAULT,
        })
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
}

/// ALLOCSPI: unique SPIs, larval SAs visible as such, deletable, flushable.
pub(crate) fn alloc_spi(dp: &mut dyn Datapath) {
    let (peer, me) = (ip("10.12.0.2"), ip("10.12.0.1"));
    let a = dp.alloc_spi(peer, me, Reqid::DEFAULT).unwrap();
    let b = dp.alloc_spi(peer, me, Reqid::DEFAULT).unwrap();
    assert_ne!(a, b, "two reservations must not share an SPI");
    assert!(a >= 0x100 && b >= 0x100);
    let c = dp
        .alloc_spi(ip("fd00:12::2"), ip("fd00:12::1"), Reqid::DEFAULT)
        .unwrap();
    let sas = dp.dump_sas().unwrap();
    assert_eq!(sas.len(), 3, "{sas:?}");
    for s in &sas {
        assert!(s.larval, "{s:?}");
        assert_eq!(s.reqid, Reqid::DEFAULT);
        assert_eq!(s.direction, None);
    }
    assert!(sas
        .iter()
        .any(|s| s.spi == c && s.dst == ip("fd00:12::1") && s.src == ip("fd00:12::2")));
    assert!(sas
        .iter()
        .any(|s| s.spi == a && s.dst == me && s.src == peer));
    dp.delete_sa(SaId { dst: me, spi: a }).unwrap();
    assert_eq!(
        dp.delete_sa(SaId { dst: me, spi: a }).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        dp.alloc_spi(ip("10.0.0.1"), ip("fd00::1"), Reqid::DEFAULT)
            .unwrap_err()
            .kind(),
        ErrorKind::Invalid
    );
    assert_eq!(
        dp.flush_owned().unwrap(),
        FlushReport {
            sas: 2,
            policies: 0
        }
    );
    assert!(dp.dump_sas().unwrap().is_empty());
}

/// SAs (needs ESP in a kernel): the allocate-then-fill flow, direct adds,
/// duplicates, missing updates/deletes, validation, dump contents, batches.
pub(crate) fn sas(dp: &mut dyn Datapath, aead: Aead) {
    for (me, peer) in [("10.13.0.1", "10.13.0.2"), ("fd00:13::1", "fd00:13::2")] {
        let spi = dp.alloc_spi(ip(peer), ip(me), Reqid::DEFAULT).unwrap();
        let inbound = sa(peer, me, spi, Direction::In, aead);
        dp.update_sa(&inbound).unwrap();
        let outbound = sa(me, peer, 0x4000_0001, Direction::Out, aead);
        dp.install_sa(&outbound).unwrap();
        // NEWSA on a reserved SPI collides; the reconciler fills it instead.
        let spi2 = dp.alloc_spi(ip(peer), ip(me), Reqid::DEFAULT).unwrap();
        let second = sa(peer, me, spi2, Direction::In, aead);
        assert_eq!(
            dp.install_sa(&second).unwrap_err().kind(),
            ErrorKind::AlreadyExists
        );
        let actual = KernelState::from_dumps(&dp.dump_sas().unwrap(), &[]);
        let mut desired = actual.clone();
        desired.larval.clear();
        desired.sas.insert(second.id(), second.clone());
        let changes = diff(&desired, &actual);
        assert_eq!(changes, vec![Change::FillSa(second.clone())]);
        assert!(dp.apply(&changes).iter().all(|r| r.is_ok()));
        let missing_fill = sa(peer, me, 0x4000_0077, Direction::In, aead);
        let r = dp.apply(&[Change::FillSa(missing_fill)]).pop().unwrap();
        assert_eq!(r.unwrap_err().kind(), ErrorKind::NotFound);
        dp.delete_sa(second.id()).unwrap();

        let dump = dp.dump_sas().unwrap();
        assert_eq!(dump.len(), 2, "{dump:?}");
        let i = dump.iter().find(|s| s.spi == spi).unwrap();
        assert!(!i.larval);
        assert_eq!(i.direction, Some(Direction::In));
        assert_eq!(i.aead, Some(aead));
        assert_eq!(i.replay_window, 2048);
        assert_eq!(i.lifetimes, inbound.lifetimes);
        assert_eq!(i.counters, SaCounters::default());
        // Targeted reads: what the dump says, for just the SAs asked for
        // (in order), None for one that is not there.
        let got = dp
            .get_sas(&[outbound.id(), second.id(), inbound.id()])
            .unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].as_ref(), dump.iter().find(|s| s.spi == 0x4000_0001));
        assert_eq!(got[1], None, "deleted");
        assert_eq!(got[2].as_ref(), Some(i));
        assert_eq!(dp.get_sas(&[]).unwrap(), vec![]);
        let o = dump.iter().find(|s| s.spi == 0x4000_0001).unwrap();
        assert_eq!(o.direction, Some(Direction::Out));
        assert_eq!((o.src, o.dst), (ip(me), ip(peer)));
        assert!(o.replay_window <= 1);

        let e = dp.install_sa(&outbound).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
        assert!(e.to_string().contains("NEWSA"), "{e}");
        // Same SPI towards another destination is a different SA.
        let other = sa(me, "10.13.0.3", 0x4000_0001, Direction::Out, aead);
        let other = if me.contains(':') {
            sa(me, "fd00:13::3", 0x4000_0001, Direction::Out, aead)
        } else {
            other
        };
        dp.install_sa(&other).unwrap();
        dp.delete_sa(other.id()).unwrap();

        let missing = sa(peer, me, 0x4000_0099, Direction::In, aead);
        assert_eq!(
            dp.update_sa(&missing).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        let mut short = missing.clone();
        let k = missing.key.as_bytes();
        short.key = SaKey::from(&k[..k.len() - 1]);
        assert_eq!(
            dp.install_sa(&short).unwrap_err().kind(),
            ErrorKind::Invalid
        );
        let mut narrow = missing.clone();
        narrow.replay_window = 64;
        assert_eq!(
            dp.install_sa(&narrow).unwrap_err().kind(),
            ErrorKind::Invalid
        );

        // Updating a complete SA only changes lifetimes.
        let mut relife = inbound.clone();
        relife.lifetimes.hard_seconds = 7200;
        dp.update_sa(&relife).unwrap();
        let d = dp.dump_sas().unwrap();
        assert_eq!(
            d.iter()
                .find(|s| s.spi == spi)
                .unwrap()
                .lifetimes
                .hard_seconds,
            7200
        );

        dp.delete_sa(inbound.id()).unwrap();
        assert_eq!(
            dp.delete_sa(inbound.id()).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        dp.delete_sa(outbound.id()).unwrap();
        assert!(dp.dump_sas().unwrap().is_empty());
    }

    // Batch: 200 SAs + 200 policies in one apply.
    let mut changes = Vec::new();
    for i in 0..100u32 {
        let peer = IpAddr::from([10, 14, (i >> 8) as u8, (i + 2) as u8]);
        let me = ip("10.14.255.1");
        changes.push(Change::AddSa(SaSpec {
            spi: 0x5000_0000 + i,
            ..sa(&peer.to_string(), "10.14.255.1", 0, Direction::In, aead)
        }));
        changes.push(Change::AddSa(SaSpec {
            spi: 0x6000_0000 + i,
            ..sa("10.14.255.1", &peer.to_string(), 0, Direction::Out, aead)
        }));
        for p in PolicySpec::pair(me, peer, Reqid::DEFAULT) {
            changes.push(Change::AddPolicy(p));
        }
    }
    let res = dp.apply(&changes);
    assert!(
        res.iter().all(|r| r.is_ok()),
        "{:?}",
        res.iter().find(|r| r.is_err())
    );
    assert_eq!(dp.dump_sas().unwrap().len(), 200);
    let del: Vec<Change> = (0..100u32)
        .map(|i| {
            Change::DeleteSa(SaId {
                dst: ip("10.14.255.1"),
                spi: 0x5000_0000 + i,
            })
        })
        .collect();
    assert!(dp.apply(&del).iter().all(|r| r.is_ok()));
    assert_eq!(dp.dump_sas().unwrap().len(), 100);
    assert_eq!(
        dp.flush_owned().unwrap(),
        FlushReport {
            sas: 100,
            policies: 200
        }
    );
}

/// Strict mode's range policies: add, dump (exact, owned only), duplicate,
/// delete, delete-missing, batch apply, the ND bypass for IPv6, flush.
/// `foreign` is somebody else's policy on the selector of
/// `RangePolicy::block("10.77.0.0/16")[0]` (already installed by the caller).
pub(crate) fn range_policies(dp: &mut dyn Datapath) {
    assert!(dp.dump_range_policies().unwrap().is_empty());
    let v4: Prefix = "10.9.0.0/24".parse().unwrap();
    let v6: Prefix = "fd00:9::/64".parse().unwrap();
    let want = super::range_policies(&[v4, v6], &[ip("10.9.0.1"), ip("fd00:9::1")]);
    assert_eq!(want.len(), 8);
    for p in &want {
        dp.install_range_policy(p).unwrap();
    }
    assert_eq!(
        dp.nd_bypass_count().unwrap(),
        4,
        "IPv6 blocks bring the ND bypass"
    );
    let mut got = dp.dump_range_policies().unwrap();
    got.sort();
    assert_eq!(got, want);
    let (hosts, ranges) = dp.dump_all_policies().unwrap();
    assert!(
        hosts.is_empty(),
        "range policies are not host-pair policies: {hosts:?}"
    );
    assert_eq!(ranges.len(), 8);
    let e = dp.install_range_policy(&want[0]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");

    // Somebody else's policy on a range selector is neither listed nor deleted.
    let foreign = RangePolicy::block("10.77.0.0/16".parse().unwrap())[0];
    assert!(!dp.dump_range_policies().unwrap().contains(&foreign));
    assert_eq!(
        dp.delete_range_policy(&foreign).unwrap_err().kind(),
        ErrorKind::NotFound
    );

    dp.delete_range_policy(&want[0]).unwrap();
    assert_eq!(
        dp.delete_range_policy(&want[0]).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(dp.dump_range_policies().unwrap().len(), 7);

    // Batch: put the deleted one back, remove the IPv6 ones, add a range.
    let extra = RangePolicy::block("10.10.0.0/16".parse().unwrap());
    let mut changes = vec![Change::AddRange(want[0])];
    changes.extend(extra.iter().map(|p| Change::AddRange(*p)));
    changes.extend(
        want.iter()
            .filter(|p| p.src.addr().is_ipv6())
            .map(|p| Change::DeleteRange(*p)),
    );
    changes.push(Change::DeleteRange(foreign));
    let res = dp.apply(&changes);
    let n = res.len();
    assert!(res[..n - 1].iter().all(|r| r.is_ok()), "{res:?}");
    assert_eq!(res[n - 1].as_ref().unwrap_err().kind(), ErrorKind::NotFound);
    let got = dp.dump_range_policies().unwrap();
    assert_eq!(got.len(), 6, "{got:#?}");
    assert!(got.iter().all(|p| p.src.addr().is_ipv4()));

    let report = dp.flush_owned().unwrap();
    assert_eq!(
        report.policies,
        6 + 4,
        "ranges and the ND bypass: {report:?}"
    );
    assert!(dp.dump_range_policies().unwrap().is_empty());
}

#[cfg(test)]
mod memory_tests {
    use super::*;

    #[test]
    fn memory_policies() {
        policies(&mut MemoryDatapath::new());
    }

    #[test]
    fn memory_ownership() {
        let mut m = MemoryDatapath::new();
        let fp = PolicyId {
            src: ip("10.20.0.1"),
            dst: ip("10.20.0.2"),
            direction: Direction::Out,
        };
        let fs = SaId {
            dst: ip("10.20.0.2"),
            spi: 0x777,
        };
        m.add_foreign_policy(fp);
        m.add_foreign_sa(fs.dst, fs.spi);
        ownership(&mut m, fp, Some(fs));
        // Foreign SPI is taken for NEWSA too.
        let e = m
            .install_sa(&sa(
                "10.20.0.1",
                "10.20.0.2",
                0x777,
                Direction::Out,
                Aead::Aes128Gcm,
            ))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    }

    #[test]
    fn memory_range_policies() {
        let mut m = MemoryDatapath::new();
        m.add_foreign_range_policy(RangePolicy::block("10.77.0.0/16".parse().unwrap())[0]);
        range_policies(&mut m);
    }

    #[test]
    fn memory_alloc_spi() {
        alloc_spi(&mut MemoryDatapath::new());
    }

    #[test]
    fn memory_sas() {
        for aead in [Aead::Aes128Gcm, Aead::Aes256Gcm, Aead::ChaCha20Poly1305] {
            sas(&mut MemoryDatapath::new(), aead);
        }
    }

    #[test]
    fn memory_counters_and_probe() {
        let mut m = MemoryDatapath::new();
        assert_eq!(
            m.probe(Aead::Aes128Gcm, &[AddressFamily::V4]).unwrap(),
            super::super::ProbeReport::default(),
            "the in-memory datapath loads no module"
        );
        let s = sa(
            "10.21.0.1",
            "10.21.0.2",
            0x1234,
            Direction::Out,
            Aead::Aes128Gcm,
        );
        m.install_sa(&s).unwrap();
        assert!(m.record_traffic(s.id(), 1500, 1));
        assert_eq!(m.dump_sas().unwrap()[0].counters.bytes, 1500);
        assert_eq!(m.key_of(s.id()), Some(s.key.as_bytes()));
        let i = sa(
            "10.21.0.2",
            "10.21.0.1",
            0x4321,
            Direction::In,
            Aead::Aes128Gcm,
        );
        m.install_sa(&i).unwrap();
        assert!(m.record_traffic(i.id(), 700, 2));
        m.alloc_spi(ip("10.21.0.2"), ip("10.21.0.1"), Reqid::DEFAULT)
            .unwrap();
        let c = peer_counters(&m.dump_sas().unwrap(), ip("10.21.0.2"));
        assert_eq!(
            (c.bytes_in, c.packets_in, c.bytes_out, c.packets_out),
            (700, 2, 1500, 1)
        );
        assert_eq!((c.spis_in, c.spis_out), (vec![0x4321], vec![0x1234]));
        assert_eq!(
            peer_counters(&m.dump_sas().unwrap(), ip("10.21.0.9")),
            PeerCounters::default()
        );
        m.set_probe_failure(
            "kernel lacks ESP for IPv4 (CONFIG_INET_ESP, module esp4)",
            "modprobe esp4",
        );
        let e = m.probe(Aead::Aes128Gcm, &[AddressFamily::V4]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("modprobe esp4"));
    }
}
