//! The Prometheus endpoint (`--metrics-listen`): at each scrape the agent's
//! status snapshot (the same one `meshsec status` reads), its per-peer links
//! and the namespace's `/proc/net/xfrm_stat` are turned into the text
//! exposition format (0.0.4) by `prometheus-client`. Nothing is counted
//! twice: every value already exists in the agent; this module only names it.
//!
//! The HTTP side is a deliberately small responder: `GET /metrics` (and
//! `HEAD`), one request per connection, a bounded request head, timeouts
//! (for the request and for the answer) and a cap on concurrent connections. docs/metrics.md lists the families.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::control::{family_name, Status};
use crate::mesh::{BlockReason, LinkState, LinkStatus};

/// Where the kernel's XFRM error counters are (per network namespace).
pub const XFRM_STAT_PATH: &str = "/proc/net/xfrm_stat";

/// Peers that get per-peer series; further peers (by name order) are only
/// in the aggregates and counted in `meshsec_metrics_unlabelled_peers`, so a
/// huge or hostile membership cannot blow up the series count.
pub const MAX_LABELLED_PEERS: usize = 1024;

/// Longest request head read before answering 431.
const MAX_REQUEST_HEAD: usize = 8192;
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 16;
/// A client that has not sent its request head by then is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A client that has not taken its answer by then is dropped (one that
/// never reads would otherwise hold its connection slot for good).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

type Labels = Vec<(&'static str, String)>;

fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

/// Adds a counter family to `reg` with the given samples.
fn counters(
    reg: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) {
    let family = Family::<Labels, Counter>::default();
    for (l, v) in samples {
        family.get_or_create(&l).inc_by(v);
    }
    match unit {
        Some(u) => reg.register_with_unit(name, help, u, family),
        None => reg.register(name, help, family),
    }
}

/// Adds a gauge family to `reg` with the given samples.
fn gauges(
    reg: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    samples: impl IntoIterator<Item = (Labels, i64)>,
) {
    let family = Family::<Labels, Gauge>::default();
    for (l, v) in samples {
        family.get_or_create(&l).set(v);
    }
    match unit {
        Some(u) => reg.register_with_unit(name, help, u, family),
        None => reg.register(name, help, family),
    }
}

fn one(v: u64) -> Vec<(Labels, u64)> {
    vec![(Vec::new(), v)]
}

fn gauge_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn link_state_name(s: LinkState) -> &'static str {
    match s {
        LinkState::None => "none",
        LinkState::Handshaking => "handshaking",
        LinkState::Established => "established",
    }
}

fn block_reason_name(r: BlockReason) -> &'static str {
    match r {
        BlockReason::PeerUnreachable => "peer_unreachable",
        BlockReason::NoUsableRecord => "no_usable_record",
        BlockReason::Adopted => "adopted",
        BlockReason::Rebooted => "rebooted",
    }
}

/// Renders one scrape in the Prometheus text format (0.0.4).
///
/// `xfrm_stat` is the parsed `/proc/net/xfrm_stat` (see [`parse_xfrm_stat`]),
/// `None` when the file is absent (no XFRM in that kernel): then the family
/// is absent, not an error.
pub fn render(
    status: &Status,
    links: &BTreeMap<String, Vec<LinkStatus>>,
    xfrm_stat: Option<&[(String, u64)]>,
) -> String {
    let mut reg = Registry::with_prefix("meshsec");
    let s = status;

    gauges(
        &mut reg,
        "build_info",
        "meshsec build and protocol (always 1)",
        None,
        [(
            labels([
                ("version", &s.version),
                ("protocol", &s.protocol.to_string()),
                ("esp_algorithm", &s.esp_algorithm),
                ("datapath", &s.datapath),
            ]),
            1,
        )],
    );
    gauges(
        &mut reg,
        "uptime",
        "Time since the agent started",
        Some(Unit::Seconds),
        [(Vec::new(), gauge_i64(s.uptime_secs))],
    );

    // Membership, this node included.
    let m = &s.members;
    gauges(
        &mut reg,
        "members",
        "Members gossip lists, by state (this node included)",
        None,
        [
            ("alive", m.alive),
            ("suspect", m.suspect),
            ("dead", m.dead),
            ("left", m.left),
        ]
        .map(|(st, n)| (labels([("state", st)]), n as i64)),
    );
    gauges(
        &mut reg,
        "members_refused",
        "Nodes gossip knows whose name breaks the node-name rule (not listed, not linked)",
        None,
        [(Vec::new(), m.refused as i64)],
    );

    // Links: aggregates over every link, then per-peer series (bounded).
    let mut by_state: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for fam in ["ipv4", "ipv6"] {
        for st in ["none", "handshaking", "established"] {
            by_state.insert((st, fam), 0);
        }
    }
    for l in links.values().flatten() {
        *by_state
            .entry((link_state_name(l.state), family_name(l.family)))
            .or_default() += 1;
    }
    gauges(
        &mut reg,
        "links",
        "Links to peers, by state and address family",
        None,
        by_state
            .iter()
            .map(|((st, fam), n)| (labels([("state", st), ("family", fam)]), *n)),
    );
    let labelled: Vec<(&String, &LinkStatus)> = links
        .iter()
        .take(MAX_LABELLED_PEERS)
        .flat_map(|(peer, ls)| ls.iter().map(move |l| (peer, l)))
        .collect();
    gauges(
        &mut reg,
        "metrics_unlabelled_peers",
        "Peers left out of the per-peer series (beyond the cap)",
        None,
        [(
            Vec::new(),
            links.len().saturating_sub(MAX_LABELLED_PEERS) as i64,
        )],
    );
    let peer =
        |p: &String, l: &LinkStatus| labels([("peer", p), ("family", family_name(l.family))]);
    gauges(
        &mut reg,
        "link_up",
        "1 if the link's SAs and policies are installed, else 0",
        None,
        labelled
            .iter()
            .map(|(p, l)| (peer(p, l), i64::from(l.state == LinkState::Established))),
    );
    gauges(
        &mut reg,
        "link_established_timestamp",
        "Unix time the link's current SAs were installed",
        Some(Unit::Seconds),
        labelled
            .iter()
            .filter_map(|(p, l)| l.established_at.map(|t| (peer(p, l), gauge_i64(t)))),
    );
    let sa = |name: &str,
              help: &str,
              unit: Option<Unit>,
              f: fn(&LinkStatus) -> u64,
              reg: &mut Registry| {
        counters(
            reg,
            name,
            help,
            unit,
            labelled
                .iter()
                .filter(|(_, l)| l.state == LinkState::Established)
                .map(|(p, l)| (peer(p, l), f(l))),
        )
    };
    sa(
        "link_receive",
        "Bytes decrypted by the link's current inbound SA (resets at each re-key)",
        Some(Unit::Bytes),
        |l| l.inbound.bytes,
        &mut reg,
    );
    sa(
        "link_transmit",
        "Bytes encrypted by the link's current outbound SA (resets at each re-key)",
        Some(Unit::Bytes),
        |l| l.outbound.bytes,
        &mut reg,
    );
    sa(
        "link_receive_packets",
        "Packets decrypted by the link's current inbound SA (resets at each re-key)",
        None,
        |l| l.inbound.packets,
        &mut reg,
    );
    sa(
        "link_transmit_packets",
        "Packets encrypted by the link's current outbound SA (resets at each re-key)",
        None,
        |l| l.outbound.packets,
        &mut reg,
    );
    sa(
        "link_replay_drops",
        "Inbound packets the current SA's replay window dropped (resets at each re-key)",
        None,
        |l| u64::from(l.inbound.replay),
        &mut reg,
    );
    sa(
        "link_integrity_failures",
        "Inbound packets that failed the current SA's integrity check (resets at each re-key)",
        None,
        |l| u64::from(l.inbound.integrity_failed),
        &mut reg,
    );

    // Handshakes and re-keys.
    let mc = &s.mesh;
    let h = &s.handshake;
    counters(
        &mut reg,
        "handshakes",
        "Handshakes completed, by outcome",
        None,
        [
            ("established", mc.sessions_established),
            ("failed", mc.handshakes_failed),
        ]
        .map(|(o, n)| (labels([("outcome", o)]), n)),
    );
    counters(
        &mut reg,
        "handshake_datagrams",
        "Handshake datagrams, by direction",
        None,
        [("received", h.received), ("sent", h.sent)].map(|(d, n)| (labels([("direction", d)]), n)),
    );
    counters(
        &mut reg,
        "handshake_rejected_datagrams",
        "Handshake datagrams rejected, by reason",
        None,
        [
            ("bad_length", h.bad_len),
            ("bad_version", h.bad_version),
            ("bad_type", h.bad_type),
            ("bad_mac", h.bad_mac),
            ("decrypt_failed", h.decrypt_failed),
            ("bad_payload", h.bad_payload),
            ("unknown_peer", h.unknown_peer),
            ("replayed", h.replayed),
            ("stale_response", h.stale_response),
            ("algorithm_mismatch", h.alg_mismatch),
            ("rate_limited", h.rate_limited),
            ("peer_rate_limited", h.peer_rate_limited),
            ("cookie_sent", h.cookie_sent),
            ("bad_cookie", h.bad_cookie),
            ("collision", h.collision_dropped),
            ("spi_alloc_failed", h.spi_alloc_failed),
            ("install_failed", h.install_failed),
        ]
        .map(|(r, n)| (labels([("reason", r)]), n)),
    );
    counters(
        &mut reg,
        "handshake_timeouts",
        "Handshake initiations that timed out",
        None,
        one(h.timeouts),
    );
    counters(
        &mut reg,
        "handshake_retransmits",
        "Handshake initiations retransmitted",
        None,
        one(h.retransmits),
    );
    counters(
        &mut reg,
        "rekeys",
        "Re-keys started (time-based, limit-based or forced)",
        None,
        one(mc.rekeys_started),
    );
    counters(
        &mut reg,
        "kernel_sa_expires",
        "Expire notifications from the kernel for current SAs, by kind",
        None,
        [
            ("soft", mc.kernel_soft_expires),
            ("hard", mc.kernel_hard_expires),
        ]
        .map(|(k, n)| (labels([("kind", k)]), n)),
    );
    counters(
        &mut reg,
        "kernel_dumps",
        "Full reads of the kernel's XFRM tables (start, others' changes, lost events, failed changes, the periodic resync)",
        None,
        one(mc.kernel_dumps),
    );
    counters(
        &mut reg,
        "kernel_changes",
        "Kernel SA and policy changes, by result",
        None,
        [
            ("applied", mc.changes_applied),
            ("failed", mc.changes_failed),
        ]
        .map(|(r, n)| (labels([("result", r)]), n)),
    );
    counters(
        &mut reg,
        "sas_vanished",
        "Installed SAs found missing from the kernel (their links re-keyed)",
        None,
        one(mc.sas_vanished),
    );
    counters(
        &mut reg,
        "initiations_deferred",
        "Due handshake initiations held back a tick by the per-second cap",
        None,
        one(mc.initiations_deferred),
    );
    counters(
        &mut reg,
        "links_refused",
        "Links wanted but not made because the link cap was reached",
        None,
        one(mc.links_refused),
    );

    // Gossip.
    let g = &s.gossip;
    counters(
        &mut reg,
        "gossip_datagrams",
        "Sealed gossip datagrams sent, and received datagrams that opened",
        None,
        [
            ("sent", g.sealed_out_datagrams),
            ("received", g.opened_in_datagrams),
        ]
        .map(|(d, n)| (labels([("direction", d)]), n)),
    );
    counters(
        &mut reg,
        "gossip",
        "Bytes of gossip datagrams (UDP payload): sent, received and opened, received and dropped",
        Some(Unit::Bytes),
        [
            ("sent", g.sealed_out_bytes),
            ("received", g.opened_in_bytes),
            ("dropped", g.dropped_in_bytes),
        ]
        .map(|(d, n)| (labels([("direction", d)]), n)),
    );
    counters(
        &mut reg,
        "gossip_dropped_datagrams",
        "Gossip datagrams dropped, by reason",
        None,
        [
            ("too_short", g.dropped_too_short),
            ("bad_version", g.dropped_bad_version),
            ("unknown_key", g.dropped_unknown_key),
            ("bad_tag", g.dropped_bad_tag),
            ("stale", g.dropped_stale),
            ("replayed", g.dropped_replayed),
            ("future_full", g.dropped_future_full),
            ("oversize", g.dropped_oversize),
            ("unmapped", g.dropped_unmapped),
            ("loopback_overflow", g.loopback_drops),
            ("syn_state_too_large", g.dropped_syn_too_large),
            ("syn_malformed", g.dropped_syn_malformed),
            ("piece_malformed", g.dropped_piece_malformed),
            ("piece_duplicate", g.dropped_piece_duplicate),
            ("piece_inconsistent", g.dropped_piece_inconsistent),
            ("piece_too_large", g.dropped_piece_too_large),
        ]
        .map(|(r, n)| (labels([("reason", r)]), n)),
    );
    counters(
        &mut reg,
        "gossip_pieced_messages",
        "Gossip messages larger than one 1400-byte datagram: sent in pieces, reassembled, dropped incomplete at the timeout or to stay within bounds",
        None,
        [
            ("sent", g.pieced_out_messages),
            ("reassembled", g.pieced_in_reassembled),
            ("timed_out", g.pieced_in_timed_out),
            ("evicted", g.pieced_in_evicted),
        ]
        .map(|(o, n)| (labels([("outcome", o)]), n)),
    );
    gauges(
        &mut reg,
        "gossip_digest",
        "Size of this node's gossip digest as last measured; SYNs are refused past 64379 (docs/scale.md)",
        Some(Unit::Bytes),
        [(Vec::new(), gauge_i64(g.digest_bytes))],
    );
    counters(
        &mut reg,
        "gossip_socket_errors",
        "Errors on the gossip sockets, by operation",
        None,
        [("send", g.send_errors), ("receive", g.recv_errors)]
            .map(|(o, n)| (labels([("op", o)]), n)),
    );
    counters(
        &mut reg,
        "gossip_records_bad_signature",
        "Complete gossip records whose signature did not verify",
        None,
        one(s.records.records_bad_signature),
    );
    counters(
        &mut reg,
        "gossip_own_record_restored",
        "Times this node put back its own gossip record after a peer's delta for its id wrote over it",
        None,
        one(s.records.own_record_restored),
    );
    gauges(
        &mut reg,
        "gossip_records_incomplete",
        "Gossip records incomplete right now (signature not yet arrived)",
        None,
        [(Vec::new(), gauge_i64(s.records.records_incomplete))],
    );

    // Trust: what was refused, and what is held because of it.
    counters(
        &mut reg,
        "trust_refusals",
        "Refusals by the trust rules, by reason",
        None,
        [
            ("wrong_source", mc.refused_wrong_source),
            ("address_claim", mc.refused_claims),
            ("key_claim", mc.refused_key_claims),
            ("identity_conflict", s.identity_conflicts.total),
        ]
        .into_iter()
        .chain(crate::cert::Refusal::ALL.iter().map(|r| {
            (
                r.as_str(),
                s.trust_refusals
                    .totals
                    .get(r.as_str())
                    .copied()
                    .unwrap_or(0),
            )
        }))
        .map(|(r, n)| (labels([("reason", r)]), n)),
    );
    gauges(
        &mut reg,
        "trust_refused_records",
        "Records refused right now by the cluster CA or the blocklist",
        None,
        [(Vec::new(), s.trust_refusals.current.len() as i64)],
    );
    if let Some(c) = &s.cert {
        gauges(
            &mut reg,
            "cert_expiry",
            "Seconds until this node's certificate expires (negative: expired)",
            Some(Unit::Seconds),
            [(Vec::new(), c.expires_in_secs)],
        );
    }
    gauges(
        &mut reg,
        "identity_conflicts",
        "Names gossip carries right now under a signing identity other than the pinned one",
        None,
        [(Vec::new(), s.identity_conflicts.current.len() as i64)],
    );
    gauges(
        &mut reg,
        "address_conflicts",
        "Members' claims right now on addresses bound to another peer",
        None,
        [(Vec::new(), s.conflicts.len() as i64)],
    );
    let mut blocked: BTreeMap<&str, i64> = [
        BlockReason::PeerUnreachable,
        BlockReason::NoUsableRecord,
        BlockReason::Adopted,
        BlockReason::Rebooted,
    ]
    .into_iter()
    .map(|r| (block_reason_name(r), 0))
    .collect();
    for b in &s.blocked {
        *blocked.entry(block_reason_name(b.reason)).or_default() += 1;
    }
    gauges(
        &mut reg,
        "blocked_pairs",
        "Address pairs kept blocked (policies without SAs: the kernel drops), by reason",
        None,
        blocked
            .into_iter()
            .map(|(r, n)| (labels([("reason", r)]), n)),
    );
    gauges(
        &mut reg,
        "protected_ranges",
        "Strict mode's protected ranges (--protect)",
        None,
        [(Vec::new(), s.protect.ranges.len() as i64)],
    );
    gauges(
        &mut reg,
        "protect_policies",
        "Strict mode's range policies (blocks and the host's own exemptions) in the kernel at the last reconcile",
        None,
        [(Vec::new(), s.protect.policies as i64)],
    );
    gauges(
        &mut reg,
        "esp_offload",
        "1 when ESP GSO offload (esp4_offload/esp6_offload) was active for the family at start, else 0",
        None,
        s.esp_offload
            .iter()
            .map(|(family, state)| (labels([("family", family.as_str())]), i64::from(state.active()))),
    );

    if let Some(stat) = xfrm_stat {
        counters(
            &mut reg,
            "kernel_xfrm_errors",
            "The kernel's XFRM error counters (/proc/net/xfrm_stat) in the agent's network namespace",
            None,
            stat.iter()
                .map(|(name, v)| (labels([("counter", name)]), *v)),
        );
    }

    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_text::encode(&mut out, &reg);
    out
}

/// Parses `/proc/net/xfrm_stat`: one `XfrmName<spaces>value` per line.
/// Lines that do not look like that are skipped, never a panic; at most 128
/// counters are kept (the kernel has about 30).
pub fn parse_xfrm_stat(text: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(name), Some(value), None) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        let valid_name = name.len() <= 64
            && name.starts_with("Xfrm")
            && name.bytes().all(|c| c.is_ascii_alphanumeric());
        let Ok(value) = value.parse::<u64>() else {
            continue;
        };
        if valid_name && !out.iter().any(|(n, _)| n == name) {
            out.push((name.to_string(), value));
            if out.len() == 128 {
                break;
            }
        }
    }
    out
}

/// What a scrape reads.
#[derive(Clone)]
pub struct MetricsSource {
    /// Produces a fresh status (the one `meshsec status` shows).
    pub status: Arc<dyn Fn() -> Status + Send + Sync>,
    /// Links per peer name, from the mesh.
    pub links: watch::Receiver<Arc<BTreeMap<String, Vec<LinkStatus>>>>,
    /// `/proc/net/xfrm_stat`, or another file in tests.
    pub xfrm_stat: PathBuf,
}

impl MetricsSource {
    /// One scrape's body.
    pub fn scrape(&self) -> String {
        let status = (self.status)();
        let links = self.links.borrow().clone();
        let stat = std::fs::read_to_string(&self.xfrm_stat)
            .ok()
            .map(|t| parse_xfrm_stat(&t));
        render(&status, &links, stat.as_deref())
    }
}

/// Binding the metrics listener failed.
#[derive(Debug, thiserror::Error)]
#[error("--metrics-listen: cannot listen on {addr}: {error}")]
pub struct MetricsBindError {
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    pub error: std::io::Error,
}

/// Binds the metrics listener on exactly `addr`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsBindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|error| MetricsBindError { addr, error })
}

/// Serves scrapes until the shutdown fires.
pub async fn serve(
    listener: TcpListener,
    source: MetricsSource,
    mut shutdown: crate::shutdown::StopReceiver,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let slot = tokio::select! {
            _ = crate::shutdown::fired(&mut shutdown) => break,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        tokio::select! {
            _ = crate::shutdown::fired(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let source = source.clone();
                    tasks.spawn(async move {
                        if let Err(e) = handle(stream, &source).await {
                            tracing::debug!(error = %e, "metrics connection ended");
                        }
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    tasks.shutdown().await;
}

async fn handle(mut stream: TcpStream, source: &MetricsSource) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let complete = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        loop {
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() >= MAX_REQUEST_HEAD {
                return Ok(false);
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            head.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let response = if complete {
        respond(&head, || source.scrape())
    } else {
        Response::text(
            431,
            "Request Header Fields Too Large",
            "request head too large\n",
        )
    };
    tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&response.to_bytes()).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// An HTTP response, before serialisation.
#[derive(Debug, PartialEq)]
pub struct Response {
    /// Status code.
    pub code: u16,
    /// Reason phrase.
    pub reason: &'static str,
    /// Content type.
    pub content_type: &'static str,
    /// Extra header lines (without CRLF).
    pub extra: Vec<String>,
    /// Body (empty for HEAD, but Content-Length is the GET one's).
    pub body: String,
    /// Whether the body is sent (false for HEAD).
    pub send_body: bool,
}

impl Response {
    fn text(code: u16, reason: &'static str, body: &str) -> Response {
        Response {
            code,
            reason,
            content_type: "text/plain; charset=utf-8",
            extra: Vec::new(),
            body: body.to_string(),
            send_body: true,
        }
    }

    /// The bytes on the wire (`Connection: close`: one request per connection).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.code,
            self.reason,
            self.content_type,
            self.body.len()
        );
        for h in &self.extra {
            out.push_str(h);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        if self.send_body {
            out.push_str(&self.body);
        }
        out.into_bytes()
    }
}

/// Answers a request head: `GET`/`HEAD /metrics` gets `scrape()`.
pub fn respond(head: &[u8], scrape: impl FnOnce() -> String) -> Response {
    let line = head
        .split(|&b| b == b'\n')
        .next()
        .and_then(|l| std::str::from_utf8(l).ok())
        .map(|l| l.trim_end_matches('\r'))
        .unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::text(400, "Bad Request", "bad request line\n");
    };
    if !version.starts_with("HTTP/1.") {
        return Response::text(400, "Bad Request", "HTTP/1.x only\n");
    }
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let mut r = Response::text(405, "Method Not Allowed", "GET or HEAD only\n");
        r.extra.push("Allow: GET, HEAD".into());
        return r;
    }
    let mut r = match path {
        "/metrics" => Response {
            code: 200,
            reason: "OK",
            content_type: prometheus_text::CONTENT_TYPE,
            extra: Vec::new(),
            body: scrape(),
            send_body: true,
        },
        "/" => Response::text(200, "OK", "meshsec: metrics at /metrics\n"),
        _ => Response::text(404, "Not Found", "not found; metrics at /metrics\n"),
    };
    r.send_body = !head_only;
    r
}

#[cfg(test)]
mod tests;
