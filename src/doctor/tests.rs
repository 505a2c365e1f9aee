use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::gather::{inet_checksum, samples};
use super::*;
use crate::config::AgentFlags;
use crate::control::LinkRow;
use crate::datapath::{Lifetimes, Reqid, SaCounters, SaState};
use crate::gossip::seal::{Keyring, Opener, ReplayConfig};
use crate::gossip::transport::GossipCounters;

const NOW: u64 = 1_790_000_000_000;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn link(local: &str, remote: &str, sa: LinkState, spi_in: u32, pin: u64, pout: u64) -> LinkRow {
    LinkRow {
        family: if ip(local).is_ipv4() { "ipv4" } else { "ipv6" }.into(),
        local: ip(local),
        remote: ip(remote),
        sa,
        spi_in: Some(format!("0x{spi_in:08x}")),
        spi_out: Some(format!("0x{:08x}", spi_in + 1)),
        aead: None,
        established_at: None,
        bytes_in: 0,
        packets_in: pin,
        bytes_out: 0,
        packets_out: pout,
        replay_drops: 0,
        integrity_failures: 0,
    }
}

fn member(name: &str, n: u8, state: MemberState, heard_ms: u64, links: Vec<LinkRow>) -> MemberRow {
    MemberRow {
        name: name.into(),
        gossip_addr: format!("192.0.2.{n}:9340").parse().unwrap(),
        data_addrs: vec![ip(&format!("192.0.2.{n}"))],
        state,
        fingerprint: None,
        public_key: None,
        generation: 1,
        handshake_port: Some(9341),
        protocol: Some(1),
        last_heard_ms: heard_ms,
        is_self: false,
        links,
        identity_conflict: None,
        refused: None,
        cert_not_after: None,
    }
}

fn me() -> MemberRow {
    MemberRow {
        is_self: true,
        ..member("h1", 11, MemberState::Alive, 0, vec![])
    }
}

fn failed(checks: &[Check]) -> Vec<(String, Option<String>)> {
    checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| (c.name.clone(), c.peer.clone()))
        .collect()
}

#[test]
fn kernel_check_follows_the_probe_and_refuses_the_memory_datapath() {
    assert!(kernel(DatapathKind::Kernel, Ok("fine".into())).ok);
    let e = DatapathError::Unsupported {
        what: "kernel lacks ESP".into(),
        fix: "modprobe esp4".into(),
    };
    let c = kernel(DatapathKind::Kernel, Err(&e));
    assert!(!c.ok);
    assert_eq!(c.fix.as_deref(), Some("modprobe esp4"));
    let c = kernel(DatapathKind::Memory, Ok("unused".into()));
    assert!(!c.ok && c.fix.unwrap().contains("--datapath kernel"));
}

#[test]
fn config_check_names_the_bad_key() {
    let flags = AgentFlags {
        node_name: Some("n1".into()),
        listen: Some("192.0.2.1:9340".into()),
        ..Default::default()
    };
    let good = AgentConfig::merge(&flags, Default::default());
    let c = config("flags", &good);
    assert!(c.ok, "{c:?}");
    assert!(c.detail.contains("node n1"));
    let bad = AgentConfig::merge(
        &AgentFlags {
            handshake_port: Some(0),
            ..flags
        },
        Default::default(),
    );
    let c = config("flags", &bad);
    assert!(!c.ok);
    assert!(c.fix.unwrap().contains("--handshake-port"));
}

#[test]
fn agent_check_needs_an_answer_from_the_configured_node() {
    let c = agent("/run/x.sock", Err("connection refused"), None);
    assert!(
        !c.ok
            && c.detail.contains("/run/x.sock")
            && c.fix.unwrap().contains("systemctl start meshsec")
    );
    let status: Status = serde_json::from_value(serde_json::json!({
        "name": "h1", "version": "0", "public_key": "", "fingerprint": "", "signing_fingerprint": "",
        "generation": 1, "gossip_listen": "", "gossip_advertise": "", "data_addrs": [],
        "handshake_port": 9341, "protocol": 1, "uptime_secs": 5,
        "members": {"alive": 1, "suspect": 0, "dead": 0, "left": 0, "refused": 0},
        "gossip": GossipCounters::default().snapshot(), "records": crate::gossip::records::RecordCounters::default(),
        "datapath": "kernel", "esp_algorithm": "aes128-gcm",
        "handshake": crate::handshake::Counters::default(), "mesh": crate::mesh::MeshCounters::default()
    }))
    .unwrap();
    assert!(
        status.clock_offsets.is_empty(),
        "older agents' status still reads"
    );
    assert!(agent("s", Ok(&status), None).ok);
    let flags = AgentFlags {
        node_name: Some("other".into()),
        listen: Some("192.0.2.1:9340".into()),
        ..Default::default()
    };
    let cfg = AgentConfig::merge(&flags, Default::default()).unwrap();
    let c = agent("s", Ok(&status), Some(&cfg));
    assert!(!c.ok && c.detail.contains("other"));
}

#[test]
fn permissions_check_names_each_open_or_missing_file() {
    let open = [ReadableByOthers {
        path: PathBuf::from("/etc/meshsec/cluster.secret"),
        mode: 0o644,
    }];
    let c = permissions(3, &open, &["cluster secret /x is missing".into()]);
    assert_eq!(c.len(), 2);
    assert!(c.iter().all(|c| !c.ok));
    assert_eq!(
        c[1].fix.as_deref(),
        Some("chmod 600 /etc/meshsec/cluster.secret")
    );
    assert!(c[1].detail.contains("0644"));
    let c = permissions(3, &[], &[]);
    assert!(c.len() == 1 && c[0].ok && c[0].detail.starts_with("3 "));
}

#[test]
fn permissions_check_reads_real_file_modes() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("s");
    std::fs::write(&f, "x").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
    let found = crate::identity::readable_by_others([f.as_path()]);
    assert!(!permissions(1, &found, &[])[0].ok);
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    let found = crate::identity::readable_by_others([f.as_path()]);
    assert!(permissions(1, &found, &[])[0].ok);
}

/// A skewed clock, measured the way the transport does: a peer seals with
/// its own (fake, skewed) clock, the opener returns the authentic stamp,
/// the counters keep the offset per source address, doctor judges it.
#[test]
fn a_skewed_peer_clock_is_named_from_the_seal_timestamps() {
    let ring = Arc::new(Keyring::new([[9u8; 32]]).unwrap());
    let mut opener = Opener::new(ring.clone(), ReplayConfig::default());
    let counters = GossipCounters::default();
    let h2: SocketAddr = "192.0.2.12:9340".parse().unwrap();
    let h3: SocketAddr = "192.0.2.13:9340".parse().unwrap();
    let stranger: SocketAddr = "192.0.2.99:9340".parse().unwrap();
    // h2 runs 40 s ahead: still inside the 60 s window (its gossip opens),
    // but past half of it.
    let (stamp, opened) = opener.open_stamped(NOW, &ring.seal(NOW + 40_000, b"a"));
    assert!(opened.is_ok());
    counters.record_clock(h2, stamp.unwrap(), NOW);
    // h3 is 2 s behind: fine.
    let (stamp, _) = opener.open_stamped(NOW, &ring.seal(NOW - 2_000, b"b"));
    counters.record_clock(h3, stamp.unwrap(), NOW);
    // A node 90 s behind: every datagram refused as stale, so it never
    // becomes a member; doctor still names it by address.
    let (stamp, opened) = opener.open_stamped(NOW, &ring.seal(NOW - 90_000, b"c"));
    assert_eq!(opened, Err(crate::gossip::seal::OpenError::Stale));
    counters.record_clock(stranger, stamp.unwrap(), NOW);

    let offsets = counters.clock_offsets(NOW + 1_000);
    let members = [
        me(),
        member("h2", 12, MemberState::Alive, 100, vec![]),
        member("h3", 13, MemberState::Alive, 100, vec![]),
        member("h4", 14, MemberState::Alive, 100, vec![]),
    ];
    let c = clocks(&members, &offsets, ClockWindow::default());
    assert_eq!(
        failed(&c),
        vec![
            ("clock".into(), Some("h2".into())),
            ("clock".into(), Some("192.0.2.99:9340".into()))
        ]
    );
    let h2c = c.iter().find(|c| c.peer.as_deref() == Some("h2")).unwrap();
    assert!(h2c.detail.contains("40.0 s ahead of"), "{}", h2c.detail);
    assert!(h2c.fix.as_ref().unwrap().contains("NTP"));
    let h3c = c.iter().find(|c| c.peer.as_deref() == Some("h3")).unwrap();
    assert!(h3c.ok && h3c.detail.contains("-2000 ms"), "{}", h3c.detail);
    // h4 sent nothing measurable yet: not a clock failure.
    assert!(c.iter().any(|c| c.peer.as_deref() == Some("h4") && c.ok));
    // 29 s behind is within half the window; 30 s is not.
    let at = |off: i64| ClockOffset {
        addr: "192.0.2.12:9340".parse().unwrap(),
        offset_ms: off,
        age_ms: 0,
    };
    let m = [member("h2", 12, MemberState::Alive, 0, vec![])];
    assert!(clocks(&m, &[at(-29_000)], ClockWindow::default())[0].ok);
    assert!(!clocks(&m, &[at(-30_000)], ClockWindow::default())[0].ok);
    assert!(!clocks(&m, &[at(i64::MIN)], ClockWindow::default())[0].ok);
}

#[test]
fn gossip_check_names_silent_and_dead_peers_and_the_port() {
    let silent = Duration::from_secs(10);
    let members = [
        me(),
        member("h2", 12, MemberState::Alive, 400, vec![]),
        member("h3", 13, MemberState::Dead, 45_000, vec![]),
        member("h4", 14, MemberState::Alive, 12_000, vec![]),
        member("h5", 15, MemberState::Left, 99_000, vec![]),
        // Just joined: suspect until the failure detector has samples.
        member("h6", 16, MemberState::Suspect, 300, vec![]),
        member("h7", 17, MemberState::Suspect, 20_000, vec![]),
    ];
    let c = gossip(&members, &[], 9340, silent);
    assert_eq!(
        failed(&c),
        vec![
            ("gossip".into(), Some("h3".into())),
            ("gossip".into(), Some("h4".into())),
            ("gossip".into(), Some("h7".into()))
        ]
    );
    let h3 = c.iter().find(|c| c.peer.as_deref() == Some("h3")).unwrap();
    assert!(h3.detail.contains("dead") && h3.detail.contains("45 s"));
    assert!(h3.fix.as_ref().unwrap().contains("UDP port 9340"));
    assert_eq!(c.len(), 5, "a peer that left is not checked");
    // Alone with seeds: the seeds are unreachable; alone without: first node.
    let seeds = ["192.0.2.11:9340".parse().unwrap()];
    assert!(!gossip(&[me()], &seeds, 9340, silent)[0].ok);
    assert!(gossip(&[me()], &[], 9340, silent)[0].ok);
}

#[test]
fn handshake_check_fails_links_down_in_both_samples_only() {
    let est = |s| link("192.0.2.11", "192.0.2.12", s, 0x100, 0, 0);
    let before = [
        me(),
        member(
            "h2",
            12,
            MemberState::Alive,
            0,
            vec![est(LinkState::Established)],
        ),
        member(
            "h3",
            13,
            MemberState::Alive,
            0,
            vec![link(
                "192.0.2.11",
                "192.0.2.13",
                LinkState::Handshaking,
                1,
                0,
                0,
            )],
        ),
        member(
            "h4",
            14,
            MemberState::Alive,
            0,
            vec![link(
                "192.0.2.11",
                "192.0.2.14",
                LinkState::Established,
                1,
                0,
                0,
            )],
        ),
    ];
    let after = [
        me(),
        member(
            "h2",
            12,
            MemberState::Alive,
            0,
            vec![est(LinkState::Established)],
        ),
        member(
            "h3",
            13,
            MemberState::Alive,
            0,
            vec![link(
                "192.0.2.11",
                "192.0.2.13",
                LinkState::Handshaking,
                1,
                0,
                0,
            )],
        ),
        // Re-keying at the second sample: established in the first.
        member(
            "h4",
            14,
            MemberState::Alive,
            0,
            vec![link(
                "192.0.2.11",
                "192.0.2.14",
                LinkState::Handshaking,
                1,
                0,
                0,
            )],
        ),
        // Dead: the gossip check speaks for it.
        member(
            "h5",
            15,
            MemberState::Dead,
            0,
            vec![link("192.0.2.11", "192.0.2.15", LinkState::None, 1, 0, 0)],
        ),
    ];
    let c = handshake(&before, &after);
    assert_eq!(failed(&c), vec![("handshake".into(), Some("h3".into()))]);
    let h3 = c.iter().find(|c| !c.ok).unwrap();
    assert!(h3.detail.contains("192.0.2.11 -> 192.0.2.13 (handshaking)"));
    assert!(h3.fix.as_ref().unwrap().contains("UDP port 9341"));
    assert_eq!(c.len(), 3);
}

fn sample(peer: &str, remote: &str, spi: &str, pin: u64, pout: u64) -> EspSample {
    EspSample {
        peer: peer.into(),
        local: ip("192.0.2.11"),
        remote: ip(remote),
        spi_in: spi.into(),
        packets_in: pin,
        packets_out: pout,
    }
}

#[test]
fn esp_check_names_the_peer_whose_esp_does_not_arrive() {
    let before = [
        sample("h2", "192.0.2.12", "0x1", 10, 10),
        sample("h3", "192.0.2.13", "0x2", 50, 10),
        sample("h4", "192.0.2.14", "0x3", 5, 5),
        sample("h5", "192.0.2.15", "0x4", 5, 5),
    ];
    let after = [
        sample("h2", "192.0.2.12", "0x1", 13, 13),
        // Sent 3, received nothing (it did receive before: the filter is new).
        sample("h3", "192.0.2.13", "0x2", 50, 13),
        // Re-keyed during the interval: nothing to compare.
        sample("h4", "192.0.2.14", "0x9", 0, 3),
        // No traffic at all: no verdict against it.
        sample("h5", "192.0.2.15", "0x4", 5, 5),
    ];
    let c = esp(&before, &after, Duration::from_secs(3));
    assert_eq!(failed(&c), vec![("esp".into(), Some("h3".into()))]);
    let h3 = c.iter().find(|c| !c.ok).unwrap();
    assert!(
        h3.detail.contains("ESP (IP protocol 50) from h3"),
        "{}",
        h3.detail
    );
    assert!(h3
        .detail
        .contains("3 ESP packet(s) sent in 3 s, none received"));
    assert!(h3.fix.as_ref().unwrap().contains("IP protocol 50"));
    assert_eq!(c.len(), 3, "h4 re-keyed: skipped");
    // Counter wrap-around or a reset never underflows into a verdict.
    let c = esp(
        &[sample("h2", "192.0.2.12", "0x1", 9, 9)],
        &[sample("h2", "192.0.2.12", "0x1", 0, 0)],
        Duration::from_secs(3),
    );
    assert!(c[0].ok);
}

#[test]
fn esp_samples_come_from_the_kernel_sas_when_read() {
    let members = [
        me(),
        member(
            "h2",
            12,
            MemberState::Alive,
            0,
            vec![link(
                "192.0.2.11",
                "192.0.2.12",
                LinkState::Established,
                0x100,
                1,
                2,
            )],
        ),
        member(
            "h3",
            13,
            MemberState::Alive,
            0,
            vec![link(
                "192.0.2.11",
                "192.0.2.13",
                LinkState::Handshaking,
                0x200,
                0,
                0,
            )],
        ),
    ];
    let sa = |src: &str, dst: &str, spi: u32, packets: u64| SaState {
        src: ip(src),
        dst: ip(dst),
        spi,
        reqid: Reqid::DEFAULT,
        direction: None,
        aead: None,
        replay_window: 0,
        larval: false,
        lifetimes: Lifetimes::default(),
        counters: SaCounters {
            packets,
            ..Default::default()
        },
    };
    let sas = [
        sa("192.0.2.12", "192.0.2.11", 0x100, 70),
        sa("192.0.2.11", "192.0.2.12", 0x101, 80),
    ];
    let s = samples(&members, Some(&sas));
    assert_eq!(s, vec![sample("h2", "192.0.2.12", "0x00000100", 70, 80)]);
    // Without the kernel's view, the listing's counters.
    assert_eq!(
        samples(&members, None),
        vec![sample("h2", "192.0.2.12", "0x00000100", 1, 2)]
    );
    // An SA missing from the dump (just re-keyed): no sample, no verdict.
    assert!(samples(&members, Some(&sas[..1])).is_empty());
}

#[test]
fn mtu_check_reports_payload_and_refuses_too_small_links() {
    let d = |a: &str, mtu: Option<u32>| DataInterface {
        addr: ip(a),
        iface: mtu.map(|m| ("eth0".to_string(), m)),
    };
    let c = mtu(&[
        d("2001:db8::11", Some(1500)),
        d("2001:db8::12", Some(1300)),
        d("192.0.2.11", Some(600)),
        d("192.0.2.12", None),
        d("192.0.2.13", Some(1280)),
    ]);
    assert_eq!(
        c.iter().map(|c| c.ok).collect::<Vec<_>>(),
        vec![true, false, false, false, true]
    );
    assert!(c[0].detail.contains("1463 bytes left"), "{}", c[0].detail);
    assert!(c[1].fix.as_ref().unwrap().contains("mtu 1317"));
    assert!(c[3].detail.contains("on no interface"));
}

#[test]
fn policies_check_names_the_peer_a_foreign_policy_shadows() {
    let f = |dir, prio, src: &str, sl, dst: &str, dl| ForeignPolicy {
        index: 8,
        direction: dir,
        priority: prio,
        src: ip(src),
        src_len: sl,
        dst: ip(dst),
        dst_len: dl,
        proto: 0,
        block: false,
        templates: 0,
        marked: false,
    };
    let pairs: Vec<Pair> = vec![
        ("h2".into(), ip("192.0.2.11"), ip("192.0.2.12")),
        ("h3".into(), ip("2001:db8::11"), ip("2001:db8::13")),
    ];
    // strongSwan-like priorities (above meshsec's), other prefixes, other
    // family: nothing shadows.
    let harmless = [
        f(Direction::Out, 200_000, "0.0.0.0", 0, "0.0.0.0", 0),
        f(Direction::Out, 0, "10.0.0.0", 8, "0.0.0.0", 0),
        f(Direction::In, 0, "::", 0, "2001:db8::99", 128),
    ];
    let c = policies(&pairs, &harmless);
    assert!(
        c.len() == 1 && c[0].ok && c[0].detail.contains("3 foreign"),
        "{c:?}"
    );
    // An "allow in clear" inbound bypass of the whole /24 at priority 0.
    let bad = [f(Direction::In, 0, "192.0.2.0", 24, "0.0.0.0", 0)];
    let c = policies(&pairs, &bad);
    assert_eq!(failed(&c), vec![("policies".into(), Some("h2".into()))]);
    assert!(
        c[0].detail
            .contains("src 192.0.2.0/24 dst 0.0.0.0/0 dir in priority 0 index 8"),
        "{}",
        c[0].detail
    );
    assert!(c[0].fix.as_ref().unwrap().contains("above 28019"));
    // The same selector as an outbound one does not take in h2 -> us.
    let c = policies(
        &pairs,
        &[f(Direction::Out, 0, "192.0.2.12", 32, "192.0.2.11", 32)],
    );
    assert!(c[0].ok);
}

#[test]
fn report_renders_one_line_per_check_and_json_fields() {
    let r = Report::new(vec![
        Check::pass("kernel", "fine"),
        Check::fail("esp", "ESP from h3 is not arriving", "allow ESP").peer("h3"),
    ]);
    assert!(!r.ok);
    assert_eq!(
        r.render(),
        "✔ kernel: fine\n✘ esp h3: ESP from h3 is not arriving; fix: allow ESP\n"
    );
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["checks"][1]["peer"], "h3");
    assert_eq!(v["checks"][1]["fix"], "allow ESP");
    assert!(v["checks"][0].get("fix").is_none());
    assert!(Report::new(vec![Check::pass("a", "b")]).ok);
}

#[test]
fn icmp_checksum_matches_rfc1071() {
    // RFC 1071's example words sum to 0xddf2; the checksum is its complement.
    assert_eq!(
        inet_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
        !0xddf2
    );
    // A packet with its checksum filled in sums to zero; odd lengths pad.
    let mut p = vec![8, 0, 0, 0, 1, 2, 0, 1, b'x'];
    let c = inet_checksum(&p).to_be_bytes();
    p[2..4].copy_from_slice(&c);
    assert_eq!(inet_checksum(&p), 0);
}

#[test]
fn esp_offload_fails_naming_the_family_without_gso() {
    use crate::datapath::offload::{FamilyOffload, OffloadReport, OffloadState};
    use crate::datapath::AddressFamily;
    let fam = |family, state| FamilyOffload {
        family,
        state,
        failures: vec![],
    };
    let ok = esp_offload(&OffloadReport {
        families: vec![
            fam(AddressFamily::V4, OffloadState::Autoloaded),
            fam(AddressFamily::V6, OffloadState::Loaded),
        ],
    });
    assert!(ok.ok, "{}", ok.line());
    let bad = esp_offload(&OffloadReport {
        families: vec![
            fam(AddressFamily::V4, OffloadState::Loaded),
            fam(AddressFamily::V6, OffloadState::Absent),
        ],
    });
    assert!(!bad.ok);
    assert!(
        bad.detail.contains("without GSO offload for v6"),
        "{}",
        bad.line()
    );
    assert!(bad
        .fix
        .as_deref()
        .unwrap()
        .contains("modprobe esp4_offload esp6_offload"));
}

#[test]
fn certificate_check_fails_from_30_days_before_expiry_and_names_refused_records() {
    let mut status: Status = serde_json::from_value(serde_json::json!({
        "name": "h1", "version": "0", "public_key": "", "fingerprint": "", "signing_fingerprint": "",
        "generation": 1, "gossip_listen": "", "gossip_advertise": "", "data_addrs": [],
        "handshake_port": 9341, "protocol": 1, "uptime_secs": 5,
        "members": {"alive": 1, "suspect": 0, "dead": 0, "left": 0, "refused": 0},
        "gossip": GossipCounters::default().snapshot(), "records": crate::gossip::records::RecordCounters::default(),
        "datapath": "kernel", "esp_algorithm": "aes128-gcm",
        "handshake": crate::handshake::Counters::default(), "mesh": crate::mesh::MeshCounters::default()
    }))
    .unwrap();
    assert!(
        certificate(&status).is_empty(),
        "no certificate, nothing refused: no check"
    );
    let key = crate::identity::SigningKey::from_seed([2; 32]);
    let c = crate::cert::Certificate::issue(
        &crate::identity::SigningKey::from_seed([1; 32]),
        "h1",
        key.public(),
        vec!["10.0.0.0/8".parse().unwrap()],
        0,
        100 * 86_400,
    )
    .unwrap();
    for (now_day, ok, want) in [
        (10, true, "valid for 90"),
        (71, false, "expires in 29"),
        (100, false, "has expired"),
    ] {
        status.cert = Some(crate::control::CertStatus::new(&c, now_day * 86_400));
        let checks = certificate(&status);
        assert_eq!(checks.len(), 1);
        assert_eq!(checks[0].ok, ok, "{}", checks[0].detail);
        assert!(checks[0].detail.contains(want), "{}", checks[0].detail);
    }
    status.cert = None;
    let refusal = |name: &str, reason| crate::gossip::trust::TrustRefusal {
        name: name.into(),
        generation: 1,
        reason,
        signing_fingerprint: "aaaa:bbbb:cccc:dddd".into(),
    };
    status.trust_refusals.current = vec![
        refusal("h5", crate::cert::Refusal::AddressNotCovered),
        refusal("h4", crate::cert::Refusal::Blocklisted),
    ];
    let checks = certificate(&status);
    assert!(!checks[0].ok && checks[0].detail.contains("address_not_covered"));
    assert_eq!(checks[0].peer.as_deref(), Some("h5"));
    assert!(
        checks[1].ok && checks[1].detail.contains("evicted"),
        "an evicted host is not a failure"
    );
}
