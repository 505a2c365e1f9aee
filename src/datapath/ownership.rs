//! How meshsec recognises its own XFRM objects (documented in docs/xfrm.md).
//!
//! - Every SA meshsec creates carries a reqid whose upper 16 bits are
//!   [`REQID_PREFIX`] (`0x6d73`, ASCII "ms").
//! - Every policy meshsec creates has priority [`POLICY_PRIORITY`] and exactly
//!   one ESP transport template whose reqid carries the same prefix.
//!
//! An SA is meshsec's iff proto = ESP, mode = transport and the reqid carries
//! the prefix. A policy is meshsec's iff its priority is `POLICY_PRIORITY`,
//! it has no mark / if_id and its single template's reqid carries the prefix.
//! The four IPv6 neighbour-discovery bypass policies are meshsec's iff their
//! priority is [`ND_BYPASS_PRIORITY`], they have no template, and their
//! selector is `::/0 -> ::/0`, ICMPv6, type 135 or 136.
//! Strict mode's range policies (`--protect`, see [`super::protect`]) are
//! meshsec's iff they have no template, no mark / if_id, a selector on all
//! protocols and ports, and either priority [`PROTECT_BLOCK_PRIORITY`] with
//! action block (interface any), or priority [`PROTECT_EXEMPT_PRIORITY`]
//! with action allow (`in`: interface `lo`; `out`: a host destination).
//! Both conditions are checked before any delete, and dumps filter by them,
//! so meshsec never reads, deletes or flushes anybody else's entries.

use std::fmt;

/// Upper 16 bits of every meshsec reqid ("ms").
pub const REQID_PREFIX: u16 = 0x6d73;

/// Priority of every meshsec policy. Lower wins in Linux; this value is
/// below the range strongSwan computes (≈ 100k-400k) so a host-pair policy
/// of meshsec takes precedence over a broader site-to-site one, and above 0
/// (the `ip xfrm` default) so an administrator's manual policy still wins.
pub const POLICY_PRIORITY: u32 = 0x6d73; // 28019

/// Priority of meshsec's IPv6 neighbour-discovery bypass policies: one
/// better than [`POLICY_PRIORITY`] so they win over the host-pair policies.
/// They have no template, ICMPv6 selectors on `::/0` and types 135/136.
pub const ND_BYPASS_PRIORITY: u32 = POLICY_PRIORITY - 1;

/// Priority of strict mode's exemptions for the host's own traffic (allow,
/// no template): after the per-peer policies (whose selectors never name
/// our own address as the peer), before the range blocks.
pub const PROTECT_EXEMPT_PRIORITY: u32 = POLICY_PRIORITY + 1;

/// Priority of strict mode's range blocks: after every other meshsec
/// policy, so a member's host-pair policy (with its SAs) wins inside a
/// protected range and everything else there is dropped.
pub const PROTECT_BLOCK_PRIORITY: u32 = POLICY_PRIORITY + 2;

/// A meshsec-owned reqid: `0x6d73_xxxx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reqid(u32);

impl Reqid {
    /// The reqid meshsec uses for all peer SAs and policies unless the caller
    /// wants per-peer reqids. (Transport-mode lookups are by address and SPI,
    /// so one reqid for every peer is enough.)
    pub const DEFAULT: Reqid = Reqid(((REQID_PREFIX as u32) << 16) | 1);

    /// Reserved for the start-up probe's throwaway SAs.
    pub const PROBE: Reqid = Reqid(((REQID_PREFIX as u32) << 16) | 0xffff);

    /// A meshsec reqid with the given low 16 bits. `0xffff` is the probe's;
    /// `0` is not allowed (reqid 0 means "any" in templates).
    pub fn new(low: u16) -> Option<Reqid> {
        if low == 0 || low == 0xffff {
            return None;
        }
        Some(Reqid(((REQID_PREFIX as u32) << 16) | low as u32))
    }

    /// Interpret a raw kernel reqid; `None` if it is not meshsec's.
    pub fn from_raw(raw: u32) -> Option<Reqid> {
        if is_owned_reqid(raw) && raw as u16 != 0 {
            Some(Reqid(raw))
        } else {
            None
        }
    }

    /// The raw value sent to the kernel.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Reqid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:08x}", self.0)
    }
}

/// Does a raw reqid carry meshsec's prefix?
pub fn is_owned_reqid(raw: u32) -> bool {
    (raw >> 16) as u16 == REQID_PREFIX
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reqid_prefix() {
        assert_eq!(Reqid::DEFAULT.get(), 0x6d73_0001);
        assert_eq!(Reqid::new(7).unwrap().get(), 0x6d73_0007);
        assert!(Reqid::new(0).is_none());
        assert!(Reqid::new(0xffff).is_none());
        assert!(Reqid::from_raw(0x6d73_0002).is_some());
        assert!(Reqid::from_raw(0x6d73_0000).is_none());
        assert!(Reqid::from_raw(1).is_none());
        assert!(Reqid::from_raw(0x6d74_0001).is_none());
        assert!(is_owned_reqid(Reqid::PROBE.get()));
    }
}
