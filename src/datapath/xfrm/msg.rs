//! The XFRM netlink messages of meshsec's SAs and policies: pure functions,
//! specs in, message bodies out, and payload bytes in, states out. Unit tested
//! byte by byte in `tests.rs`.

use std::net::IpAddr;

use netlink_packet_core::DefaultNla;
use netlink_packet_core::Parseable;
use netlink_packet_xfrm::{
    policy::{DelGetMessage as PolicyDelGetMessage, ModifyMessage as PolicyModifyMessage},
    state::{AllocSpiMessage, DelGetMessage as SaDelGetMessage, ModifyMessage as SaModifyMessage},
    Address, Alg, AlgAead, Id, LifetimeConfig, ReplayEsn, Selector, UserPolicyId, UserPolicyInfo,
    UserSaId, UserSaInfo, UserSpiInfo, UserTemplate, XfrmAttrs, AF_INET, AF_INET6, IPPROTO_ESP,
    XFRM_INF, XFRM_MODE_TRANSPORT, XFRM_POLICY_ALLOW, XFRM_POLICY_BLOCK, XFRM_POLICY_IN,
    XFRM_POLICY_OUT, XFRM_SHARE_ANY, XFRM_STATE_ESN, XFRM_USER_POLICY_INFO_LEN,
    XFRM_USER_SA_INFO_LEN,
};

use super::super::ownership::{
    is_owned_reqid, ND_BYPASS_PRIORITY, POLICY_PRIORITY, PROTECT_BLOCK_PRIORITY,
    PROTECT_EXEMPT_PRIORITY,
};
use super::super::{
    Aead, Direction, ForeignPolicy, Lifetimes, PolicyId, PolicySpec, PolicyState, Prefix,
    RangePolicy, RangeRule, Reqid, SaCounters, SaId, SaSpec, SaState, ICV_BITS,
    MIN_INBOUND_REPLAY_WINDOW,
};
use super::KernelFlavor;

/// `XFRMA_SA_DIR` (Linux ≥ 6.10), not in netlink-packet-xfrm 0.5.
pub(crate) const XFRMA_SA_DIR: u16 = 33;
const XFRM_SA_DIR_IN: u8 = 1;
const XFRM_SA_DIR_OUT: u8 = 2;

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

pub(super) fn name64(name: &str) -> [u8; 64] {
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
            alg_key_len: (sa.key.as_bytes().len() * 8) as u32,
            alg_icv_len: ICV_BITS,
            alg_key: sa.key.as_bytes().to_vec(),
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

pub(super) fn sa_id_message(id: SaId) -> SaDelGetMessage {
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

pub(super) fn policy_id_message(id: PolicyId, index: u32) -> PolicyDelGetMessage {
    PolicyDelGetMessage {
        user_policy_id: UserPolicyId {
            selector: host_selector(id.src, id.dst),
            index,
            direction: policy_dir(id.direction),
        },
        nlas: Vec::new(),
    }
}

fn range_selector(p: &RangePolicy) -> Selector {
    let mut s = Selector::default();
    s.source_prefix(&p.src.addr(), p.src.len());
    s.destination_prefix(&p.dst.addr(), p.dst.len());
    s.ifindex = p.ifindex();
    s
}

fn range_priority_action(rule: RangeRule) -> (u32, u8) {
    match rule {
        RangeRule::Block => (PROTECT_BLOCK_PRIORITY, XFRM_POLICY_BLOCK),
        RangeRule::Exempt => (PROTECT_EXEMPT_PRIORITY, XFRM_POLICY_ALLOW),
    }
}

/// The `XFRM_MSG_NEWPOLICY` body of a strict-mode range policy: prefix
/// selectors, all protocols, no template; block or (exemption) allow.
pub(crate) fn range_policy_message(p: &RangePolicy) -> PolicyModifyMessage {
    let (priority, action) = range_priority_action(p.rule);
    PolicyModifyMessage {
        user_policy_info: UserPolicyInfo {
            selector: range_selector(p),
            lifetime_cfg: LifetimeConfig::default(),
            priority,
            direction: policy_dir(p.direction),
            action,
            share: XFRM_SHARE_ANY,
            ..Default::default()
        },
        nlas: Vec::new(),
    }
}

/// Delete (or get) a range policy by its kernel index.
pub(super) fn range_id_message(p: &RangePolicy, index: u32) -> PolicyDelGetMessage {
    PolicyDelGetMessage {
        user_policy_id: UserPolicyId {
            selector: range_selector(p),
            index,
            direction: policy_dir(p.direction),
        },
        nlas: Vec::new(),
    }
}

/// Recognise one of strict mode's range policies by the ownership rule
/// (see [`super::super::ownership`]); returns it with its kernel index.
/// Never panics on short or hostile input.
pub(crate) fn parse_range_policy(payload: &[u8]) -> Option<(RangePolicy, u32)> {
    if payload.len() < XFRM_USER_POLICY_INFO_LEN {
        return None;
    }
    let msg = PolicyModifyMessage::parse(payload).ok()?;
    let i = &msg.user_policy_info;
    let rule = match (i.priority, i.action) {
        (PROTECT_BLOCK_PRIORITY, XFRM_POLICY_BLOCK) => RangeRule::Block,
        (PROTECT_EXEMPT_PRIORITY, XFRM_POLICY_ALLOW) => RangeRule::Exempt,
        _ => return None,
    };
    let direction = match i.direction {
        XFRM_POLICY_IN => Direction::In,
        XFRM_POLICY_OUT => Direction::Out,
        _ => return None,
    };
    for nla in &msg.nlas {
        match nla {
            XfrmAttrs::Template(_) => return None,
            XfrmAttrs::Mark(m) if m.mask != 0 => return None,
            XfrmAttrs::IfId(id) if *id != 0 => return None,
            _ => {}
        }
    }
    let s = &i.selector;
    if s.proto != 0 || s.sport_mask != 0 || s.dport_mask != 0 || s.user != 0 {
        return None;
    }
    let max = host_prefix_for(s.family)?;
    if s.prefixlen_s > max || s.prefixlen_d > max {
        return None;
    }
    let p = RangePolicy {
        src: Prefix::new(addr_of(&s.saddr, s.family)?, s.prefixlen_s)?,
        dst: Prefix::new(addr_of(&s.daddr, s.family)?, s.prefixlen_d)?,
        direction,
        rule,
    };
    (p.ifindex() == s.ifindex).then_some((p, i.index))
}

const IPPROTO_ICMPV6: u8 = 58;
/// (policy direction, ICMPv6 type) of the neighbour-discovery bypasses.
pub(super) const ND_BYPASS: [(u8, u16); 4] = [
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

/// Parse one policy from a `XFRM_MSG_NEWPOLICY` payload if it is somebody
/// else's (not meshsec's by the ownership rule, not one of its ND bypasses)
/// and a global `in` or `out` policy; `None` otherwise or if it does not
/// decode (never panics on short input).
pub(crate) fn parse_foreign_policy(payload: &[u8]) -> Option<ForeignPolicy> {
    if payload.len() < XFRM_USER_POLICY_INFO_LEN
        || parse_policy(payload).is_some()
        || parse_nd_policy(payload).is_some()
        || parse_range_policy(payload).is_some()
    {
        return None;
    }
    let msg = PolicyModifyMessage::parse(payload).ok()?;
    let i = &msg.user_policy_info;
    let direction = match i.direction {
        XFRM_POLICY_IN => Direction::In,
        XFRM_POLICY_OUT => Direction::Out,
        // fwd, and the per-socket directions (XFRM_POLICY_MAX + dir).
        _ => return None,
    };
    let s = &i.selector;
    let max = host_prefix_for(s.family)?;
    let mut templates = 0;
    let mut marked = false;
    for nla in &msg.nlas {
        match nla {
            XfrmAttrs::Template(t) => templates = t.len(),
            XfrmAttrs::Mark(m) if m.mask != 0 => marked = true,
            XfrmAttrs::IfId(id) if *id != 0 => marked = true,
            _ => {}
        }
    }
    Some(ForeignPolicy {
        index: i.index,
        direction,
        priority: i.priority,
        src: addr_of(&s.saddr, s.family)?,
        src_len: s.prefixlen_s.min(max),
        dst: addr_of(&s.daddr, s.family)?,
        dst_len: s.prefixlen_d.min(max),
        proto: s.proto,
        block: i.action != XFRM_POLICY_ALLOW,
        templates,
        marked,
    })
}

fn host_prefix_for(family: u16) -> Option<u8> {
    match family {
        AF_INET => Some(32),
        AF_INET6 => Some(128),
        _ => None,
    }
}
