//! [`MemoryDatapath`]: an in-memory model of the XFRM tables with the
//! kernel's semantics, for unit tests and simulation (never as proof that
//! the kernel does the same — the shared suite checks that where it can).

use std::collections::BTreeMap;
use std::net::IpAddr;

use rand::Rng;

use super::ownership::POLICY_PRIORITY;
use super::{
    sort_policies, sort_sas, validate_policy, validate_range, validate_sa, AddressFamily, Aead,
    DatapathError, Direction, Lifetimes, Op, PolicyId, PolicySpec, PolicyState, RangePolicy, Reqid,
    SaCounters, SaId, SaSpec, SaState,
};

#[derive(Debug, Clone)]
enum MemSa {
    Larval { src: IpAddr, reqid: Reqid },
    Full { spec: SaSpec, counters: SaCounters },
    Foreign,
}

#[derive(Debug, Clone)]
struct MemPolicy {
    owned: Option<PolicySpec>,
    index: u32,
}

/// In-memory XFRM tables.
#[derive(Debug, Default)]
pub struct MemoryDatapath {
    sas: BTreeMap<SaId, MemSa>,
    policies: BTreeMap<PolicyId, MemPolicy>,
    /// Strict mode's range policies (`true`: meshsec's; `false`: somebody
    /// else's policy on the same selector).
    ranges: BTreeMap<RangePolicy, bool>,
    next_index: u32,
    nd_bypass: bool,
    probe_failure: Option<(String, String)>,
    calls: WriteCalls,
    in_apply: bool,
}

/// How the in-memory tables were used, so tests can tell a pipelined
/// [`crate::datapath::Datapath::apply`] from one-at-a-time writes, and count
/// the kernel work an event costs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteCalls {
    /// Calls of [`crate::datapath::Datapath::apply`].
    pub apply: u64,
    /// Changes handed to those calls.
    pub applied_changes: u64,
    /// SA or policy installs and updates made outside `apply`.
    pub direct_writes: u64,
    /// Full table dumps: each `dump_sas`, `dump_policies`,
    /// `dump_range_policies` or `dump_all_policies` call (one look at a table).
    pub dumps: u64,
    /// Calls of [`crate::datapath::Datapath::get_sas`] (targeted reads).
    pub get_sas: u64,
    /// SAs those calls asked for.
    pub got_sas: u64,
    /// Netlink round trips the kernel datapath would make: one per call of
    /// any method (an `apply` or a `get_sas` is one pipelined round trip;
    /// the calls `apply` makes inside count with it).
    pub round_trips: u64,
}

impl MemoryDatapath {
    /// Empty tables.
    pub fn new() -> MemoryDatapath {
        MemoryDatapath::default()
    }

    /// How the tables were written to so far.
    pub fn write_calls(&self) -> WriteCalls {
        self.calls
    }

    fn count_write(&mut self) {
        if !self.in_apply {
            self.calls.direct_writes += 1;
        }
    }

    fn count_trip(&mut self) {
        if !self.in_apply {
            self.calls.round_trips += 1;
        }
    }

    fn count_dump(&mut self) {
        self.count_trip();
        self.calls.dumps += 1;
    }

    /// Simulate somebody else's SA (another IPsec daemon) sharing the table.
    pub fn add_foreign_sa(&mut self, dst: IpAddr, spi: u32) {
        self.sas.insert(SaId { dst, spi }, MemSa::Foreign);
    }

    /// Simulate somebody else's policy on a selector.
    pub fn add_foreign_policy(&mut self, id: PolicyId) {
        self.next_index += 8;
        self.policies.insert(
            id,
            MemPolicy {
                owned: None,
                index: self.next_index,
            },
        );
    }

    /// Simulate somebody else's policy on a range policy's selector.
    pub fn add_foreign_range_policy(&mut self, p: RangePolicy) {
        self.ranges.insert(p, false);
    }

    /// Simulate traffic through an SA (counters grow as in the kernel).
    pub fn record_traffic(&mut self, id: SaId, bytes: u64, packets: u64) -> bool {
        match self.sas.get_mut(&id) {
            Some(MemSa::Full { counters, .. }) => {
                counters.bytes += bytes;
                counters.packets += packets;
                true
            }
            _ => false,
        }
    }

    /// Make [`super::Datapath::probe`] fail as a kernel lacking something would.
    pub fn set_probe_failure(&mut self, what: &str, fix: &str) {
        self.probe_failure = Some((what.into(), fix.into()));
    }

    /// The key installed for an SA (simulation peers use it to check that
    /// both ends agree; the kernel never gives keys back to meshsec).
    pub fn key_of(&self, id: SaId) -> Option<&[u8]> {
        match self.sas.get(&id) {
            Some(MemSa::Full { spec, .. }) => Some(spec.key.as_bytes()),
            _ => None,
        }
    }

    fn state_of(id: SaId, sa: &MemSa) -> Option<SaState> {
        match sa {
            MemSa::Foreign => None,
            MemSa::Larval { src, reqid } => Some(SaState {
                src: *src,
                dst: id.dst,
                spi: id.spi,
                reqid: *reqid,
                direction: None,
                aead: None,
                replay_window: 0,
                larval: true,
                lifetimes: Lifetimes::default(),
                counters: SaCounters::default(),
            }),
            MemSa::Full { spec, counters } => Some(SaState {
                src: spec.src,
                dst: spec.dst,
                spi: spec.spi,
                reqid: spec.reqid,
                direction: Some(spec.direction),
                aead: Some(spec.aead),
                replay_window: match spec.direction {
                    Direction::In => spec.replay_window,
                    Direction::Out => 0,
                },
                larval: false,
                lifetimes: spec.lifetimes,
                counters: *counters,
            }),
        }
    }
}

fn kernel(op: Op, target: String, errno: i32) -> DatapathError {
    DatapathError::Kernel {
        op,
        target,
        errno,
        message: None,
    }
}

impl super::Datapath for MemoryDatapath {
    fn probe_arrived(&mut self, sa: SaId) {
        self.record_traffic(sa, crate::mesh::driver::PROBE_LEN as u64, 1);
    }

    fn apply(&mut self, changes: &[super::Change]) -> Vec<Result<(), DatapathError>> {
        self.count_trip();
        self.calls.apply += 1;
        self.calls.applied_changes += changes.len() as u64;
        self.in_apply = true;
        let results = super::apply_one_by_one(self, changes);
        self.in_apply = false;
        results
    }

    fn probe(
        &mut self,
        _aead: Aead,
        _families: &[AddressFamily],
    ) -> Result<super::ProbeReport, DatapathError> {
        match &self.probe_failure {
            Some((what, fix)) => Err(DatapathError::Unsupported {
                what: what.clone(),
                fix: fix.clone(),
            }),
            None => Ok(super::ProbeReport::default()),
        }
    }

    fn alloc_spi(&mut self, src: IpAddr, dst: IpAddr, reqid: Reqid) -> Result<u32, DatapathError> {
        self.count_trip();
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(DatapathError::Invalid {
                op: Op::AllocSpi,
                reason: format!("mixed address families {src} -> {dst}"),
            });
        }
        let mut rng = rand::thread_rng();
        loop {
            let spi: u32 = rng.gen_range(0x100..=u32::MAX);
            let id = SaId { dst, spi };
            if let std::collections::btree_map::Entry::Vacant(e) = self.sas.entry(id) {
                e.insert(MemSa::Larval { src, reqid });
                return Ok(spi);
            }
        }
    }

    fn install_sa(&mut self, sa: &SaSpec) -> Result<(), DatapathError> {
        self.count_trip();
        self.count_write();
        validate_sa(Op::NewSa, sa)?;
        let id = sa.id();
        if self.sas.contains_key(&id) {
            return Err(kernel(Op::NewSa, id.to_string(), libc::EEXIST));
        }
        self.sas.insert(
            id,
            MemSa::Full {
                spec: sa.clone(),
                counters: SaCounters::default(),
            },
        );
        Ok(())
    }

    fn update_sa(&mut self, sa: &SaSpec) -> Result<(), DatapathError> {
        self.count_trip();
        self.count_write();
        validate_sa(Op::UpdSa, sa)?;
        let id = sa.id();
        match self.sas.get_mut(&id) {
            None => Err(kernel(Op::UpdSa, id.to_string(), libc::ESRCH)),
            Some(MemSa::Foreign) => Err(DatapathError::NotOwned {
                op: Op::UpdSa,
                target: id.to_string(),
                why: "reqid, protocol or mode is not meshsec's".into(),
            }),
            Some(slot @ MemSa::Larval { .. }) => {
                *slot = MemSa::Full {
                    spec: sa.clone(),
                    counters: SaCounters::default(),
                };
                Ok(())
            }
            // Like the kernel: a valid SA only takes new lifetimes.
            Some(MemSa::Full { spec, .. }) => {
                spec.lifetimes = sa.lifetimes;
                Ok(())
            }
        }
    }

    fn delete_sa(&mut self, id: SaId) -> Result<(), DatapathError> {
        self.count_trip();
        match self.sas.get(&id) {
            None => Err(kernel(Op::DelSa, id.to_string(), libc::ESRCH)),
            Some(MemSa::Foreign) => Err(DatapathError::NotOwned {
                op: Op::DelSa,
                target: id.to_string(),
                why: "reqid, protocol or mode is not meshsec's".into(),
            }),
            Some(_) => {
                self.sas.remove(&id);
                Ok(())
            }
        }
    }

    fn ensure_nd_bypass(&mut self) -> Result<(), DatapathError> {
        self.nd_bypass = true;
        Ok(())
    }

    fn nd_bypass_count(&mut self) -> Result<usize, DatapathError> {
        Ok(if self.nd_bypass { 4 } else { 0 })
    }

    fn remove_nd_bypass(&mut self) -> Result<usize, DatapathError> {
        Ok(if std::mem::take(&mut self.nd_bypass) {
            4
        } else {
            0
        })
    }

    fn install_policy(&mut self, policy: &PolicySpec) -> Result<(), DatapathError> {
        self.count_trip();
        self.count_write();
        validate_policy(Op::NewPolicy, policy)?;
        if policy.id.src.is_ipv6() {
            self.ensure_nd_bypass()?;
        }
        if self.policies.contains_key(&policy.id) {
            return Err(kernel(Op::NewPolicy, policy.id.to_string(), libc::EEXIST));
        }
        // The kernel numbers policies so that index % 8 is the direction.
        self.next_index += 8;
        let index = self.next_index
            + if policy.id.direction == Direction::Out {
                1
            } else {
                0
            };
        self.policies.insert(
            policy.id,
            MemPolicy {
                owned: Some(*policy),
                index,
            },
        );
        Ok(())
    }

    fn delete_policy(&mut self, id: PolicyId) -> Result<(), DatapathError> {
        self.count_trip();
        match self.policies.get(&id) {
            None => Err(kernel(Op::DelPolicy, id.to_string(), libc::ENOENT)),
            Some(MemPolicy { owned: None, .. }) => Err(DatapathError::NotOwned {
                op: Op::DelPolicy,
                target: id.to_string(),
                why: format!(
                    "priority or template is not meshsec's (priority {POLICY_PRIORITY} expected)"
                ),
            }),
            Some(_) => {
                self.policies.remove(&id);
                Ok(())
            }
        }
    }

    fn install_range_policy(&mut self, policy: &RangePolicy) -> Result<(), DatapathError> {
        self.count_trip();
        self.count_write();
        validate_range(Op::NewPolicy, policy)?;
        if policy.src.addr().is_ipv6() {
            self.ensure_nd_bypass()?;
        }
        if self.ranges.contains_key(policy) {
            return Err(kernel(Op::NewPolicy, policy.to_string(), libc::EEXIST));
        }
        self.ranges.insert(*policy, true);
        Ok(())
    }

    fn delete_range_policy(&mut self, policy: &RangePolicy) -> Result<(), DatapathError> {
        self.count_trip();
        match self.ranges.get(policy) {
            Some(true) => {
                self.ranges.remove(policy);
                Ok(())
            }
            _ => Err(kernel(Op::DelPolicy, policy.to_string(), libc::ENOENT)),
        }
    }

    fn dump_range_policies(&mut self) -> Result<Vec<RangePolicy>, DatapathError> {
        self.count_dump();
        Ok(self
            .ranges
            .iter()
            .filter(|(_, ours)| **ours)
            .map(|(p, _)| *p)
            .collect())
    }

    fn dump_all_policies(&mut self) -> Result<(Vec<PolicyState>, Vec<RangePolicy>), DatapathError> {
        // One look at the policy table, as the kernel datapath takes it.
        let calls = self.calls;
        let both = (self.dump_policies()?, self.dump_range_policies()?);
        self.calls = calls;
        self.count_dump();
        Ok(both)
    }

    fn get_sas(&mut self, ids: &[SaId]) -> Result<Vec<Option<SaState>>, DatapathError> {
        self.count_trip();
        self.calls.get_sas += 1;
        self.calls.got_sas += ids.len() as u64;
        Ok(ids
            .iter()
            .map(|id| self.sas.get(id).and_then(|sa| Self::state_of(*id, sa)))
            .collect())
    }

    fn dump_sas(&mut self) -> Result<Vec<SaState>, DatapathError> {
        self.count_dump();
        Ok(sort_sas(
            self.sas
                .iter()
                .filter_map(|(id, sa)| Self::state_of(*id, sa))
                .collect(),
        ))
    }

    fn dump_policies(&mut self) -> Result<Vec<PolicyState>, DatapathError> {
        self.count_dump();
        Ok(sort_policies(
            self.policies
                .values()
                .filter_map(|p| {
                    p.owned.map(|spec| PolicyState {
                        spec,
                        index: p.index,
                    })
                })
                .collect(),
        ))
    }
}
