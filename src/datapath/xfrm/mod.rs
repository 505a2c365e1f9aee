//! [`XfrmDatapath`]: the kernel's XFRM tables over netlink.
//!
//! Message construction is pure (`sa_message`, `policy_message`, ...) and unit
//! tested byte by byte; [`super::netlink`] moves the bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::DefaultNla;
use netlink_packet_core::Parseable;
use netlink_packet_xfrm::{
    policy::{DelGetMessage as PolicyDelGetMessage, ModifyMessage as PolicyModifyMessage},
    state::{
        AllocSpiMessage, DelGetMessage as SaDelGetMessage, GetDumpMessage,
        ModifyMessage as SaModifyMessage,
    },
    Address, Alg, AlgAead, Id, LifetimeConfig, ReplayEsn, Selector, UserPolicyId, UserPolicyInfo,
    UserSaId, UserSaInfo, UserSpiInfo, UserTemplate, XfrmAttrs, XfrmMessage, AF_INET, AF_INET6,
    IPPROTO_ESP, XFRM_INF, XFRM_MODE_TRANSPORT, XFRM_MSG_NEWPOLICY, XFRM_MSG_NEWSA,
    XFRM_POLICY_ALLOW, XFRM_POLICY_IN, XFRM_POLICY_OUT, XFRM_SHARE_ANY, XFRM_STATE_ESN,
    XFRM_USER_POLICY_INFO_LEN, XFRM_USER_SA_INFO_LEN,
};

use super::netlink::{NlSocket, Outcome, RawMsg, Request};
use super::ownership::{is_owned_reqid, ND_BYPASS_PRIORITY, POLICY_PRIORITY};
use super::{
    sort_policies, sort_sas, validate_policy, validate_sa, AddressFamily, Aead, Change, Datapath,
    DatapathError, Direction, ErrorKind, Lifetimes, Op, PolicyId, PolicySpec, PolicyState, Reqid,
    SaCounters, SaId, SaSpec, SaState, ICV_BITS, MIN_INBOUND_REPLAY_WINDOW,
};

/// `XFRMA_SA_DIR` (Linux ≥ 6.10), not in netlink-packet-xfrm 0.5.
pub(crate) const XFRMA_SA_DIR: u16 = 33;
const XFRM_SA_DIR_IN: u8 = 1;
const XFRM_SA_DIR_OUT: u8 = 2;

/// What the running kernel accepts for SA direction and replay windows.
///
/// With ESN, kernels before 6.10 refuse a replay window of 0 on any SA, so an
/// outbound SA gets the smallest legal window, 1 (the window is only ever
/// checked on input, so it costs nothing). Linux ≥ 6.10 knows SA directions
/// (`XFRMA_SA_DIR`) and requires window 0 and an empty bitmap on an SA marked
/// outbound. Both modes install the same datapath.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelFlavor {
    /// Send `XFRMA_SA_DIR` and use outbound window 0.
    pub sa_dir: bool,
}

impl KernelFlavor {
    /// Pre-6.10 behaviour: no direction attribute, outbound window 1.
    pub const LEGACY: KernelFlavor = KernelFlavor { sa_dir: false };
    /// ≥ 6.10 behaviour: `XFRMA_SA_DIR`, outbound window 0.
    pub const DIRECTIONAL: KernelFlavor = KernelFlavor { sa_dir: true };

    /// Decide from `uname -r`.
    pub fn detect() -> KernelFlavor {
        // SAFETY: utsname is plain data; uname fills it.
        let mut u: libc::utsname = unsafe { std::mem::zeroed() };
        if unsafe { libc::uname(&mut u) } != 0 {
            return KernelFlavor::LEGACY;
        }
        let rel: Vec<u8> = u
            .release
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        Self::from_release(&String::from_utf8_lossy(&rel))
    }

    /// Decide from a kernel release string such as `6.1.0-56-amd64`.
    pub fn from_release(release: &str) -> KernelFlavor {
        let mut it = release
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty());
        let major: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let minor: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        KernelFlavor {
            sa_dir: (major, minor) >= (6, 10),
        }
    }

    /// The ESN replay window an outbound SA carries.
    pub fn outbound_window(self) -> u32 {
        if self.sa_dir {
            0
        } else {
            1
        }
    }
}

fn host_prefix(a: IpAddr) -> u8 {
    if a.is_ipv4() {
        32
    } else {
        128
    }
}

fn family_of(a: IpAddr) -> u16 {
    if a.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    }
}

fn host_selector(src: IpAddr, dst: IpAddr) -> Selector {
    let mut s = Selector::default();
    s.source_prefix(&src, host_prefix(src));
    s.destination_prefix(&dst, host_prefix(dst));
    s
}

fn lifetime_cfg(l: &Lifetimes) -> LifetimeConfig {
    let inf = |v: u64| if v == 0 { XFRM_INF } else { v };
    LifetimeConfig {
        soft_byte_limit: inf(l.soft_bytes),
        hard_byte_limit: inf(l.hard_bytes),
        soft_packet_limit: inf(l.soft_packets),
        hard_packet_limit: inf(l.hard_packets),
        soft_add_expires_seconds: l.soft_seconds,
        hard_add_expires_seconds: l.hard_seconds,
        soft_use_expires_seconds: 0,
        hard_use_expires_seconds: 0,
    }
}

fn lifetimes_from(c: &LifetimeConfig) -> Lifetimes {
    let fin = |v: u64| if v == XFRM_INF { 0 } else { v };
    Lifetimes {
        soft_bytes: fin(c.soft_byte_limit),
        hard_bytes: fin(c.hard_byte_limit),
        soft_packets: fin(c.soft_packet_limit),
        hard_packets: fin(c.hard_packet_limit),
        soft_seconds: c.soft_add_expires_seconds,
        hard_seconds: c.hard_add_expires_seconds,
    }
}

fn name64(name: &str) -> [u8; 64] {
    let mut out = [0u8; 64];
    let b = name.as_bytes();
    out[..b.len().min(63)].copy_from_slice(&b[..b.len().min(63)]);
    out
}

fn dir_u8(d: Direction) -> u8 {
    match d {
        Direction::In => XFRM_SA_DIR_IN,
        Direction::Out => XFRM_SA_DIR_OUT,
    }
}

/// The `XFRM_MSG_NEWSA` / `XFRM_MSG_UPDSA` body for an SA.
pub(crate) fn sa_message(sa: &SaSpec, flavor: KernelFlavor) -> SaModifyMessage {
    let mut info = UserSaInfo {
        selector: host_selector(sa.src, sa.dst),
        id: Id {
            daddr: Address::from_ip(&sa.dst),
            spi: sa.spi,
            proto: IPPROTO_ESP,
        },
        saddr: Address::from_ip(&sa.src),
        lifetime_cfg: lifetime_cfg(&sa.lifetimes),
        reqid: sa.reqid.get(),
        family: family_of(sa.dst),
        mode: XFRM_MODE_TRANSPORT,
        // With ESN the window lives in the ESN attribute; the kernel insists
        // the legacy 8-bit field is 0.
        replay_window: 0,
        flags: XFRM_STATE_ESN,
        ..Default::default()
    };
    info.selector.proto = 0; // all protocols
    let (window, bmp_len) = match sa.direction {
        Direction::In => (sa.replay_window, sa.replay_window.div_ceil(32)),
        Direction::Out if flavor.sa_dir => (0, 0),
        Direction::Out => {
            let w = flavor.outbound_window();
            (w, w.div_ceil(32))
        }
    };
    let mut nlas = vec![
        XfrmAttrs::EncryptionAlgAead(AlgAead {
            alg_name: name64(sa.aead.kernel_name()),
            alg_key_len: (sa.key.len() * 8) as u32,
            alg_icv_len: ICV_BITS,
            alg_key: sa.key.clone(),
        }),
        XfrmAttrs::ReplayStateEsn(ReplayEsn {
            bmp_len,
            replay_window: window,
            bmp: vec![0; bmp_len as usize],
            ..Default::default()
        }),
    ];
    if flavor.sa_dir {
        nlas.push(XfrmAttrs::Other(DefaultNla::new(
            XFRMA_SA_DIR,
            vec![dir_u8(sa.direction)],
        )));
    }
    SaModifyMessage {
        user_sa_info: info,
        nlas,
    }
}

/// The `XFRM_MSG_ALLOCSPI` body: a larval inbound SA `src → dst`.
pub(crate) fn alloc_spi_message(
    src: IpAddr,
    dst: IpAddr,
    reqid: Reqid,
    flavor: KernelFlavor,
) -> AllocSpiMessage {
    let mut spi_info = UserSpiInfo::default();
    spi_info.info.id = Id {
        daddr: Address::from_ip(&dst),
        spi: 0,
        proto: IPPROTO_ESP,
    };
    spi_info.info.saddr = Address::from_ip(&src);
    spi_info.info.family = family_of(dst);
    spi_info.info.mode = XFRM_MODE_TRANSPORT;
    spi_info.info.reqid = reqid.get();
    spi_info.info.selector = host_selector(src, dst);
    // 0x100.. (1-255 are IANA-reserved) up to the full 32-bit range.
    spi_info.min = 0x100;
    spi_info.max = u32::MAX;
    let mut nlas = Vec::new();
    if flavor.sa_dir {
        nlas.push(XfrmAttrs::Other(DefaultNla::new(
            XFRMA_SA_DIR,
            vec![XFRM_SA_DIR_IN],
        )));
    }
    AllocSpiMessage { spi_info, nlas }
}

fn sa_id_message(id: SaId) -> SaDelGetMessage {
    SaDelGetMessage {
        user_sa_id: UserSaId {
            daddr: Address::from_ip(&id.dst),
            spi: id.spi,
            family: family_of(id.dst),
            proto: IPPROTO_ESP,
        },
        nlas: Vec::new(),
    }
}

fn policy_dir(d: Direction) -> u8 {
    match d {
        Direction::In => XFRM_POLICY_IN,
        Direction::Out => XFRM_POLICY_OUT,
    }
}

/// The `XFRM_MSG_NEWPOLICY` body: host selectors, all protocols, allow,
/// one required ESP transport template with the reqid.
pub(crate) fn policy_message(p: &PolicySpec) -> PolicyModifyMessage {
    let info = UserPolicyInfo {
        selector: host_selector(p.id.src, p.id.dst),
        lifetime_cfg: LifetimeConfig::default(),
        priority: POLICY_PRIORITY,
        direction: policy_dir(p.id.direction),
        action: XFRM_POLICY_ALLOW,
        share: XFRM_SHARE_ANY,
        ..Default::default()
    };
    let tmpl = UserTemplate {
        id: Id {
            daddr: Address::default(),
            spi: 0,
            proto: IPPROTO_ESP,
        },
        family: family_of(p.id.src),
        reqid: p.reqid.get(),
        mode: XFRM_MODE_TRANSPORT,
        share: XFRM_SHARE_ANY,
        optional: 0, // level required: no SA, no packet
        ..Default::default()
    };
    PolicyModifyMessage {
        user_policy_info: info,
        nlas: vec![XfrmAttrs::Template(vec![tmpl])],
    }
}

fn policy_id_message(id: PolicyId, index: u32) -> PolicyDelGetMessage {
    PolicyDelGetMessage {
        user_policy_id: UserPolicyId {
            selector: host_selector(id.src, id.dst),
            index,
            direction: policy_dir(id.direction),
        },
        nlas: Vec::new(),
    }
}

const IPPROTO_ICMPV6: u8 = 58;
/// (policy direction, ICMPv6 type) of the neighbour-discovery bypasses.
const ND_BYPASS: [(u8, u16); 4] = [
    (XFRM_POLICY_OUT, 135),
    (XFRM_POLICY_OUT, 136),
    (XFRM_POLICY_IN, 135),
    (XFRM_POLICY_IN, 136),
];

fn nd_selector(icmp_type: u16) -> Selector {
    Selector {
        family: AF_INET6,
        proto: IPPROTO_ICMPV6,
        // xfrm matches the ICMP type through the source-port field.
        sport: icmp_type,
        sport_mask: 0xffff,
        ..Default::default()
    }
}

/// An IPv6 neighbour-discovery bypass: allow, no template.
pub(crate) fn nd_policy_message(dir: u8, icmp_type: u16) -> PolicyModifyMessage {
    PolicyModifyMessage {
        user_policy_info: UserPolicyInfo {
            selector: nd_selector(icmp_type),
            lifetime_cfg: LifetimeConfig::default(),
            priority: ND_BYPASS_PRIORITY,
            direction: dir,
            action: XFRM_POLICY_ALLOW,
            share: XFRM_SHARE_ANY,
            ..Default::default()
        },
        nlas: Vec::new(),
    }
}

/// Recognise one of meshsec's ND bypasses; returns its index.
pub(crate) fn parse_nd_policy(payload: &[u8]) -> Option<u32> {
    if payload.len() < XFRM_USER_POLICY_INFO_LEN {
        return None;
    }
    let msg = PolicyModifyMessage::parse(payload).ok()?;
    let i = &msg.user_policy_info;
    let s = &i.selector;
    let ours = i.priority == ND_BYPASS_PRIORITY
        && i.action == XFRM_POLICY_ALLOW
        && s.family == AF_INET6
        && s.proto == IPPROTO_ICMPV6
        && s.prefixlen_s == 0
        && s.prefixlen_d == 0
        && s.sport_mask == 0xffff
        && (s.sport == 135 || s.sport == 136)
        && !msg.nlas.iter().any(|n| matches!(n, XfrmAttrs::Template(_)));
    ours.then_some(i.index)
}

fn addr_of(a: &Address, family: u16) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(a.to_ipv4())),
        AF_INET6 => Some(IpAddr::V6(a.to_ipv6())),
        _ => None,
    }
}

/// Parse one SA from a `XFRM_MSG_NEWSA` payload; `None` if it is not
/// meshsec's or does not decode (never panics on short input).
pub(crate) fn parse_sa(payload: &[u8]) -> Option<SaState> {
    if payload.len() < XFRM_USER_SA_INFO_LEN {
        return None;
    }
    let msg = SaModifyMessage::parse(payload).ok()?;
    let i = &msg.user_sa_info;
    if i.id.proto != IPPROTO_ESP || i.mode != XFRM_MODE_TRANSPORT || !is_owned_reqid(i.reqid) {
        return None;
    }
    let reqid = Reqid::from_raw(i.reqid)?;
    let src = addr_of(&i.saddr, i.family)?;
    let dst = addr_of(&i.id.daddr, i.family)?;
    let mut aead = None;
    let mut has_alg = false;
    let mut window = u32::from(i.replay_window);
    let mut dir_attr = None;
    for nla in &msg.nlas {
        match nla {
            XfrmAttrs::EncryptionAlgAead(a) => {
                has_alg = true;
                let end = a
                    .alg_name
                    .iter()
                    .position(|c| *c == 0)
                    .unwrap_or(a.alg_name.len());
                let name = String::from_utf8_lossy(&a.alg_name[..end]);
                aead = Aead::from_kernel(&name, a.alg_key_len);
            }
            XfrmAttrs::EncryptionAlg(Alg { .. })
            | XfrmAttrs::AuthenticationAlg(_)
            | XfrmAttrs::AuthenticationAlgTrunc(_) => has_alg = true,
            XfrmAttrs::ReplayStateEsn(r) => window = r.replay_window,
            XfrmAttrs::Other(o) if netlink_packet_core::Nla::kind(o) == XFRMA_SA_DIR => {
                let mut v = [0u8; 1];
                if netlink_packet_core::Nla::value_len(o) == 1 {
                    netlink_packet_core::Nla::emit_value(o, &mut v);
                    dir_attr = match v[0] {
                        XFRM_SA_DIR_IN => Some(Direction::In),
                        XFRM_SA_DIR_OUT => Some(Direction::Out),
                        _ => None,
                    };
                }
            }
            _ => {}
        }
    }
    let larval = !has_alg;
    let direction = if larval {
        None
    } else {
        dir_attr.or(Some(if window >= MIN_INBOUND_REPLAY_WINDOW {
            Direction::In
        } else {
            Direction::Out
        }))
    };
    Some(SaState {
        src,
        dst,
        spi: i.id.spi,
        reqid,
        direction,
        aead,
        replay_window: window,
        larval,
        lifetimes: lifetimes_from(&i.lifetime_cfg),
        counters: SaCounters {
            bytes: i.lifetime_cur.bytes,
            packets: i.lifetime_cur.packets,
            replay: i.stats.replay,
            integrity_failed: i.stats.integrity_failed,
        },
    })
}

/// Parse one policy from a `XFRM_MSG_NEWPOLICY` payload; `None` unless it is
/// meshsec's by the ownership rule.
pub(crate) fn parse_policy(payload: &[u8]) -> Option<PolicyState> {
    if payload.len() < XFRM_USER_POLICY_INFO_LEN {
        return None;
    }
    let msg = PolicyModifyMessage::parse(payload).ok()?;
    let i = &msg.user_policy_info;
    if i.priority != POLICY_PRIORITY {
        return None;
    }
    let direction = match i.direction {
        XFRM_POLICY_IN => Direction::In,
        XFRM_POLICY_OUT => Direction::Out,
        _ => return None,
    };
    let mut tmpls = None;
    for nla in &msg.nlas {
        match nla {
            XfrmAttrs::Template(t) => tmpls = Some(t.clone()),
            XfrmAttrs::Mark(m) if m.mask != 0 => return None,
            XfrmAttrs::IfId(id) if *id != 0 => return None,
            _ => {}
        }
    }
    let tmpls = tmpls?;
    let [t] = tmpls.as_slice() else { return None };
    if t.id.proto != IPPROTO_ESP || t.mode != XFRM_MODE_TRANSPORT {
        return None;
    }
    let reqid = Reqid::from_raw(t.reqid)?;
    let s = &i.selector;
    if s.prefixlen_s != host_prefix_for(s.family)? || s.prefixlen_d != host_prefix_for(s.family)? {
        return None;
    }
    let src = addr_of(&s.saddr, s.family)?;
    let dst = addr_of(&s.daddr, s.family)?;
    Some(PolicyState {
        spec: PolicySpec {
            id: PolicyId {
                src,
                dst,
                direction,
            },
            reqid,
        },
        index: i.index,
    })
}

fn host_prefix_for(family: u16) -> Option<u8> {
    match family {
        AF_INET => Some(32),
        AF_INET6 => Some(128),
        _ => None,
    }
}

/// The kernel's XFRM tables through a `NETLINK_XFRM` socket.
pub struct XfrmDatapath {
    sock: NlSocket,
    flavor: KernelFlavor,
    /// Set once the ND bypasses are known to exist (saves a dump per policy).
    nd_bypass_seen: bool,
}

impl XfrmDatapath {
    /// Open a `NETLINK_XFRM` socket in the calling thread's network
    /// namespace; the SA encoding follows [`KernelFlavor::detect`].
    pub fn open() -> Result<XfrmDatapath, DatapathError> {
        Self::open_with(KernelFlavor::detect())
    }

    /// Open with an explicit kernel flavour.
    pub fn open_with(flavor: KernelFlavor) -> Result<XfrmDatapath, DatapathError> {
        match NlSocket::open() {
            Ok(sock) => Ok(XfrmDatapath {
                sock,
                flavor,
                nd_bypass_seen: false,
            }),
            Err(e) if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) => {
                Err(DatapathError::Unsupported {
                    what: "kernel lacks XFRM netlink (CONFIG_XFRM_USER, module xfrm_user)".into(),
                    fix: "modprobe xfrm_user".into(),
                })
            }
            Err(e) => Err(DatapathError::Io {
                op: Op::Open,
                source: e,
            }),
        }
    }

    /// The flavour in use.
    pub fn flavor(&self) -> KernelFlavor {
        self.flavor
    }

    fn one(
        &mut self,
        op: Op,
        target: &dyn Fn() -> String,
        msg: XfrmMessage,
        dump: bool,
    ) -> Result<Vec<RawMsg>, DatapathError> {
        let retry = dump.then(|| msg.clone());
        let mut out = self
            .sock
            .transact(&[Request { msg, dump }])
            .map_err(|source| DatapathError::Io { op, source })?;
        // A dump that raced with a change is inconsistent: take it again.
        if let Some(msg) = retry {
            for _ in 0..3 {
                if !matches!(
                    out.last(),
                    Some(Outcome::Error {
                        errno: libc::EINTR,
                        ..
                    })
                ) {
                    break;
                }
                out = self
                    .sock
                    .transact(&[Request {
                        msg: msg.clone(),
                        dump,
                    }])
                    .map_err(|source| DatapathError::Io { op, source })?;
            }
        }
        match out.pop() {
            Some(Outcome::Done(v)) => Ok(v),
            Some(Outcome::Error { errno, message }) => Err(DatapathError::Kernel {
                op,
                target: target(),
                errno,
                message,
            }),
            None => Err(DatapathError::Decode {
                op,
                reason: "no reply".into(),
            }),
        }
    }

    fn get_sa(&mut self, op: Op, id: SaId) -> Result<Option<SaState>, DatapathError> {
        let msgs = self.one(
            op,
            &|| id.to_string(),
            XfrmMessage::GetSa(sa_id_message(id)),
            false,
        )?;
        let mut found = false;
        for m in &msgs {
            if m.ty == XFRM_MSG_NEWSA {
                found = true;
                if let Some(s) = parse_sa(&m.payload) {
                    return Ok(Some(s));
                }
            }
        }
        if found {
            Ok(None) // exists, not ours
        } else {
            Err(DatapathError::Decode {
                op,
                reason: "GETSA answered without an SA".into(),
            })
        }
    }

    fn get_policy(&mut self, op: Op, id: PolicyId) -> Result<Option<PolicyState>, DatapathError> {
        let msgs = self.one(
            op,
            &|| id.to_string(),
            XfrmMessage::GetPolicy(policy_id_message(id, 0)),
            false,
        )?;
        let mut found = false;
        for m in &msgs {
            if m.ty == XFRM_MSG_NEWPOLICY {
                found = true;
                if let Some(p) = parse_policy(&m.payload) {
                    return Ok(Some(p));
                }
            }
        }
        if found {
            Ok(None)
        } else {
            Err(DatapathError::Decode {
                op,
                reason: "GETPOLICY answered without a policy".into(),
            })
        }
    }

    fn raw_policy_dump(&mut self) -> Result<Vec<RawMsg>, DatapathError> {
        self.one(
            Op::DumpPolicy,
            &String::new,
            XfrmMessage::GetPolicy(PolicyDelGetMessage::default()),
            true,
        )
    }

    fn nd_indexes(&mut self) -> Result<Vec<u32>, DatapathError> {
        Ok(self
            .raw_policy_dump()?
            .iter()
            .filter(|m| m.ty == XFRM_MSG_NEWPOLICY)
            .filter_map(|m| parse_nd_policy(&m.payload))
            .collect())
    }

    fn throwaway_pair(family: AddressFamily) -> (IpAddr, IpAddr) {
        // Documentation prefixes (RFC 5737 / RFC 3849): never routed, never a
        // real peer, so a transient SA on them cannot capture any traffic.
        match family {
            AddressFamily::V4 => (
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)),
            ),
            AddressFamily::V6 => (
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0x6d73, 1)),
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0x6d73, 2)),
            ),
        }
    }

    fn probe_family(&mut self, aead: Aead, family: AddressFamily) -> Result<(), DatapathError> {
        let (src, dst) = Self::throwaway_pair(family);
        let mut spec = SaSpec {
            src,
            dst,
            spi: 0,
            direction: Direction::In,
            reqid: Reqid::PROBE,
            aead,
            key: vec![0x5a; aead.key_len()],
            replay_window: MIN_INBOUND_REPLAY_WINDOW,
            // If the agent dies mid-probe the kernel removes these by itself.
            lifetimes: Lifetimes {
                hard_seconds: 30,
                soft_seconds: 20,
                ..Default::default()
            },
        };
        let spi = match self.alloc_spi(src, dst, Reqid::PROBE) {
            Ok(spi) => spi,
            Err(e) if e.kind() == ErrorKind::Permission => return Err(permission()),
            Err(e) if e.errno() == Some(libc::EAFNOSUPPORT) => {
                return Err(DatapathError::Unsupported {
                    what: format!("kernel has no {family} XFRM support ({e})"),
                    fix: match family {
                        AddressFamily::V4 => "enable CONFIG_INET".into(),
                        AddressFamily::V6 => "enable IPv6 (CONFIG_IPV6, no ipv6.disable=1)".into(),
                    },
                })
            }
            Err(e) => return Err(e),
        };
        spec.spi = spi;
        let filled = self.update_sa(&spec);
        // Also the outbound flavour (direction/replay-window rules differ).
        let mut out = spec.clone();
        out.direction = Direction::Out;
        let outbound = if filled.is_ok() {
            // A kernel-chosen SPI is free by construction; release its larval
            // SA and add the outbound flavour under it.
            self.alloc_spi(src, dst, Reqid::PROBE).and_then(|s| {
                out.spi = s;
                self.delete_sa(out.id())?;
                self.install_sa(&out)
            })
        } else {
            Ok(())
        };
        let _ = self.delete_sa(spec.id());
        if outbound.is_ok() && filled.is_ok() {
            let _ = self.delete_sa(out.id());
        }
        match filled.and(outbound) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.diagnose(aead, family, e)),
        }
    }

    /// Turn a failed probe SA into one actionable error.
    fn diagnose(&mut self, aead: Aead, family: AddressFamily, e: DatapathError) -> DatapathError {
        let msg = e.kernel_message().unwrap_or("").to_ascii_lowercase();
        if msg.contains("cryptographic") {
            return DatapathError::Unsupported {
                what: format!("kernel could not initialise {} for ESP: no default RNG for the IV generator ({e})", aead.kernel_name()),
                fix: "modprobe drbg (CONFIG_CRYPTO_DRBG)".into(),
            };
        }
        if e.kind() == ErrorKind::Permission {
            return permission();
        }
        let esp_missing = |this: &mut Self| -> bool {
            // Ask about ESP with an algorithm pair almost every kernel has,
            // so "no ESP" and "no such AEAD" can be told apart.
            let (src, dst) = Self::throwaway_pair(family);
            let mut info = sa_message(
                &SaSpec {
                    src,
                    dst,
                    spi: 0x6d73_0100,
                    direction: Direction::In,
                    reqid: Reqid::PROBE,
                    aead: Aead::Aes128Gcm,
                    key: vec![0; 20],
                    replay_window: MIN_INBOUND_REPLAY_WINDOW,
                    lifetimes: Lifetimes {
                        hard_seconds: 30,
                        ..Default::default()
                    },
                },
                KernelFlavor::LEGACY,
            );
            info.nlas = vec![
                XfrmAttrs::EncryptionAlg(Alg {
                    alg_name: name64("cbc(aes)"),
                    alg_key_len: 128,
                    alg_key: vec![0; 16],
                }),
                XfrmAttrs::AuthenticationAlg(Alg {
                    alg_name: name64("hmac(sha256)"),
                    alg_key_len: 256,
                    alg_key: vec![0; 32],
                }),
            ];
            info.user_sa_info.flags = 0;
            let id = SaId {
                dst,
                spi: 0x6d73_0100,
            };
            match this.one(
                Op::Probe,
                &|| id.to_string(),
                XfrmMessage::AddSa(info),
                false,
            ) {
                Ok(_) => {
                    let _ = this.delete_sa(id);
                    false
                }
                Err(e) => {
                    let m = e.kernel_message().unwrap_or("").to_ascii_lowercase();
                    m.contains("type not found") || e.errno() == Some(libc::EPROTONOSUPPORT)
                }
            }
        };
        if e.kind() == ErrorKind::Unsupported || msg.contains("not found") {
            if esp_missing(self) {
                let (opt, module) = match family {
                    AddressFamily::V4 => ("CONFIG_INET_ESP", "esp4"),
                    AddressFamily::V6 => ("CONFIG_INET6_ESP", "esp6"),
                };
                return DatapathError::Unsupported {
                    what: format!("kernel lacks ESP for {family} ({opt}, module {module}); the probe SA failed with: {e}"),
                    fix: format!("modprobe {module}"),
                };
            }
            let fix = match aead {
                Aead::Aes128Gcm | Aead::Aes256Gcm => {
                    "modprobe aesni_intel gcm (or aes_generic gcm ghash_generic; CONFIG_CRYPTO_GCM, CONFIG_CRYPTO_AES)"
                }
                Aead::ChaCha20Poly1305 => {
                    "modprobe chacha20poly1305 chacha_x86_64 poly1305_x86_64 (CONFIG_CRYPTO_CHACHA20POLY1305)"
                }
            };
            return DatapathError::Unsupported {
                what: format!("algorithm {} unavailable ({e})", aead.kernel_name()),
                fix: fix.into(),
            };
        }
        e
    }

    fn pipeline(&mut self, reqs: Vec<(Op, String, XfrmMessage)>) -> Vec<Result<(), DatapathError>> {
        let (meta, msgs): (Vec<(Op, String)>, Vec<Request>) = reqs
            .into_iter()
            .map(|(op, t, msg)| ((op, t), Request { msg, dump: false }))
            .unzip();
        match self.sock.transact(&msgs) {
            Ok(outcomes) => outcomes
                .into_iter()
                .zip(meta)
                .map(|(o, (op, target))| match o {
                    Outcome::Done(_) => Ok(()),
                    Outcome::Error { errno, message } => Err(DatapathError::Kernel {
                        op,
                        target,
                        errno,
                        message,
                    }),
                })
                .collect(),
            Err(e) => meta
                .into_iter()
                .map(|(op, _)| {
                    Err(DatapathError::Io {
                        op,
                        source: std::io::Error::new(e.kind(), e.to_string()),
                    })
                })
                .collect(),
        }
    }
}

fn permission() -> DatapathError {
    DatapathError::Unsupported {
        what: "permission denied on XFRM netlink".into(),
        fix: "run meshsec as root or grant it CAP_NET_ADMIN".into(),
    }
}

impl Datapath for XfrmDatapath {
    fn probe(&mut self, aead: Aead, families: &[AddressFamily]) -> Result<(), DatapathError> {
        // Reading the policy table needs CAP_NET_ADMIN too: fail early and clearly.
        if let Err(e) = self.dump_policies() {
            return Err(if e.kind() == ErrorKind::Permission {
                permission()
            } else {
                e
            });
        }
        for f in families {
            self.probe_family(aead, *f)?;
        }
        Ok(())
    }

    fn alloc_spi(&mut self, src: IpAddr, dst: IpAddr, reqid: Reqid) -> Result<u32, DatapathError> {
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(DatapathError::Invalid {
                op: Op::AllocSpi,
                reason: format!("mixed address families {src} -> {dst}"),
            });
        }
        let msg = XfrmMessage::AllocSpi(alloc_spi_message(src, dst, reqid, self.flavor));
        let msgs = self.one(Op::AllocSpi, &|| format!("esp {src} -> {dst}"), msg, false)?;
        for m in &msgs {
            if m.ty == XFRM_MSG_NEWSA && m.payload.len() >= XFRM_USER_SA_INFO_LEN {
                if let Ok(info) = UserSaInfo::parse(&m.payload[..XFRM_USER_SA_INFO_LEN]) {
                    return Ok(info.id.spi);
                }
            }
        }
        Err(DatapathError::Decode {
            op: Op::AllocSpi,
            reason: "no SA in the ALLOCSPI answer".into(),
        })
    }

    fn install_sa(&mut self, sa: &SaSpec) -> Result<(), DatapathError> {
        validate_sa(Op::NewSa, sa)?;
        let id = sa.id();
        self.one(
            Op::NewSa,
            &|| id.to_string(),
            XfrmMessage::AddSa(sa_message(sa, self.flavor)),
            false,
        )
        .map(|_| ())
    }

    fn update_sa(&mut self, sa: &SaSpec) -> Result<(), DatapathError> {
        validate_sa(Op::UpdSa, sa)?;
        let id = sa.id();
        // UPDSA would also rewrite somebody else's SA: check first.
        if self.get_sa(Op::UpdSa, id)?.is_none() {
            return Err(DatapathError::NotOwned {
                op: Op::UpdSa,
                target: id.to_string(),
                why: "reqid, protocol or mode is not meshsec's".into(),
            });
        }
        self.one(
            Op::UpdSa,
            &|| id.to_string(),
            XfrmMessage::UpdateSa(sa_message(sa, self.flavor)),
            false,
        )
        .map(|_| ())
    }

    fn delete_sa(&mut self, id: SaId) -> Result<(), DatapathError> {
        match self.get_sa(Op::DelSa, id)? {
            None => Err(DatapathError::NotOwned {
                op: Op::DelSa,
                target: id.to_string(),
                why: "reqid, protocol or mode is not meshsec's".into(),
            }),
            Some(_) => self
                .one(
                    Op::DelSa,
                    &|| id.to_string(),
                    XfrmMessage::DeleteSa(sa_id_message(id)),
                    false,
                )
                .map(|_| ()),
        }
    }

    fn ensure_nd_bypass(&mut self) -> Result<(), DatapathError> {
        if self.nd_bypass_seen {
            return Ok(());
        }
        for (dir, ty) in ND_BYPASS {
            let target = || {
                format!(
                    "ICMPv6 type {ty} bypass dir {}",
                    if dir == XFRM_POLICY_IN { "in" } else { "out" }
                )
            };
            match self.one(
                Op::NewPolicy,
                &target,
                XfrmMessage::AddPolicy(nd_policy_message(dir, ty)),
                false,
            ) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        // EEXIST may also mean somebody else's policy sits on that selector:
        // only a dump says whether all four are ours.
        let n = self.nd_indexes()?.len();
        if n != ND_BYPASS.len() {
            return Err(DatapathError::NotOwned {
                op: Op::NewPolicy,
                target: "IPv6 neighbour-discovery bypass".into(),
                why: format!(
                    "only {n} of 4 bypass selectors are meshsec's; another policy holds the rest"
                ),
            });
        }
        self.nd_bypass_seen = true;
        Ok(())
    }

    fn nd_bypass_count(&mut self) -> Result<usize, DatapathError> {
        Ok(self.nd_indexes()?.len())
    }

    fn remove_nd_bypass(&mut self) -> Result<usize, DatapathError> {
        self.nd_bypass_seen = false;
        let mut removed = 0;
        for index in self.nd_indexes()? {
            // The kernel encodes a policy's direction in its index (index % 8);
            // deleting by index needs both.
            let msg = PolicyDelGetMessage {
                user_policy_id: UserPolicyId {
                    selector: Selector::default(),
                    index,
                    direction: (index % 8) as u8,
                },
                nlas: Vec::new(),
            };
            match self.one(
                Op::DelPolicy,
                &|| format!("ND bypass policy index {index}"),
                XfrmMessage::DeletePolicy(msg),
                false,
            ) {
                Ok(_) => removed += 1,
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(removed)
    }

    fn install_policy(&mut self, policy: &PolicySpec) -> Result<(), DatapathError> {
        validate_policy(Op::NewPolicy, policy)?;
        if policy.id.src.is_ipv6() {
            self.ensure_nd_bypass()?;
        }
        let id = policy.id;
        self.one(
            Op::NewPolicy,
            &|| id.to_string(),
            XfrmMessage::AddPolicy(policy_message(policy)),
            false,
        )
        .map(|_| ())
    }

    fn delete_policy(&mut self, id: PolicyId) -> Result<(), DatapathError> {
        match self.get_policy(Op::DelPolicy, id)? {
            None => Err(DatapathError::NotOwned {
                op: Op::DelPolicy,
                target: id.to_string(),
                why: "priority or template is not meshsec's".into(),
            }),
            // Delete by index: exactly the policy that was checked.
            Some(p) => self
                .one(
                    Op::DelPolicy,
                    &|| id.to_string(),
                    XfrmMessage::DeletePolicy(policy_id_message(id, p.index)),
                    false,
                )
                .map(|_| ()),
        }
    }

    fn dump_sas(&mut self) -> Result<Vec<SaState>, DatapathError> {
        let msgs = self.one(
            Op::DumpSa,
            &String::new,
            XfrmMessage::GetDumpSa(GetDumpMessage::default()),
            true,
        )?;
        Ok(sort_sas(
            msgs.iter()
                .filter(|m| m.ty == XFRM_MSG_NEWSA)
                .filter_map(|m| parse_sa(&m.payload))
                .collect(),
        ))
    }

    fn dump_policies(&mut self) -> Result<Vec<PolicyState>, DatapathError> {
        let msgs = self.one(
            Op::DumpPolicy,
            &String::new,
            XfrmMessage::GetPolicy(PolicyDelGetMessage::default()),
            true,
        )?;
        Ok(sort_policies(
            msgs.iter()
                .filter(|m| m.ty == XFRM_MSG_NEWPOLICY)
                .filter_map(|m| parse_policy(&m.payload))
                .collect(),
        ))
    }

    fn apply(&mut self, changes: &[Change]) -> Vec<Result<(), DatapathError>> {
        // Ownership of delete targets is checked against one dump each, then
        // every request is pipelined.
        let needs_sa = changes
            .iter()
            .any(|c| matches!(c, Change::DeleteSa(_) | Change::FillSa(_)));
        let needs_pol = changes.iter().any(|c| matches!(c, Change::DeletePolicy(_)));
        let owned_sas: Result<BTreeSet<SaId>, DatapathError> = if needs_sa {
            self.dump_sas().map(|v| v.iter().map(|s| s.id()).collect())
        } else {
            Ok(BTreeSet::new())
        };
        let owned_pols: Result<BTreeMap<PolicyId, u32>, DatapathError> = if needs_pol {
            self.dump_policies()
                .map(|v| v.iter().map(|p| (p.spec.id, p.index)).collect())
        } else {
            Ok(BTreeMap::new())
        };
        let mut results: Vec<Option<Result<(), DatapathError>>> =
            (0..changes.len()).map(|_| None).collect();
        if changes
            .iter()
            .any(|c| matches!(c, Change::AddPolicy(p) if p.id.src.is_ipv6()))
        {
            if let Err(e) = self.ensure_nd_bypass() {
                let msg = e.to_string();
                for (i, c) in changes.iter().enumerate() {
                    if matches!(c, Change::AddPolicy(p) if p.id.src.is_ipv6()) {
                        results[i] = Some(Err(DatapathError::Invalid {
                            op: Op::NewPolicy,
                            reason: msg.clone(),
                        }));
                    }
                }
            }
        }
        let mut reqs = Vec::new();
        let mut slots = Vec::new();
        for (i, c) in changes.iter().enumerate() {
            let req = match c {
                Change::AddSa(sa) => validate_sa(Op::NewSa, sa).map(|()| {
                    (
                        Op::NewSa,
                        sa.id().to_string(),
                        XfrmMessage::AddSa(sa_message(sa, self.flavor)),
                    )
                }),
                Change::FillSa(sa) => match (validate_sa(Op::UpdSa, sa), &owned_sas) {
                    (Err(e), _) => Err(e),
                    (Ok(()), Err(e)) => Err(DatapathError::Decode {
                        op: Op::UpdSa,
                        reason: e.to_string(),
                    }),
                    (Ok(()), Ok(set)) if set.contains(&sa.id()) => Ok((
                        Op::UpdSa,
                        sa.id().to_string(),
                        XfrmMessage::UpdateSa(sa_message(sa, self.flavor)),
                    )),
                    (Ok(()), Ok(_)) => {
                        results[i] = Some(self.update_sa(sa));
                        continue;
                    }
                },
                Change::AddPolicy(_) if results[i].is_some() => continue,
                Change::AddPolicy(p) => validate_policy(Op::NewPolicy, p).map(|()| {
                    (
                        Op::NewPolicy,
                        p.id.to_string(),
                        XfrmMessage::AddPolicy(policy_message(p)),
                    )
                }),
                Change::DeleteSa(id) => match &owned_sas {
                    Err(e) => Err(DatapathError::Decode {
                        op: Op::DelSa,
                        reason: e.to_string(),
                    }),
                    Ok(set) if set.contains(id) => Ok((
                        Op::DelSa,
                        id.to_string(),
                        XfrmMessage::DeleteSa(sa_id_message(*id)),
                    )),
                    // Not ours or not there: the single-op path tells which.
                    Ok(_) => {
                        results[i] = Some(self.delete_sa(*id));
                        continue;
                    }
                },
                Change::DeletePolicy(id) => match &owned_pols {
                    Err(e) => Err(DatapathError::Decode {
                        op: Op::DelPolicy,
                        reason: e.to_string(),
                    }),
                    Ok(map) => match map.get(id) {
                        Some(index) => Ok((
                            Op::DelPolicy,
                            id.to_string(),
                            XfrmMessage::DeletePolicy(policy_id_message(*id, *index)),
                        )),
                        None => {
                            results[i] = Some(self.delete_policy(*id));
                            continue;
                        }
                    },
                },
            };
            match req {
                Ok(r) => {
                    reqs.push(r);
                    slots.push(i);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        for (slot, r) in slots.into_iter().zip(self.pipeline(reqs)) {
            results[slot] = Some(r);
        }
        results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect()
    }
}

#[cfg(test)]
mod tests;
