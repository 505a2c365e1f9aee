//! `meshsec doctor`: one verdict per check, each failure naming the peer and
//! the fix.
//!
//! The checks are pure functions of what was gathered (the agent's status and
//! listing, kernel SA counters sampled twice, foreign XFRM policies, interface
//! MTUs, file modes); [`gather`] does the I/O around them and renders the
//! result. docs/operators.md lists every check, what a ✘ means and the fix.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{AgentConfig, ConfigError, DatapathKind};
use crate::control::{MemberRow, Status};
use crate::datapath::{DatapathError, Direction, ForeignPolicy, POLICY_PRIORITY};
use crate::gossip::members::MemberState;
use crate::gossip::transport::ClockOffset;
use crate::identity::ReadableByOthers;
use crate::mesh::LinkState;

pub mod gather;
#[cfg(test)]
mod tests;

/// Largest ESP transport-mode overhead of meshsec's AEADs (AES-GCM and
/// ChaCha20-Poly1305, RFC 4106/7634): SPI and sequence number 8, IV 8,
/// ICV 16, pad length and next header 2, padding to 4 bytes at most 3.
pub const ESP_OVERHEAD_MAX: u32 = 8 + 8 + 16 + 2 + 3;

/// Smallest MTU IPv6 guarantees to upper layers (RFC 8200).
pub const IPV6_MIN_MTU: u32 = 1280;
/// Smallest datagram every IPv4 host must accept (RFC 791).
pub const IPV4_MIN_MTU: u32 = 576;

/// One verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Which check: kernel, config, agent, permissions, clock, gossip,
    /// handshake, esp, mtu, policies.
    pub name: String,
    /// Passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do, for a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// The peer (node name, or address when no member matches) it is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

impl Check {
    /// A passed check.
    pub fn pass(name: &str, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            ok: true,
            detail: detail.into(),
            fix: None,
            peer: None,
        }
    }

    /// A failed check and its fix.
    pub fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
            peer: None,
        }
    }

    /// The same, about `peer`.
    pub fn peer(mut self, peer: impl Into<String>) -> Check {
        self.peer = Some(peer.into());
        self
    }

    /// One line: `✔ name [peer]: detail` or `✘ name [peer]: detail; fix: …`.
    pub fn line(&self) -> String {
        let mark = if self.ok { '✔' } else { '✘' };
        let peer = self
            .peer
            .as_deref()
            .map(|p| format!(" {p}"))
            .unwrap_or_default();
        let fix = self
            .fix
            .as_deref()
            .map(|f| format!("; fix: {f}"))
            .unwrap_or_default();
        format!("{mark} {}{peer}: {}{fix}", self.name, self.detail)
    }
}

/// The whole report (`--json` prints it as one object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Every check passed.
    pub ok: bool,
    /// The checks, in the order they ran.
    pub checks: Vec<Check>,
}

impl Report {
    /// A report over `checks`.
    pub fn new(checks: Vec<Check>) -> Report {
        Report {
            ok: checks.iter().all(|c| c.ok),
            checks,
        }
    }

    /// The text form: one line per check.
    pub fn render(&self) -> String {
        self.checks.iter().map(|c| c.line() + "\n").collect()
    }
}

/// Kernel support: the agent's own start-up probe, or the memory datapath.
pub fn kernel(kind: DatapathKind, probe: Result<String, &DatapathError>) -> Check {
    match (kind, probe) {
        (DatapathKind::Memory, _) => Check::fail(
            "kernel",
            "the agent is configured with --datapath memory: nothing is installed in the kernel, no traffic is protected",
            "run the agent with --datapath kernel (the default)",
        ),
        (DatapathKind::Kernel, Ok(what)) => Check::pass("kernel", what),
        (DatapathKind::Kernel, Err(DatapathError::Unsupported { what, fix })) => {
            Check::fail("kernel", what.clone(), fix.clone())
        }
        (DatapathKind::Kernel, Err(e)) => Check::fail(
            "kernel",
            format!("the XFRM probe failed: {e}"),
            "run meshsec doctor as root (CAP_NET_ADMIN), as the agent runs",
        ),
    }
}

/// ESP GSO offload (esp4_offload/esp6_offload), as the probe left it:
/// without it ESP runs at about half its single-stream speed.
pub fn esp_offload(report: &crate::datapath::offload::OffloadReport) -> Check {
    let absent: Vec<&str> = report
        .families
        .iter()
        .filter(|f| !f.state.active())
        .map(|f| crate::datapath::offload::family_key(f.family))
        .collect();
    let each = report
        .families
        .iter()
        .map(|f| {
            format!(
                "{} {}",
                crate::datapath::offload::family_key(f.family),
                f.state
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    if absent.is_empty() {
        Check::pass("esp_offload", format!("ESP GSO offload: {each}"))
    } else {
        Check::fail(
            "esp_offload",
            format!("ESP runs without GSO offload for {} (about half the single-stream speed): {each}", absent.join(" and ")),
            "run `modprobe esp4_offload esp6_offload` as root, or list them in /etc/modules-load.d/meshsec.conf; SAs made before the module is loaded keep running without it (meshsec rekey)",
        )
    }
}

/// The configuration the agent would start with.
pub fn config(source: &str, cfg: &Result<AgentConfig, ConfigError>) -> Check {
    match cfg {
        Ok(c) => Check::pass(
            "config",
            format!(
                "{source}: valid (node {}, gossip {}, handshake udp/{}, data {})",
                c.node_name,
                c.advertise,
                c.handshake_port,
                join(&c.data_addresses)
            ),
        ),
        Err(e) => Check::fail(
            "config",
            format!("{source}: {e}"),
            format!(
                "correct {} (the agent refuses to start with it; give doctor the agent's --config and flags)",
                e.key
            ),
        ),
    }
}

fn join<T: std::fmt::Display>(v: &[T]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The agent answers on its control socket, and is the node the config names.
pub fn agent(socket: &str, status: Result<&Status, &str>, cfg: Option<&AgentConfig>) -> Check {
    match status {
        Err(e) => Check::fail(
            "agent",
            format!("no agent answers at {socket}: {e}"),
            "start it (systemctl start meshsec; journalctl -u meshsec says why it stopped), or give doctor its --control-socket",
        ),
        Ok(s) => match cfg {
            Some(c) if c.node_name != s.name => Check::fail(
                "agent",
                format!(
                    "the agent at {socket} is node {}, the config doctor read names {}",
                    s.name, c.node_name
                ),
                "give doctor the agent's own --config and flags",
            ),
            _ => Check::pass(
                "agent",
                format!(
                    "node {} answers at {socket}: version {}, up {} s, datapath {} ({}), {} member(s) alive",
                    s.name, s.version, s.uptime_secs, s.datapath, s.esp_algorithm, s.members.alive
                ),
            ),
        },
    }
}

/// The agent's own certificate (with `--cert`): fails from 30 days before
/// it expires; and the records the cluster CA or the blocklist refuses now.
pub fn certificate(s: &Status) -> Vec<Check> {
    let mut out = Vec::new();
    if let Some(c) = &s.cert {
        let days = c.expires_in_secs / 86_400;
        out.push(if c.expires_in_secs <= 0 {
            Check::fail(
                "certificate",
                format!("this node's certificate {} has expired: every host with a CA refuses its record", c.info.fingerprint),
                "issue a new one (meshsec ca sign), install it at the --cert path, run meshsec reload",
            )
        } else if c.expiring {
            Check::fail(
                "certificate",
                format!("this node's certificate {} expires in {days} day(s)", c.info.fingerprint),
                "issue a new one (meshsec ca sign), install it at the --cert path, run meshsec reload (no restart, no packet lost)",
            )
        } else {
            Check::pass(
                "certificate",
                format!("certificate {} from CA {} valid for {days} more day(s)", c.info.fingerprint, c.info.ca_key_id),
            )
        });
    }
    for r in &s.trust_refusals.current {
        if r.reason == crate::cert::Refusal::Blocklisted {
            out.push(
                Check::pass(
                    "trust",
                    format!(
                        "{} (signing key {}) is evicted: on the blocklist",
                        r.name, r.signing_fingerprint
                    ),
                )
                .peer(r.name.clone()),
            );
            continue;
        }
        out.push(
            Check::fail(
                "trust",
                format!("record of {} (generation {}, signing key {}) refused: {}", r.name, r.generation, r.signing_fingerprint, r.reason),
                "give that host a valid certificate from a trusted CA covering its name and data addresses (docs/trust-model.md), or leave it out if it is evicted",
            )
            .peer(r.name.clone()),
        );
    }
    out
}

/// Secret and key files: present, and readable by their owner only.
/// `missing` are files that could not be read at all.
pub fn permissions(checked: usize, open: &[ReadableByOthers], missing: &[String]) -> Vec<Check> {
    let mut out: Vec<Check> = missing
        .iter()
        .map(|m| {
            Check::fail(
                "permissions",
                m.clone(),
                "put the cluster secret there (meshsec init on the first host, then copy it, mode 0600)",
            )
        })
        .collect();
    out.extend(open.iter().map(|f| {
        Check::fail(
            "permissions",
            format!(
                "{} is readable by its group or by everyone (mode {:04o})",
                f.path.display(),
                f.mode
            ),
            format!("chmod 600 {}", f.path.display()),
        )
    }));
    if out.is_empty() {
        out.push(Check::pass(
            "permissions",
            format!("{checked} secret and key file(s), readable by their owner only"),
        ));
    }
    out
}

/// The gossip seal's freshness window: how far apart two clocks may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockWindow {
    /// Oldest accepted datagram (sender behind us).
    pub max_age: Duration,
    /// Furthest accepted future stamp (sender ahead of us).
    pub max_future: Duration,
}

impl Default for ClockWindow {
    fn default() -> Self {
        let r = crate::gossip::seal::ReplayConfig::default();
        ClockWindow {
            max_age: r.max_age,
            max_future: r.max_future_skew,
        }
    }
}

fn secs(ms: i64) -> String {
    format!("{:+.1} s", ms as f64 / 1000.0)
}

/// Clock offset to each peer, measured from the sealed timestamps of its
/// gossip datagrams: a failure at half the window, well before the seal
/// starts refusing its datagrams. Offsets from addresses no member has
/// (a node whose datagrams are all refused as stale never becomes one) are
/// judged too, named by address.
pub fn clocks(members: &[MemberRow], offsets: &[ClockOffset], window: ClockWindow) -> Vec<Check> {
    let ahead_limit = i64::try_from(window.max_future.as_millis() / 2).unwrap_or(i64::MAX);
    let behind_limit = i64::try_from(window.max_age.as_millis() / 2).unwrap_or(i64::MAX);
    let judge = |o: &ClockOffset, who: &str| -> Check {
        let off = o.offset_ms;
        let heard = format!("(measured {} s ago)", o.age_ms / 1000);
        let window_text = format!(
            "the gossip seal refuses datagrams more than {} s behind or {} s ahead",
            window.max_age.as_secs(),
            window.max_future.as_secs()
        );
        if off >= ahead_limit || off <= -behind_limit {
            Check::fail(
                "clock",
                format!(
                    "{who}'s clock is {} {} ours {heard}; {window_text}",
                    secs(off.saturating_abs()).trim_start_matches('+'),
                    if off > 0 { "ahead of" } else { "behind" }
                ),
                format!("synchronise the clocks of {who} and this host (NTP: systemd-timesyncd or chrony; timedatectl shows the state)"),
            )
            .peer(who)
        } else {
            Check::pass(
                "clock",
                format!("offset {off:+} ms {heard}, within half the seal's window"),
            )
            .peer(who)
        }
    };
    let mut out = Vec::new();
    let mut used = vec![false; offsets.len()];
    for m in members
        .iter()
        .filter(|m| !m.is_self && m.state != MemberState::Left)
    {
        // The datagram's source is normally the advertised gossip address;
        // fall back to the only offset from that IP.
        let exact = offsets.iter().position(|o| o.addr == m.gossip_addr);
        let by_ip = || {
            let mut it = offsets
                .iter()
                .enumerate()
                .filter(|(_, o)| o.addr.ip() == m.gossip_addr.ip());
            match (it.next(), it.next()) {
                (Some((i, _)), None) => Some(i),
                _ => None,
            }
        };
        match exact.or_else(by_ip) {
            Some(i) => {
                used[i] = true;
                out.push(judge(&offsets[i], &m.name));
            }
            None => out.push(
                Check::pass(
                    "clock",
                    "no gossip datagram measured from it yet (see the gossip check)",
                )
                .peer(&m.name),
            ),
        }
    }
    for (i, o) in offsets.iter().enumerate() {
        if !used[i] {
            let c = judge(o, &o.addr.to_string());
            if !c.ok {
                out.push(c);
            }
        }
    }
    out
}

/// Each peer heard on the gossip port. `silent_after`: a live peer whose
/// heartbeat has not advanced for longer fails (its state follows later).
pub fn gossip(
    members: &[MemberRow],
    seeds: &[SocketAddr],
    gossip_port: u16,
    silent_after: Duration,
) -> Vec<Check> {
    let peers: Vec<&MemberRow> = members
        .iter()
        .filter(|m| !m.is_self && m.state != MemberState::Left)
        .collect();
    if peers.is_empty() {
        return vec![if seeds.is_empty() {
            Check::pass("gossip", "no peer yet (first node: no --seed)")
        } else {
            Check::fail(
                "gossip",
                format!("no peer heard from; seeds {}", join(seeds)),
                format!("allow UDP port {gossip_port} both ways to the seeds, check they run meshsec with the same cluster secret (meshsec status: dropped_unknown_key)"),
            )
        }];
    }
    let limit = u64::try_from(silent_after.as_millis()).unwrap_or(u64::MAX);
    peers
        .into_iter()
        .map(|m| {
            let port = m.gossip_addr.port();
            let heard = m.last_heard_ms / 1000;
            // Suspect with a fresh heartbeat: just joined, the failure
            // detector has too few samples yet.
            let live = matches!(m.state, MemberState::Alive | MemberState::Suspect);
            if live && m.last_heard_ms <= limit {
                Check::pass(
                    "gossip",
                    format!("{}, heard {heard} s ago on {}", m.state, m.gossip_addr),
                )
                .peer(&m.name)
            } else {
                Check::fail(
                    "gossip",
                    format!(
                        "{}: no gossip from {} ({}) for {heard} s",
                        m.state, m.name, m.gossip_addr
                    ),
                    format!(
                        "allow UDP port {port} both ways between this host and {} ({}), and check its agent runs (systemctl status meshsec there)",
                        m.name,
                        m.gossip_addr.ip()
                    ),
                )
                .peer(&m.name)
            }
        })
        .collect()
}

/// Each live peer's links keyed through the handshake port: a link not
/// established in either of two listings taken a sampling interval apart
/// fails (one that is merely re-keying is established in one of them).
pub fn handshake(before: &[MemberRow], after: &[MemberRow]) -> Vec<Check> {
    let established_before = |name: &str, local: IpAddr, remote: IpAddr| {
        before.iter().any(|m| {
            m.name == name
                && m.links.iter().any(|l| {
                    l.local == local && l.remote == remote && l.sa == LinkState::Established
                })
        })
    };
    let mut out = Vec::new();
    for m in after
        .iter()
        .filter(|m| !m.is_self && m.state == MemberState::Alive && !m.links.is_empty())
    {
        let port = m
            .handshake_port
            .map(|p| p.to_string())
            .unwrap_or_else(|| "?".into());
        let down: Vec<String> = m
            .links
            .iter()
            .filter(|l| {
                l.sa != LinkState::Established && !established_before(&m.name, l.local, l.remote)
            })
            .map(|l| {
                format!(
                    "{} -> {} ({})",
                    l.local,
                    l.remote,
                    format!("{:?}", l.sa).to_lowercase()
                )
            })
            .collect();
        if down.is_empty() {
            out.push(
                Check::pass(
                    "handshake",
                    format!(
                        "{} link(s) established (handshake udp/{port})",
                        m.links.len()
                    ),
                )
                .peer(&m.name),
            );
        } else {
            out.push(
                Check::fail(
                    "handshake",
                    format!(
                        "{} is alive in gossip but its link(s) {} are not established",
                        m.name,
                        down.join(", ")
                    ),
                    format!(
                        "allow UDP port {port} both ways between this host and {} ({}); if it passes, meshsec status shows why handshakes are refused (alg_mismatch: --esp-algorithm differs; decrypt_failed: another cluster secret)",
                        m.name,
                        join(&m.data_addrs)
                    ),
                )
                .peer(&m.name),
            );
        }
    }
    out
}

/// Packet counters of one established link's current SAs at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspSample {
    /// Peer node name.
    pub peer: String,
    /// Our address.
    pub local: IpAddr,
    /// The peer's address.
    pub remote: IpAddr,
    /// Inbound SPI (identifies the SA pair: a re-key changes it).
    pub spi_in: String,
    /// Packets the inbound SA accepted.
    pub packets_in: u64,
    /// Packets the outbound SA sent.
    pub packets_out: u64,
}

/// ESP arriving from each established peer: over the sampling interval an
/// outbound SA that sent packets while the inbound SA of the same link
/// received none means IP protocol 50 is dropped on the way (doctor sends a
/// few ICMP echo requests over each link during the interval, so a healthy
/// link always has replies to count).
pub fn esp(before: &[EspSample], after: &[EspSample], interval: Duration) -> Vec<Check> {
    let mut per_peer: BTreeMap<&str, Vec<Result<String, String>>> = BTreeMap::new();
    for a in after {
        let Some(b) = before.iter().find(|b| {
            b.peer == a.peer && b.local == a.local && b.remote == a.remote && b.spi_in == a.spi_in
        }) else {
            continue; // re-keyed or new during the interval: nothing to compare
        };
        let sent = a.packets_out.saturating_sub(b.packets_out);
        let received = a.packets_in.saturating_sub(b.packets_in);
        let verdict = if sent > 0 && received == 0 {
            Err(format!(
                "{} -> {}: {sent} ESP packet(s) sent in {} s, none received",
                a.local,
                a.remote,
                interval.as_secs()
            ))
        } else {
            Ok(format!(
                "{} -> {}: {received} in / {sent} out",
                a.local, a.remote
            ))
        };
        per_peer.entry(&a.peer).or_default().push(verdict);
    }
    per_peer
        .into_iter()
        .map(|(peer, v)| {
            let bad: Vec<&String> = v.iter().filter_map(|r| r.as_ref().err()).collect();
            if bad.is_empty() {
                let good: Vec<&String> = v.iter().filter_map(|r| r.as_ref().ok()).collect();
                Check::pass(
                    "esp",
                    format!(
                        "ESP arriving over {} s: {}",
                        interval.as_secs(),
                        good.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                )
                .peer(peer)
            } else {
                Check::fail(
                    "esp",
                    format!(
                        "ESP (IP protocol 50) from {peer} is not arriving: {}",
                        bad.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                    format!("allow IP protocol 50 (ESP) both ways between this host and {peer} in every firewall and cloud security group on the path (many pass only TCP, UDP and ICMP)"),
                )
                .peer(peer)
            }
        })
        .collect()
}

/// A data address and the interface holding it, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataInterface {
    /// The published data address.
    pub addr: IpAddr,
    /// Interface name and MTU, `None` if no interface holds the address.
    pub iface: Option<(String, u32)>,
}

/// MTU headroom for ESP on each data interface.
pub fn mtu(data: &[DataInterface]) -> Vec<Check> {
    data.iter()
        .map(|d| match &d.iface {
            None => Check::fail(
                "mtu",
                format!("data address {} is on no interface of this host", d.addr),
                "publish addresses this host holds (--data-address / data_addresses)",
            ),
            Some((name, mtu)) => {
                let payload = mtu.saturating_sub(ESP_OVERHEAD_MAX);
                let (floor, family) = match d.addr {
                    IpAddr::V4(_) => (IPV4_MIN_MTU, "IPv4"),
                    IpAddr::V6(_) => (IPV6_MIN_MTU, "IPv6"),
                };
                if payload < floor {
                    Check::fail(
                        "mtu",
                        format!(
                            "{name} ({}): MTU {mtu} leaves {payload} bytes after ESP's {ESP_OVERHEAD_MAX} bytes of overhead, below {family}'s minimum of {floor}",
                            d.addr
                        ),
                        format!("raise the MTU of {name} to at least {} (ip link set {name} mtu {})", floor + ESP_OVERHEAD_MAX, floor + ESP_OVERHEAD_MAX),
                    )
                } else {
                    Check::pass(
                        "mtu",
                        format!(
                            "{name} ({}): MTU {mtu}, ESP overhead up to {ESP_OVERHEAD_MAX} bytes, {payload} bytes left for each protected packet",
                            d.addr
                        ),
                    )
                }
            }
        })
        .collect()
}

/// A pair meshsec protects: (peer name, our address, the peer's address).
pub type Pair = (String, IpAddr, IpAddr);

/// Other IPsec policies that win over meshsec's for one of its pairs: same
/// direction, a lower priority number, a selector taking in the pair.
pub fn policies(pairs: &[Pair], foreign: &[ForeignPolicy]) -> Vec<Check> {
    let mut out = Vec::new();
    for (peer, local, remote) in pairs {
        let shadows: Vec<&ForeignPolicy> = foreign
            .iter()
            .filter(|f| f.priority < POLICY_PRIORITY)
            .filter(|f| match f.direction {
                Direction::Out => f.covers(*local, *remote),
                Direction::In => f.covers(*remote, *local),
            })
            .collect();
        if shadows.is_empty() {
            continue;
        }
        out.push(
            Check::fail(
                "policies",
                format!(
                    "traffic {local} <-> {remote} meets another IPsec policy before meshsec's (priority {POLICY_PRIORITY}): {}",
                    shadows.iter().map(|f| f.describe()).collect::<Vec<_>>().join("; ")
                ),
                format!(
                    "give that policy a priority number above {POLICY_PRIORITY} or narrow its selector to leave {remote} out (ip xfrm policy update ... / its IKE daemon's config)"
                ),
            )
            .peer(peer),
        );
    }
    if out.is_empty() {
        out.push(Check::pass(
            "policies",
            format!(
                "no other IPsec policy shadows meshsec's {} pair(s) ({} foreign in/out polic{} on this host)",
                pairs.len(),
                foreign.len(),
                if foreign.len() == 1 { "y" } else { "ies" }
            ),
        ));
    }
    out
}
