//! Strict mode (`--protect CIDR`): range policies that keep traffic between
//! this host and a protected range from ever leaving or arriving in clear.
//!
//! Per range, two `block` policies (priority
//! [`super::ownership::PROTECT_BLOCK_PRIORITY`]): `out` from any address to
//! the range, `in` from the range to any address. meshsec's per-peer
//! policies (better priority) win for members with SAs; everything else to
//! or from the range is dropped, including members whose link is not keyed
//! yet and members that left. The agent's own gossip and handshake sockets
//! carry per-socket bypasses, which win over every global policy, and the
//! IPv6 neighbour-discovery bypasses (types 135/136) win too.
//!
//! The host talking to itself must keep working: local traffic goes over
//! `lo`, and IPv6 (unlike IPv4, whose `lo` has `disable_xfrm` and
//! `disable_policy` set) looks up XFRM policies for it. Two kinds of
//! exemptions (allow, no template, priority
//! [`super::ownership::PROTECT_EXEMPT_PRIORITY`]) take care of that: `in`
//! from the range to any address *on `lo` only* (selector ifindex 1: only
//! packets the host sent itself arrive there), and `out` from any address
//! to each of our own data addresses inside the range (a packet to our own
//! address never leaves the host). `fwd` policies are not needed: transport
//! mode protects the host's own traffic, and forwarded traffic is a
//! router's business, not a host's.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use super::{prefix_covers, AddressFamily, Direction};

/// The loopback interface's index (fixed at 1 in every network namespace).
pub const LOOPBACK_IFINDEX: i32 = 1;

/// An address prefix (`ADDR/LEN`) with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    /// `addr/len`, if `len` fits the family and no host bit is set.
    pub fn new(addr: IpAddr, len: u8) -> Option<Prefix> {
        let max = Self::max_len(AddressFamily::of(addr));
        if len > max {
            return None;
        }
        let p = Prefix { addr, len };
        (Self::masked(addr, len) == addr).then_some(p)
    }

    /// The single address `addr` (/32 or /128).
    pub fn host(addr: IpAddr) -> Prefix {
        Prefix {
            addr,
            len: Self::max_len(AddressFamily::of(addr)),
        }
    }

    /// Every address of a family (`0.0.0.0/0`, `::/0`).
    pub fn any(family: AddressFamily) -> Prefix {
        Prefix {
            addr: match family {
                AddressFamily::V4 => IpAddr::from([0u8; 4]),
                AddressFamily::V6 => IpAddr::from([0u8; 16]),
            },
            len: 0,
        }
    }

    fn max_len(family: AddressFamily) -> u8 {
        match family {
            AddressFamily::V4 => 32,
            AddressFamily::V6 => 128,
        }
    }

    fn masked(addr: IpAddr, len: u8) -> IpAddr {
        match addr {
            IpAddr::V4(a) => {
                let m = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                IpAddr::from((u32::from(a) & m).to_be_bytes())
            }
            IpAddr::V6(a) => {
                let m = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                IpAddr::from((u128::from(a) & m).to_be_bytes())
            }
        }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn len(&self) -> u8 {
        self.len
    }

    /// Whether this is a zero-length prefix (every address of its family).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address family.
    pub fn family(&self) -> AddressFamily {
        AddressFamily::of(self.addr)
    }

    /// Whether `addr` is inside.
    pub fn contains(&self, addr: IpAddr) -> bool {
        prefix_covers(self.addr, self.len, addr)
    }

    /// Whether the two prefixes share an address.
    pub fn overlaps(&self, other: &Prefix) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = String;

    /// `ADDR/LEN`, or a bare address (a single host). The reason on error
    /// reads after the text, e.g. `"10.0.0.1/24" has host bits set …`.
    fn from_str(s: &str) -> Result<Prefix, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR range (ADDR/LEN)"))?;
        let max = Self::max_len(AddressFamily::of(addr));
        let len = match l {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("{s:?} has an invalid prefix length (0-{max})"))?,
        };
        Prefix::new(addr, len).ok_or_else(|| {
            format!(
                "{s:?} has host bits set (did you mean {}/{len}?)",
                Self::masked(addr, len)
            )
        })
    }
}

/// Ranges a protected range must not touch: traffic there is the host's own
/// (loopback, unspecified) or link-scoped machinery (IPv6 link-local carries
/// router advertisements and redirects, multicast carries MLD and DAD) that
/// no peer could ever key.
pub fn reserved_overlap(range: &Prefix) -> Option<(&'static str, Prefix)> {
    const RESERVED: [(&str, &str); 10] = [
        ("0.0.0.0/8", "\"this network\""),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved and broadcast"),
        ("::/128", "the unspecified address"),
        ("::1/128", "loopback"),
        ("fe80::/10", "link-local (router advertisements, redirects)"),
        ("ff00::/8", "multicast (neighbour discovery, MLD)"),
        // IPv4 packets never match an IPv6 selector: such a range protects nothing.
        (
            "::ffff:0:0/96",
            "IPv4-mapped addresses (protect the IPv4 range itself)",
        ),
    ];
    RESERVED.iter().find_map(|(p, what)| {
        let p: Prefix = p.parse().expect("constant prefixes parse");
        range.overlaps(&p).then_some((*what, p))
    })
}

/// What a range policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RangeRule {
    /// Drop (`action block`).
    Block,
    /// Let the host's own traffic through (`allow`, no template): `in` only
    /// on `lo`, `out` only to one of our own addresses.
    Exempt,
}

/// One of strict mode's policies. Identity is the whole value: selector,
/// direction and rule (the rule fixes priority, action and, for an `in`
/// exemption, the `lo` interface).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RangePolicy {
    /// Selector source.
    pub src: Prefix,
    /// Selector destination.
    pub dst: Prefix,
    /// In or out.
    pub direction: Direction,
    /// Block or exempt.
    pub rule: RangeRule,
}

impl RangePolicy {
    /// The two block policies of a protected range.
    pub fn block(range: Prefix) -> [RangePolicy; 2] {
        let any = Prefix::any(range.family());
        [
            RangePolicy {
                src: any,
                dst: range,
                direction: Direction::Out,
                rule: RangeRule::Block,
            },
            RangePolicy {
                src: range,
                dst: any,
                direction: Direction::In,
                rule: RangeRule::Block,
            },
        ]
    }

    /// Inbound exemption of a range on `lo` (the host's own packets).
    pub fn loopback_in(range: Prefix) -> RangePolicy {
        RangePolicy {
            src: range,
            dst: Prefix::any(range.family()),
            direction: Direction::In,
            rule: RangeRule::Exempt,
        }
    }

    /// Outbound exemption of one of our own addresses.
    pub fn local_out(addr: IpAddr) -> RangePolicy {
        RangePolicy {
            src: Prefix::any(AddressFamily::of(addr)),
            dst: Prefix::host(addr),
            direction: Direction::Out,
            rule: RangeRule::Exempt,
        }
    }

    /// Selector interface index: `lo` for the inbound exemption, else any.
    pub fn ifindex(&self) -> i32 {
        match (self.rule, self.direction) {
            (RangeRule::Exempt, Direction::In) => LOOPBACK_IFINDEX,
            _ => 0,
        }
    }

    /// Whether the pair is well-formed (one family); dumps skip others.
    pub fn is_valid(&self) -> bool {
        self.src.family() == self.dst.family()
    }
}

impl fmt::Display for RangePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = match self.direction {
            Direction::In => "in",
            Direction::Out => "out",
        };
        let what = match self.rule {
            RangeRule::Block => "block",
            RangeRule::Exempt => "exempt",
        };
        write!(f, "{what} policy {} -> {} dir {dir}", self.src, self.dst)?;
        if self.ifindex() == LOOPBACK_IFINDEX {
            f.write_str(" dev lo")?;
        }
        Ok(())
    }
}

/// Every policy strict mode wants for `ranges`, given our own addresses
/// (`self_addrs`): the blocks of each range, its inbound `lo` exemption,
/// and an outbound exemption for each of our addresses inside it.
pub fn range_policies(ranges: &[Prefix], self_addrs: &[IpAddr]) -> Vec<RangePolicy> {
    let mut out = std::collections::BTreeSet::new();
    for r in ranges {
        // A range that is just our own address has nothing to block outbound
        // (the packets never leave) and its block would take the selector
        // of our exemption.
        let [block_out, block_in] = RangePolicy::block(*r);
        if !self_addrs.iter().any(|a| Prefix::host(*a) == *r) {
            out.insert(block_out);
        }
        out.insert(block_in);
        out.insert(RangePolicy::loopback_in(*r));
        for a in self_addrs.iter().filter(|a| r.contains(**a)) {
            out.insert(RangePolicy::local_out(*a));
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn prefixes_parse_and_reject() {
        assert_eq!(p("10.0.0.0/24").to_string(), "10.0.0.0/24");
        assert_eq!(p("fd00::/64").len(), 64);
        assert_eq!(p("10.1.2.3"), Prefix::host("10.1.2.3".parse().unwrap()));
        let e = "10.0.0.1/24".parse::<Prefix>().unwrap_err();
        assert!(e.contains("host bits") && e.contains("10.0.0.0/24"), "{e}");
        assert!("10.0.0.0/33"
            .parse::<Prefix>()
            .unwrap_err()
            .contains("0-32"));
        assert!("fd00::/129".parse::<Prefix>().is_err());
        assert!("nonsense".parse::<Prefix>().unwrap_err().contains("CIDR"));
        assert!("10.0.0.0/x".parse::<Prefix>().is_err());
        assert!(p("10.0.0.0/8").overlaps(&p("10.9.0.0/16")));
        assert!(p("10.9.0.0/16").overlaps(&p("10.0.0.0/8")));
        assert!(!p("10.9.0.0/16").overlaps(&p("10.8.0.0/16")));
        assert!(!p("10.0.0.0/8").overlaps(&p("fd00::/8")));
    }

    #[test]
    fn reserved_ranges_are_refused() {
        assert!(reserved_overlap(&p("0.0.0.0/0")).is_some());
        assert!(reserved_overlap(&p("::/0")).is_some());
        assert_eq!(reserved_overlap(&p("127.0.0.0/16")).unwrap().0, "loopback");
        assert!(reserved_overlap(&p("::ffff:10.0.0.0/104")).is_some());
        assert!(reserved_overlap(&p("fe80::/64")).is_some());
        assert!(reserved_overlap(&p("ff02::/16")).is_some());
        assert!(reserved_overlap(&p("10.0.0.0/8")).is_none());
        assert!(reserved_overlap(&p("fd00::/8")).is_none());
        assert!(reserved_overlap(&p("2001:db8::/32")).is_none());
    }

    #[test]
    fn policies_of_ranges() {
        let me4: IpAddr = "10.0.0.1".parse().unwrap();
        let me6: IpAddr = "fd00::1".parse().unwrap();
        let outside: IpAddr = "192.0.2.1".parse().unwrap();
        let got = range_policies(&[p("10.0.0.0/24"), p("fd00::/64")], &[me4, me6, outside]);
        // Per range: 2 blocks, 1 lo exemption, 1 exemption per own address inside.
        assert_eq!(got.len(), 8, "{got:#?}");
        assert!(got.contains(&RangePolicy::local_out(me6)));
        assert!(!got.contains(&RangePolicy::local_out(outside)));
        let lo = RangePolicy::loopback_in(p("fd00::/64"));
        assert_eq!(lo.ifindex(), LOOPBACK_IFINDEX);
        assert_eq!(
            lo.to_string(),
            "exempt policy fd00::/64 -> ::/0 dir in dev lo"
        );
        assert_eq!(
            RangePolicy::block(p("10.0.0.0/24"))[0].to_string(),
            "block policy 0.0.0.0/0 -> 10.0.0.0/24 dir out"
        );
        // Overlapping ranges each get their own policies; duplicates merge.
        let twice = range_policies(&[p("10.0.0.0/24"), p("10.0.0.0/24")], &[]);
        assert_eq!(twice.len(), 3);
    }
}
