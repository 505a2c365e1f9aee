use super::*;
use crate::control::{BlockedRow, MemberCounts};
use crate::datapath::{AddressFamily, SaCounters};
use crate::gossip::pins::{Conflicts, IdentityConflict};

fn status() -> Status {
    let mut s = Status {
        name: "h1".into(),
        version: "9.8.7".into(),
        public_key: String::new(),
        fingerprint: String::new(),
        signing_fingerprint: String::new(),
        generation: 1,
        gossip_listen: "192.0.2.11:9340".into(),
        gossip_advertise: "192.0.2.11:9340".into(),
        data_addrs: vec![],
        handshake_port: 9341,
        protocol: 3,
        uptime_secs: 42,
        members: MemberCounts {
            alive: 4,
            suspect: 1,
            dead: 2,
            left: 0,
            refused: 5,
        },
        gossip: Default::default(),
        records: Default::default(),
        esp_offload: [
            (
                "v4".to_string(),
                crate::datapath::offload::OffloadState::Autoloaded,
            ),
            (
                "v6".to_string(),
                crate::datapath::offload::OffloadState::Absent,
            ),
        ]
        .into(),
        datapath: "kernel".into(),
        esp_algorithm: "aes128-gcm".into(),
        handshake: Default::default(),
        mesh: Default::default(),
        blocked: vec![BlockedRow {
            local: "192.0.2.11".parse().unwrap(),
            remote: "192.0.2.14".parse().unwrap(),
            peer: Some("h4".into()),
            fingerprint: None,
            reason: BlockReason::PeerUnreachable,
            since_secs: 3,
        }],
        conflicts: vec![],
        identity_conflicts: Conflicts {
            current: vec![IdentityConflict {
                name: "h9".into(),
                pinned: "a".into(),
                offered: "b".into(),
                generation: 1,
            }],
            total: 11,
        },
        clock_offsets: vec![],
        protect: Default::default(),
        cert: Some(crate::control::CertStatus {
            info: crate::cert::CertInfo {
                fingerprint: "c".into(),
                ca_key_id: "k".into(),
                ranges: vec![],
                not_before: 0,
                not_after: 1,
            },
            expires_in_secs: 86_400,
            expiring: true,
        }),
        cas: vec!["k".into()],
        blocklisted: 1,
        trust_refusals: crate::gossip::trust::TrustReport {
            current: vec![],
            totals: [
                ("blocklisted".to_string(), 3),
                ("cert_expired".to_string(), 2),
            ]
            .into(),
            certs: Default::default(),
        },
    };
    s.gossip.dropped_bad_tag = 13;
    s.gossip.sealed_out_datagrams = 100;
    s.gossip.loopback_drops = 2;
    s.gossip.dropped_syn_too_large = 41;
    s.gossip.digest_bytes = 40_000;
    s.gossip.pieced_in_timed_out = 43;
    s.gossip.dropped_piece_duplicate = 47;
    s.handshake.bad_mac = 17;
    s.handshake.timeouts = 4;
    s.mesh.sessions_established = 6;
    s.mesh.handshakes_failed = 1;
    s.mesh.rekeys_started = 19;
    s.mesh.refused_wrong_source = 23;
    s.mesh.refused_claims = 29;
    s.mesh.refused_key_claims = 31;
    s.records.records_bad_signature = 37;
    s.records.own_record_restored = 4;
    s
}

fn link(family: AddressFamily, state: LinkState, n: u64) -> LinkStatus {
    let (local, remote) = match family {
        AddressFamily::V4 => ("192.0.2.11", "192.0.2.12"),
        AddressFamily::V6 => ("2001:db8::11", "2001:db8::12"),
    };
    LinkStatus {
        family,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        state,
        spi_in: None,
        spi_out: None,
        aead: None,
        established_at: (state == LinkState::Established).then_some(1_700_000_000),
        inbound: SaCounters {
            bytes: 1000 * n,
            packets: 10 * n,
            replay: 2,
            integrity_failed: 7,
        },
        outbound: SaCounters {
            bytes: 2000 * n,
            packets: 20 * n,
            replay: 0,
            integrity_failed: 0,
        },
    }
}

fn links() -> BTreeMap<String, Vec<LinkStatus>> {
    let mut m = BTreeMap::new();
    m.insert(
        "h2".to_string(),
        vec![
            link(AddressFamily::V4, LinkState::Established, 1),
            link(AddressFamily::V6, LinkState::Established, 3),
        ],
    );
    m.insert(
        "h3".to_string(),
        vec![link(AddressFamily::V4, LinkState::Handshaking, 5)],
    );
    m
}

/// The exposition's sample lines, `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("sample line has a value");
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn exposition_has_the_expected_families_labels_and_values() {
    let stat = vec![
        ("XfrmInError".to_string(), 0),
        ("XfrmInStateProtoError".to_string(), 9),
    ];
    let text = render(&status(), &links(), Some(&stat));
    let s = samples(&text);
    let get = |k: &str| {
        s.get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no sample {k} in:\n{text}"))
    };
    assert_eq!(
        get(
            r#"meshsec_build_info{version="9.8.7",protocol="3",esp_algorithm="aes128-gcm",datapath="kernel"}"#
        ),
        "1"
    );
    assert_eq!(get("meshsec_uptime_seconds"), "42");
    assert_eq!(get(r#"meshsec_members{state="alive"}"#), "4");
    assert_eq!(get(r#"meshsec_members{state="suspect"}"#), "1");
    assert_eq!(get(r#"meshsec_members{state="dead"}"#), "2");
    assert_eq!(get(r#"meshsec_members{state="left"}"#), "0");
    assert_eq!(get("meshsec_members_refused"), "5");
    assert_eq!(
        get(r#"meshsec_links{state="established",family="ipv4"}"#),
        "1"
    );
    assert_eq!(
        get(r#"meshsec_links{state="established",family="ipv6"}"#),
        "1"
    );
    assert_eq!(
        get(r#"meshsec_links{state="handshaking",family="ipv4"}"#),
        "1"
    );
    assert_eq!(get(r#"meshsec_links{state="none",family="ipv6"}"#), "0");
    assert_eq!(get(r#"meshsec_link_up{peer="h2",family="ipv6"}"#), "1");
    assert_eq!(get(r#"meshsec_link_up{peer="h3",family="ipv4"}"#), "0");
    assert_eq!(
        get(r#"meshsec_link_established_timestamp_seconds{peer="h2",family="ipv4"}"#),
        "1700000000"
    );
    assert_eq!(
        get(r#"meshsec_link_receive_bytes_total{peer="h2",family="ipv6"}"#),
        "3000"
    );
    assert_eq!(
        get(r#"meshsec_link_transmit_bytes_total{peer="h2",family="ipv6"}"#),
        "6000"
    );
    assert_eq!(
        get(r#"meshsec_link_receive_packets_total{peer="h2",family="ipv4"}"#),
        "10"
    );
    assert_eq!(
        get(r#"meshsec_link_transmit_packets_total{peer="h2",family="ipv4"}"#),
        "20"
    );
    assert_eq!(
        get(r#"meshsec_link_replay_drops_total{peer="h2",family="ipv4"}"#),
        "2"
    );
    assert_eq!(
        get(r#"meshsec_link_integrity_failures_total{peer="h2",family="ipv4"}"#),
        "7"
    );
    // A link without SAs has no SA counters (its old ones would be stale).
    assert!(!s.contains_key(r#"meshsec_link_receive_bytes_total{peer="h3",family="ipv4"}"#));
    assert_eq!(
        get(r#"meshsec_handshakes_total{outcome="established"}"#),
        "6"
    );
    assert_eq!(get(r#"meshsec_handshakes_total{outcome="failed"}"#), "1");
    assert_eq!(
        get(r#"meshsec_handshake_rejected_datagrams_total{reason="bad_mac"}"#),
        "17"
    );
    assert_eq!(get("meshsec_handshake_timeouts_total"), "4");
    assert_eq!(get("meshsec_rekeys_total"), "19");
    assert_eq!(
        get(r#"meshsec_gossip_datagrams_total{direction="sent"}"#),
        "100"
    );
    assert_eq!(
        get(r#"meshsec_gossip_dropped_datagrams_total{reason="bad_tag"}"#),
        "13"
    );
    assert_eq!(
        get(r#"meshsec_gossip_dropped_datagrams_total{reason="loopback_overflow"}"#),
        "2"
    );
    assert_eq!(
        get(r#"meshsec_gossip_dropped_datagrams_total{reason="syn_state_too_large"}"#),
        "41"
    );
    assert_eq!(get("meshsec_gossip_digest_bytes"), "40000");
    assert_eq!(
        get(r#"meshsec_gossip_pieced_messages_total{outcome="timed_out"}"#),
        "43"
    );
    assert_eq!(
        get(r#"meshsec_gossip_dropped_datagrams_total{reason="piece_duplicate"}"#),
        "47"
    );
    assert_eq!(get("meshsec_gossip_records_bad_signature_total"), "37");
    assert_eq!(get("meshsec_gossip_own_record_restored_total"), "4");
    assert_eq!(get(r#"meshsec_esp_offload{family="v4"}"#), "1");
    assert_eq!(get(r#"meshsec_esp_offload{family="v6"}"#), "0");
    assert_eq!(
        get(r#"meshsec_trust_refusals_total{reason="wrong_source"}"#),
        "23"
    );
    assert_eq!(
        get(r#"meshsec_trust_refusals_total{reason="address_claim"}"#),
        "29"
    );
    assert_eq!(
        get(r#"meshsec_trust_refusals_total{reason="key_claim"}"#),
        "31"
    );
    assert_eq!(
        get(r#"meshsec_trust_refusals_total{reason="identity_conflict"}"#),
        "11"
    );
    assert_eq!(get("meshsec_identity_conflicts"), "1");
    assert_eq!(
        get(r#"meshsec_trust_refusals_total{reason="blocklisted"}"#),
        "3"
    );
    assert_eq!(
        get(r#"meshsec_trust_refusals_total{reason="cert_expired"}"#),
        "2"
    );
    assert_eq!(
        get(r#"meshsec_trust_refusals_total{reason="unknown_ca"}"#),
        "0"
    );
    assert_eq!(get("meshsec_trust_refused_records"), "0");
    assert_eq!(get("meshsec_cert_expiry_seconds"), "86400");
    assert_eq!(
        get(r#"meshsec_blocked_pairs{reason="peer_unreachable"}"#),
        "1"
    );
    assert_eq!(get(r#"meshsec_blocked_pairs{reason="adopted"}"#), "0");
    assert_eq!(
        get(r#"meshsec_kernel_xfrm_errors_total{counter="XfrmInStateProtoError"}"#),
        "9"
    );
    assert_eq!(get("meshsec_metrics_unlabelled_peers"), "0");
    // Types and help text are there, counters typed as counters.
    assert!(
        text.contains("# TYPE meshsec_link_integrity_failures_total counter\n"),
        "{text}"
    );
    assert!(text.contains("# TYPE meshsec_members gauge\n"), "{text}");
    assert!(text.contains("# HELP meshsec_rekeys_total "), "{text}");
    // Every sample is a meshsec_ name.
    assert!(s.keys().all(|k| k.starts_with("meshsec_")), "{text}");
}

#[test]
fn absent_xfrm_stat_means_no_family_and_no_error() {
    let text = render(&status(), &BTreeMap::new(), None);
    assert!(!text.contains("meshsec_kernel_xfrm_errors"), "{text}");
    let s = samples(&text);
    assert_eq!(
        s[r#"meshsec_links{state="established",family="ipv4"}"#],
        "0"
    );
    assert!(
        !s.keys().any(|k| k.starts_with("meshsec_link_up")),
        "{text}"
    );
}

#[test]
fn hostile_peer_names_are_escaped_and_peers_are_capped() {
    let mut m = BTreeMap::new();
    m.insert(
        "evil\"} 1\nmeshsec_x{a=\"\\".to_string(),
        vec![link(AddressFamily::V4, LinkState::Established, 1)],
    );
    let text = render(&status(), &m, None);
    assert!(
        text.contains(r#"meshsec_link_up{peer="evil\"} 1\nmeshsec_x{a=\"\\",family="ipv4"} 1"#),
        "{text}"
    );
    assert!(!text.lines().any(|l| l.starts_with("meshsec_x")), "{text}");

    let many: BTreeMap<String, Vec<LinkStatus>> = (0..MAX_LABELLED_PEERS + 6)
        .map(|i| {
            (
                format!("p{i:05}"),
                vec![link(AddressFamily::V4, LinkState::Established, 1)],
            )
        })
        .collect();
    let text = render(&status(), &many, None);
    let s = samples(&text);
    assert_eq!(s["meshsec_metrics_unlabelled_peers"], "6");
    assert_eq!(
        s.keys()
            .filter(|k| k.starts_with("meshsec_link_up{"))
            .count(),
        MAX_LABELLED_PEERS
    );
    // The aggregates still count every link.
    assert_eq!(
        s[r#"meshsec_links{state="established",family="ipv4"}"#],
        (MAX_LABELLED_PEERS + 6).to_string()
    );
}

#[test]
fn xfrm_stat_parser_keeps_counters_and_skips_junk() {
    let text = "XfrmInError             \t0\nXfrmInStateProtoError   12\n\
                garbage\nXfrmOutNoStates x\nXfrmTooMany 1 2\nNotXfrm 3\n\
                XfrmInError 99\nXfrmFwdHdrError 18446744073709551615\n\u{feff}\u{0}\n";
    assert_eq!(
        parse_xfrm_stat(text),
        vec![
            ("XfrmInError".to_string(), 0),
            ("XfrmInStateProtoError".to_string(), 12),
            ("XfrmFwdHdrError".to_string(), u64::MAX),
        ]
    );
    assert!(parse_xfrm_stat("").is_empty());
    let huge: String = (0..1000).map(|i| format!("Xfrm{i} {i}\n")).collect();
    assert_eq!(parse_xfrm_stat(&huge).len(), 128);
}

#[test]
fn the_real_xfrm_stat_parses_when_present() {
    // Present on kernels with XFRM; then every line is a counter.
    if let Ok(text) = std::fs::read_to_string(XFRM_STAT_PATH) {
        assert_eq!(parse_xfrm_stat(&text).len(), text.lines().count(), "{text}");
    }
}

#[test]
fn requests_get_the_right_answers() {
    let ok = respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", || {
        "m 1\n".into()
    });
    assert_eq!((ok.code, ok.body.as_str()), (200, "m 1\n"));
    assert_eq!(ok.content_type, "text/plain; version=0.0.4; charset=utf-8");
    let q = respond(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", || "m 1\n".into());
    assert_eq!(q.code, 200);
    let head = respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", || "m 1\n".into());
    assert_eq!(head.code, 200);
    let wire = String::from_utf8(head.to_bytes()).unwrap();
    assert!(
        wire.contains("Content-Length: 4\r\n") && wire.ends_with("\r\n\r\n"),
        "{wire}"
    );
    let scraped = std::cell::Cell::new(false);
    let post = respond(b"POST /metrics HTTP/1.1\r\n\r\n", || {
        scraped.set(true);
        String::new()
    });
    assert_eq!(post.code, 405);
    assert!(!scraped.get(), "a refused request must not scrape");
    assert_eq!(
        respond(b"GET /other HTTP/1.1\r\n\r\n", String::new).code,
        404
    );
    assert_eq!(respond(b"GET / HTTP/1.1\r\n\r\n", String::new).code, 200);
    for bad in [
        &b"\xff\xfe\r\n\r\n"[..],
        b"GET /metrics\r\n\r\n",
        b"GET  /metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics SPDY/3\r\n\r\n",
        b"\r\n\r\n",
    ] {
        assert_eq!(respond(bad, String::new).code, 400, "{bad:?}");
    }
}

#[tokio::test]
async fn serves_scrapes_on_the_bound_address_until_shutdown() {
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_links_tx, links_rx) = watch::channel(Arc::new(links()));
    let dir = tempfile::tempdir().unwrap();
    let stat = dir.path().join("xfrm_stat");
    std::fs::write(&stat, "XfrmInStateProtoError 5\n").unwrap();
    let source = MetricsSource {
        status: Arc::new(status),
        links: links_rx,
        xfrm_stat: stat,
    };
    let (stop_tx, stop_rx) = crate::shutdown::channel();
    let server = tokio::spawn(serve(listener, source, stop_rx));

    async fn get(addr: SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
    let reply = get(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    let (_, body) = reply.split_once("\r\n\r\n").unwrap();
    assert!(
        body.contains(r#"meshsec_link_integrity_failures_total{peer="h2",family="ipv4"} 7"#),
        "{body}"
    );
    assert!(
        body.contains(r#"meshsec_kernel_xfrm_errors_total{counter="XfrmInStateProtoError"} 5"#),
        "{body}"
    );
    // A head that never ends is cut off at the limit, not buffered forever.
    let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
    big.extend(std::iter::repeat_n(b'a', MAX_REQUEST_HEAD + 10));
    assert!(get(addr, &big).await.starts_with("HTTP/1.1 431 "));
    // A client that connects and says nothing does not block the next one.
    let _idle = TcpStream::connect(addr).await.unwrap();
    assert!(get(addr, b"GET / HTTP/1.1\r\n\r\n")
        .await
        .starts_with("HTTP/1.1 200 "));

    stop_tx.send_replace(Some(crate::shutdown::Stop::Stop));
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server stops on shutdown")
        .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still listening after shutdown"
    );
}

#[tokio::test]
async fn binding_a_used_address_names_the_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let err = bind(taken.local_addr().unwrap()).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("--metrics-listen: cannot listen on 127.0.0.1:"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
}

/// Links to `n` peers, two each: a scrape of about a megabyte.
fn many_links(n: usize) -> BTreeMap<String, Vec<LinkStatus>> {
    (0..n)
        .map(|i| {
            (
                format!("peer-with-a-rather-long-name-{i:05}"),
                vec![
                    link(AddressFamily::V4, LinkState::Established, i as u64),
                    link(AddressFamily::V6, LinkState::Established, i as u64),
                ],
            )
        })
        .collect()
}

#[tokio::test]
async fn clients_that_never_read_their_answer_do_not_hold_the_slots() {
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_links_tx, links_rx) = watch::channel(Arc::new(many_links(MAX_LABELLED_PEERS)));
    let source = MetricsSource {
        status: Arc::new(status),
        links: links_rx,
        xfrm_stat: "/nonexistent".into(),
    };
    let body_len = source.scrape().len();
    assert!(body_len > 1_000_000, "{body_len}");
    let (stop_tx, stop_rx) = crate::shutdown::channel();
    let server = tokio::spawn(serve(listener, source, stop_rx));
    // Every slot: a full request, then never a byte read (tiny receive window).
    let mut stuck = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        // A small segment size, as over a real network: the server's send
        // buffer then stays small (on loopback it would grow to megabytes).
        let mss: libc::c_int = 536;
        // SAFETY: a valid socket descriptor and a c_int option value.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::IPPROTO_TCP,
                libc::TCP_MAXSEG,
                (&mss as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "TCP_MAXSEG: {}", std::io::Error::last_os_error());
        let mut s = sock.connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
        stuck.push(s);
    }
    let answered = tokio::time::timeout(REQUEST_TIMEOUT + WRITE_TIMEOUT * 2, async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    })
    .await;
    assert!(
        answered.is_ok_and(|r| r.starts_with("HTTP/1.1 200 ")),
        "{} clients that never read their answer kept the next one out",
        MAX_CONNECTIONS
    );
    stop_tx.send_replace(Some(crate::shutdown::Stop::Stop));
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server stops on shutdown")
        .unwrap();
}
