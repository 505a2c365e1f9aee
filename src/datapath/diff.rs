//! Pure reconciliation: desired vs actual XFRM state → ordered changes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::{PolicyId, PolicySpec, PolicyState, RangePolicy, RangeRule, SaId, SaSpec, SaState};

/// One change to the kernel's tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Install an SA (`NEWSA`).
    AddSa(SaSpec),
    /// Fill the larval SA that `alloc_spi` reserved under this SPI (`UPDSA`).
    FillSa(SaSpec),
    /// Delete a meshsec-owned SA.
    DeleteSa(SaId),
    /// Install a policy.
    AddPolicy(PolicySpec),
    /// Delete a meshsec-owned policy.
    DeletePolicy(PolicyId),
    /// Install one of strict mode's range policies.
    AddRange(RangePolicy),
    /// Delete one of strict mode's range policies.
    DeleteRange(RangePolicy),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::AddSa(sa) => write!(
                f,
                "add {} src {} reqid {} {}",
                sa.id(),
                sa.src,
                sa.reqid,
                sa.aead
            ),
            Change::FillSa(sa) => write!(
                f,
                "fill {} src {} reqid {} {}",
                sa.id(),
                sa.src,
                sa.reqid,
                sa.aead
            ),
            Change::DeleteSa(id) => write!(f, "delete {id}"),
            Change::AddPolicy(p) => write!(f, "add {} reqid {}", p.id, p.reqid),
            Change::DeletePolicy(id) => write!(f, "delete {id}"),
            Change::AddRange(p) => write!(f, "add {p}"),
            Change::DeleteRange(p) => write!(f, "delete {p}"),
        }
    }
}

/// A set of SAs and policies: what meshsec wants, or what the kernel has.
/// SAs are compared by identity (dst, SPI): the kernel never changes the
/// keys under an SPI, so a different key means a different SPI.
#[derive(Debug, Clone, Default)]
pub struct KernelState {
    /// SAs by identity. For the actual state, `key` is empty.
    pub sas: BTreeMap<SaId, SaSpec>,
    /// Policies by selector and direction.
    pub policies: BTreeMap<PolicyId, PolicySpec>,
    /// SPIs reserved by `alloc_spi` and not filled yet (actual state only).
    pub larval: BTreeSet<SaId>,
    /// Strict mode's range policies (blocks and the host's exemptions).
    pub ranges: BTreeSet<RangePolicy>,
}

impl KernelState {
    /// Build the actual state from dumps. Larval SAs (SPI reservations) go
    /// to `larval`: a desired SA with that id is filled, never re-added, and
    /// an unwanted one is left to expire by itself (handshake in flight).
    pub fn from_dumps(sas: &[SaState], policies: &[PolicyState]) -> KernelState {
        let mut k = KernelState::default();
        for s in sas.iter().filter(|s| s.larval) {
            k.larval.insert(s.id());
        }
        for s in sas.iter().filter(|s| !s.larval) {
            let (Some(direction), Some(aead)) = (s.direction, s.aead) else {
                continue;
            };
            k.sas.insert(
                s.id(),
                SaSpec {
                    src: s.src,
                    dst: s.dst,
                    spi: s.spi,
                    direction,
                    reqid: s.reqid,
                    aead,
                    key: Default::default(),
                    replay_window: s.replay_window,
                    lifetimes: s.lifetimes,
                },
            );
        }
        for p in policies {
            k.policies.insert(p.spec.id, p.spec);
        }
        k
    }
}

/// Changes that turn `actual` into `desired`, ordered so traffic is never
/// exposed: new SAs first, then policies (added once their SAs exist; a
/// policy whose reqid changed is replaced), then new range policies, then
/// range and policy deletions, then SA deletions last (an old SA keeps
/// decrypting until nothing refers to it).
pub fn diff(desired: &KernelState, actual: &KernelState) -> Vec<Change> {
    let mut out = Vec::new();
    for (id, sa) in &desired.sas {
        if actual.larval.contains(id) {
            out.push(Change::FillSa(sa.clone()));
        } else if !actual.sas.contains_key(id) {
            out.push(Change::AddSa(sa.clone()));
        }
    }
    let mut replaced = Vec::new();
    for (id, p) in &desired.policies {
        match actual.policies.get(id) {
            None => out.push(Change::AddPolicy(*p)),
            Some(a) if a.reqid != p.reqid => replaced.push(*p),
            Some(_) => {}
        }
    }
    for p in &replaced {
        out.push(Change::DeletePolicy(p.id));
        out.push(Change::AddPolicy(*p));
    }
    // The host's own exemptions go in before the blocks and out after them,
    // so it never loses the traffic it sends itself.
    for rule in [RangeRule::Exempt, RangeRule::Block] {
        for p in desired.ranges.difference(&actual.ranges) {
            if p.rule == rule {
                out.push(Change::AddRange(*p));
            }
        }
    }
    for rule in [RangeRule::Block, RangeRule::Exempt] {
        for p in actual.ranges.difference(&desired.ranges) {
            if p.rule == rule {
                out.push(Change::DeleteRange(*p));
            }
        }
    }
    for id in actual.policies.keys() {
        if !desired.policies.contains_key(id) {
            out.push(Change::DeletePolicy(*id));
        }
    }
    for id in actual.sas.keys() {
        if !desired.sas.contains_key(id) {
            out.push(Change::DeleteSa(*id));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{Aead, Direction, Lifetimes, Reqid};
    use std::net::IpAddr;

    fn sa(spi: u32) -> SaSpec {
        SaSpec {
            src: "10.0.0.1".parse::<IpAddr>().unwrap(),
            dst: "10.0.0.2".parse::<IpAddr>().unwrap(),
            spi,
            direction: Direction::Out,
            reqid: Reqid::DEFAULT,
            aead: Aead::Aes128Gcm,
            key: vec![1; 20].into(),
            replay_window: 1024,
            lifetimes: Lifetimes::default(),
        }
    }

    #[test]
    fn diff_orders_adds_before_deletes() {
        let l: IpAddr = "10.0.0.1".parse().unwrap();
        let p: IpAddr = "10.0.0.2".parse().unwrap();
        let mut desired = KernelState::default();
        desired.sas.insert(sa(0x2000).id(), sa(0x2000));
        for pol in PolicySpec::pair(l, p, Reqid::DEFAULT) {
            desired.policies.insert(pol.id, pol);
        }
        let mut actual = KernelState::default();
        actual.sas.insert(sa(0x1000).id(), sa(0x1000));
        let stale = PolicySpec::pair(l, "10.0.0.9".parse().unwrap(), Reqid::DEFAULT)[0];
        actual.policies.insert(stale.id, stale);
        let changes = diff(&desired, &actual);
        assert_eq!(changes.len(), 5, "{changes:?}");
        assert_eq!(changes[0], Change::AddSa(sa(0x2000)));
        assert!(matches!(changes[1], Change::AddPolicy(_)));
        assert!(matches!(changes[2], Change::AddPolicy(_)));
        assert_eq!(changes[3], Change::DeletePolicy(stale.id));
        assert_eq!(changes[4], Change::DeleteSa(sa(0x1000).id()));
        // Converged: nothing to do.
        assert!(diff(&desired, &desired).is_empty());
    }

    #[test]
    fn diff_fills_larval_spis() {
        let mut desired = KernelState::default();
        let mut inbound = sa(0x3000);
        inbound.direction = Direction::In;
        desired.sas.insert(inbound.id(), inbound.clone());
        let mut actual = KernelState::default();
        actual.larval.insert(inbound.id());
        actual.larval.insert(sa(0x3001).id()); // someone's handshake in flight
        assert_eq!(diff(&desired, &actual), vec![Change::FillSa(inbound)]);
    }

    #[test]
    fn diff_replaces_policy_with_new_reqid() {
        let l: IpAddr = "fd00::1".parse().unwrap();
        let p: IpAddr = "fd00::2".parse().unwrap();
        let mut desired = KernelState::default();
        let mut actual = KernelState::default();
        let new = PolicySpec::pair(l, p, Reqid::new(2).unwrap())[0];
        let old = PolicySpec::pair(l, p, Reqid::DEFAULT)[0];
        desired.policies.insert(new.id, new);
        actual.policies.insert(old.id, old);
        assert_eq!(
            diff(&desired, &actual),
            vec![Change::DeletePolicy(new.id), Change::AddPolicy(new)]
        );
    }
}
