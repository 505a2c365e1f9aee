//! The I/O around the doctor's checks: the config, the kernel probe, the
//! agent's control socket, kernel SA counters sampled twice with a few ICMP
//! echo requests sent over every established link in between, foreign XFRM
//! policies, interface MTUs and file modes.

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Check, ClockWindow, DataInterface, EspSample, Pair, Report};
use crate::config::{
    AgentConfig, AgentFlags, DatapathKind, DEFAULT_CONTROL_SOCKET, DEFAULT_SECRET_FILE,
    DEFAULT_STATE_DIR,
};
use crate::control::{Client, MemberRow, Reply, Request};
use crate::datapath::{AddressFamily, Aead, Datapath, SaState, XfrmDatapath};
use crate::identity;
use crate::mesh::LinkState;

/// The config file the packaged unit starts the agent with; doctor reads it
/// when no `--config` is given and it exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/meshsec/meshsec.toml";

/// Echo requests sent over each established link during the sampling interval.
const ECHOES: u16 = 3;

/// What to check.
#[derive(Debug, Clone)]
pub struct Options {
    /// The agent's flags (and `--config`).
    pub flags: AgentFlags,
    /// The sampling interval of the ESP and handshake checks.
    pub sample: Duration,
}

/// Runs every check.
pub async fn run(mut opts: Options) -> Report {
    let mut checks = Vec::new();
    if opts.flags.config.is_none() && Path::new(DEFAULT_CONFIG_FILE).exists() {
        opts.flags.config = Some(DEFAULT_CONFIG_FILE.into());
    }
    let flags = &opts.flags;
    let source = flags
        .config
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "flags".into());
    let cfg = AgentConfig::resolve(flags);
    let kind = cfg
        .as_ref()
        .map(|c| c.datapath)
        .unwrap_or(flags.datapath.unwrap_or(DatapathKind::Kernel));

    // Kernel support, as the agent probes it at start.
    let aead = cfg
        .as_ref()
        .map(|c| c.esp_algorithm)
        .unwrap_or(flags.esp_algorithm.unwrap_or(Aead::Aes128Gcm));
    let mut families: Vec<AddressFamily> = match &cfg {
        Ok(c) => c
            .data_addresses
            .iter()
            .map(|a| AddressFamily::of(*a))
            .collect(),
        Err(_) => vec![AddressFamily::V4],
    };
    families.sort();
    families.dedup();
    let mut xfrm = match kind {
        DatapathKind::Kernel => Some(XfrmDatapath::open()),
        DatapathKind::Memory => None,
    };
    let mut offload = None;
    let probe = match xfrm.as_mut() {
        Some(Ok(x)) => x
            .probe(aead, &families)
            .map(|r| offload = Some(r.esp_offload)),
        Some(Err(e)) => Err(clone_err(e)),
        None => Ok(()),
    };
    let fams = families
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join(" and ");
    checks.push(super::kernel(
        kind,
        probe
            .as_ref()
            .map(|()| format!("XFRM netlink, transport-mode ESP and {aead} over {fams} accepted (the agent's start-up probe)")),
    ));
    if let Some(report) = &offload {
        checks.push(super::esp_offload(report));
    }
    let mut xfrm = xfrm.and_then(|r| r.ok());

    checks.push(super::config(&source, &cfg));

    // The agent.
    let socket: PathBuf = cfg
        .as_ref()
        .map(|c| c.control_socket.clone())
        .ok()
        .or_else(|| flags.control_socket.clone())
        .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into());
    let socket_text = socket.display().to_string();
    let status = match ask(&socket, Request::Status).await {
        Ok(Reply::Status(s)) => Ok(*s),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(e) => Err(e),
    };
    checks.push(super::agent(
        &socket_text,
        status.as_ref().map_err(|e| e.as_str()),
        cfg.as_ref().ok(),
    ));
    if let Ok(s) = &status {
        checks.extend(super::certificate(s));
    }

    // Secret and key files.
    let secret_files: Vec<PathBuf> = match &cfg {
        Ok(c) => c.secret_files.clone(),
        Err(_) if !flags.secret_files.is_empty() => flags.secret_files.clone(),
        Err(_) => vec![DEFAULT_SECRET_FILE.into()],
    };
    let state_dir = cfg
        .as_ref()
        .map(|c| c.state_dir.clone())
        .ok()
        .or_else(|| flags.state_dir.clone())
        .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
    let mut files: Vec<PathBuf> = secret_files.clone();
    files.push(state_dir.join(identity::NODE_KEY_FILE));
    files.push(state_dir.join(identity::SIGNING_KEY_FILE));
    let present: Vec<&Path> = files
        .iter()
        .map(|p| p.as_path())
        .filter(|p| p.exists())
        .collect();
    let missing: Vec<String> = secret_files
        .iter()
        .filter(|p| !p.exists())
        .map(|p| format!("cluster secret {} is missing", p.display()))
        .collect();
    checks.extend(super::permissions(
        present.len(),
        &identity::readable_by_others(present.iter().copied()),
        &missing,
    ));

    // Peers, from what the agent knows.
    let mut pairs: Vec<Pair> = Vec::new();
    if let Ok(status) = &status {
        let before = members(&socket).await;
        if let Ok(before) = before {
            let sas_before = dump_sas(xfrm.as_mut());
            checks.extend(super::clocks(
                &before,
                &status.clock_offsets,
                ClockWindow::default(),
            ));
            let interval = cfg
                .as_ref()
                .map(|c| c.gossip_interval)
                .unwrap_or(Duration::from_millis(500));
            let seeds = cfg.as_ref().map(|c| c.seeds.clone()).unwrap_or_default();
            let port = cfg
                .as_ref()
                .map(|c| c.listen.port())
                .unwrap_or(crate::config::DEFAULT_GOSSIP_PORT);
            checks.extend(super::gossip(
                &before,
                &seeds,
                port,
                (interval * 20).max(Duration::from_secs(10)),
            ));
            // Traffic over every established link, then the second sample.
            let links: Vec<(IpAddr, IpAddr)> = before
                .iter()
                .flat_map(|m| m.links.iter())
                .filter(|l| l.sa == LinkState::Established)
                .map(|l| (l.local, l.remote))
                .collect();
            for k in 0..ECHOES {
                for (local, remote) in &links {
                    // Best effort: a failed send only means fewer packets to count.
                    let _ = echo(*local, *remote, k);
                }
                tokio::time::sleep(opts.sample / u32::from(ECHOES)).await;
            }
            let sas_after = dump_sas(xfrm.as_mut());
            match members(&socket).await {
                Ok(after) => {
                    checks.extend(super::handshake(&before, &after));
                    checks.extend(super::esp(
                        &samples(&before, sas_before.as_deref()),
                        &samples(&after, sas_after.as_deref()),
                        opts.sample,
                    ));
                    pairs = after
                        .iter()
                        .flat_map(|m| m.links.iter().map(|l| (m.name.clone(), l.local, l.remote)))
                        .collect();
                }
                Err(e) => checks.push(Check::fail(
                    "agent",
                    format!("the agent stopped answering during the sampling interval: {e}"),
                    "journalctl -u meshsec says why",
                )),
            }
        } else if let Err(e) = before {
            checks.push(Check::fail(
                "agent",
                format!("the agent answered status but not the member listing: {e}"),
                "journalctl -u meshsec says why",
            ));
        }
    }

    // MTU of each data interface.
    let data_addrs: Vec<IpAddr> = match (&cfg, &status) {
        (Ok(c), _) => c.data_addresses.clone(),
        (Err(_), Ok(s)) => s.data_addrs.iter().filter_map(|a| a.parse().ok()).collect(),
        _ => Vec::new(),
    };
    checks.extend(super::mtu(&data_interfaces(&data_addrs)));

    // Other IPsec policies.
    if let Some(x) = xfrm.as_mut() {
        match x.dump_foreign_policies() {
            Ok(foreign) => checks.extend(super::policies(&pairs, &foreign)),
            Err(e) => checks.push(Check::fail(
                "policies",
                format!("cannot read the kernel's XFRM policies: {e}"),
                "run meshsec doctor as root (CAP_NET_ADMIN)",
            )),
        }
    }
    Report::new(checks)
}

fn clone_err(e: &crate::datapath::DatapathError) -> crate::datapath::DatapathError {
    match e {
        crate::datapath::DatapathError::Unsupported { what, fix } => {
            crate::datapath::DatapathError::Unsupported {
                what: what.clone(),
                fix: fix.clone(),
            }
        }
        other => crate::datapath::DatapathError::Unsupported {
            what: other.to_string(),
            fix: "run meshsec doctor as root (CAP_NET_ADMIN), as the agent runs".into(),
        },
    }
}

/// One request, its first reply.
async fn ask(socket: &Path, req: Request) -> Result<Reply, String> {
    let fut = async {
        let mut c = Client::request(socket, &req)
            .await
            .map_err(|e| e.to_string())?;
        match c.next().await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err("the agent closed the connection".to_string()),
            Err(e) => Err(e.to_string()),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| Err("no answer within 10 s".into()))
}

async fn members(socket: &Path) -> Result<Vec<MemberRow>, String> {
    match ask(socket, Request::Members).await? {
        Reply::Members(m) => Ok(m),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

fn dump_sas(x: Option<&mut XfrmDatapath>) -> Option<Vec<SaState>> {
    x.and_then(|x| x.dump_sas().ok())
}

fn parse_spi(s: &str) -> Option<u32> {
    u32::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// The packet counters of every established link: from the kernel's SAs
/// when they could be read (current to the instant), else the listing's.
pub fn samples(members: &[MemberRow], sas: Option<&[SaState]>) -> Vec<EspSample> {
    let mut out = Vec::new();
    for m in members.iter().filter(|m| !m.is_self) {
        for l in m.links.iter().filter(|l| l.sa == LinkState::Established) {
            let (Some(spi_in), Some(spi_out)) = (l.spi_in.as_deref(), l.spi_out.as_deref()) else {
                continue;
            };
            let (packets_in, packets_out) = match sas {
                Some(sas) => {
                    let find = |dst: IpAddr, spi: Option<u32>| {
                        sas.iter()
                            .find(|s| s.dst == dst && Some(s.spi) == spi)
                            .map(|s| s.counters.packets)
                    };
                    match (
                        find(l.local, parse_spi(spi_in)),
                        find(l.remote, parse_spi(spi_out)),
                    ) {
                        (Some(i), Some(o)) => (i, o),
                        _ => continue,
                    }
                }
                None => (l.packets_in, l.packets_out),
            };
            out.push(EspSample {
                peer: m.name.clone(),
                local: l.local,
                remote: l.remote,
                spi_in: spi_in.to_string(),
                packets_in,
                packets_out,
            });
        }
    }
    out
}

/// The interface holding each address, with its MTU.
fn data_interfaces(addrs: &[IpAddr]) -> Vec<DataInterface> {
    let ifaces = interface_addresses();
    addrs
        .iter()
        .map(|a| DataInterface {
            addr: *a,
            iface: ifaces
                .iter()
                .find(|(_, ip)| ip == a)
                .and_then(|(name, _)| Some((name.clone(), read_mtu(name)?))),
        })
        .collect()
}

fn read_mtu(name: &str) -> Option<u32> {
    // The name comes from getifaddrs; never a path component anyway.
    if name.contains('/') || name == ".." {
        return None;
    }
    std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// (interface, address) for every address of this network namespace.
fn interface_addresses() -> Vec<(String, IpAddr)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut p = head;
    while !p.is_null() {
        // SAFETY: p is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string; ifa_addr points to a
        // sockaddr whose family says which larger struct it is.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let ip = match family {
            libc::AF_INET => {
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        out.push((name, ip));
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

fn sockaddr(ip: IpAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match ip {
        IpAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from(a).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        IpAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_addr.s6_addr = a.octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// The Internet checksum (RFC 1071).
pub fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request from `local` to `remote` (a raw socket: root). It
/// matches meshsec's policy for the pair, so it leaves as ESP, and the
/// peer's reply comes back as ESP on the inbound SA.
fn echo(local: IpAddr, remote: IpAddr, seq: u16) -> io::Result<()> {
    let (domain, proto, ty) = match remote {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8u8),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8),
    };
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let id = (std::process::id() as u16).to_be_bytes();
    let mut pkt = vec![ty, 0, 0, 0, id[0], id[1]];
    pkt.extend_from_slice(&seq.to_be_bytes());
    pkt.extend_from_slice(b"meshsec doctor");
    if remote.is_ipv4() {
        // The kernel fills ICMPv6 checksums itself, not ICMP ones.
        let c = inet_checksum(&pkt).to_be_bytes();
        pkt[2..4].copy_from_slice(&c);
    }
    let (src, src_len) = sockaddr(local);
    // SAFETY: src is a valid sockaddr of src_len bytes.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &src as *const _ as *const libc::sockaddr,
            src_len,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let (dst, dst_len) = sockaddr(remote);
    // SAFETY: pkt and dst are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            libc::MSG_DONTWAIT,
            &dst as *const _ as *const libc::sockaddr,
            dst_len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
