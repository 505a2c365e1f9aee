//! [`XfrmDatapath`]: the kernel's XFRM tables over netlink.
//!
//! Three parts: [`msg`] builds and parses the messages (pure, unit tested
//! byte by byte), [`probe`] knows what the running kernel supports and
//! diagnoses what it lacks, and this module owns the socket, sends the
//! requests and implements [`Datapath`]; [`super::netlink`] moves the bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use netlink_packet_xfrm::{
    policy::DelGetMessage as PolicyDelGetMessage, state::GetDumpMessage, Selector, UserPolicyId,
    UserSaInfo, XfrmMessage, XFRM_MSG_NEWPOLICY, XFRM_MSG_NEWSA, XFRM_POLICY_IN,
    XFRM_USER_SA_INFO_LEN,
};

use super::netlink::{NlSocket, Outcome, RawMsg, Request};
use super::{
    offload::SysModules, sort_policies, sort_sas, validate_policy, validate_range, validate_sa,
    AddressFamily, Aead, Change, Datapath, DatapathError, ErrorKind, ForeignPolicy, Op, PolicyId,
    PolicySpec, PolicyState, ProbeReport, RangePolicy, Reqid, SaId, SaSpec, SaState,
};

mod msg;
mod probe;

use msg::{
    alloc_spi_message, nd_policy_message, parse_foreign_policy, parse_nd_policy, parse_policy,
    parse_range_policy, parse_sa, policy_id_message, range_id_message, range_policy_message,
    sa_id_message, ND_BYPASS,
};
pub(crate) use msg::{policy_message, sa_message};
use probe::permission;
pub use probe::KernelFlavor;

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

    /// The netlink port id of the socket every request goes through: the
    /// kernel's notifications of these changes carry it, so the
    /// [`super::XfrmMonitor`] can drop them.
    pub fn portid(&self) -> u32 {
        self.sock.portid()
    }

    /// One pipelined round trip of `GET` requests (one per target); each
    /// answer is parsed by `parse` (`None`: there but not meshsec's), and an
    /// object that is not there (`absent` errno) is `None` too.
    fn lookup<T>(
        &mut self,
        op: Op,
        targets: Vec<(String, XfrmMessage)>,
        reply_ty: u16,
        absent: i32,
        parse: impl Fn(&[u8]) -> Option<T>,
    ) -> Result<Vec<Option<T>>, DatapathError> {
        let (names, reqs): (Vec<String>, Vec<Request>) = targets
            .into_iter()
            .map(|(t, msg)| (t, Request { msg, dump: false }))
            .unzip();
        let outcomes = self
            .sock
            .transact(&reqs)
            .map_err(|source| DatapathError::Io { op, source })?;
        outcomes
            .into_iter()
            .zip(names)
            .map(|(o, target)| match o {
                Outcome::Done(msgs) => Ok(msgs
                    .iter()
                    .filter(|m| m.ty == reply_ty)
                    .find_map(|m| parse(&m.payload))),
                Outcome::Error { errno, .. } if errno == absent => Ok(None),
                Outcome::Error { errno, message } => Err(DatapathError::Kernel {
                    op,
                    target,
                    errno,
                    message,
                }),
            })
            .collect()
    }

    fn lookup_sas(&mut self, op: Op, ids: &[SaId]) -> Result<Vec<Option<SaState>>, DatapathError> {
        let targets = ids
            .iter()
            .map(|id| (id.to_string(), XfrmMessage::GetSa(sa_id_message(*id))))
            .collect();
        self.lookup(op, targets, XFRM_MSG_NEWSA, libc::ESRCH, parse_sa)
    }

    fn lookup_policies(
        &mut self,
        op: Op,
        ids: &[PolicyId],
    ) -> Result<Vec<Option<PolicyState>>, DatapathError> {
        let targets = ids
            .iter()
            .map(|id| {
                (
                    id.to_string(),
                    XfrmMessage::GetPolicy(policy_id_message(*id, 0)),
                )
            })
            .collect();
        self.lookup(op, targets, XFRM_MSG_NEWPOLICY, libc::ENOENT, parse_policy)
    }

    /// Every global `in`/`out` policy somebody else installed (read only;
    /// `meshsec doctor` looks for ones that shadow meshsec's).
    pub fn dump_foreign_policies(&mut self) -> Result<Vec<ForeignPolicy>, DatapathError> {
        Ok(self
            .raw_policy_dump()?
            .iter()
            .filter(|m| m.ty == XFRM_MSG_NEWPOLICY)
            .filter_map(|m| parse_foreign_policy(&m.payload))
            .collect())
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

    /// meshsec's range policies with their kernel indexes.
    fn range_indexes(&mut self) -> Result<BTreeMap<RangePolicy, u32>, DatapathError> {
        Ok(self
            .raw_policy_dump()?
            .iter()
            .filter(|m| m.ty == XFRM_MSG_NEWPOLICY)
            .filter_map(|m| parse_range_policy(&m.payload))
            .collect())
    }

    fn nd_indexes(&mut self) -> Result<Vec<u32>, DatapathError> {
        Ok(self
            .raw_policy_dump()?
            .iter()
            .filter(|m| m.ty == XFRM_MSG_NEWPOLICY)
            .filter_map(|m| parse_nd_policy(&m.payload))
            .collect())
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

impl Datapath for XfrmDatapath {
    fn probe(
        &mut self,
        aead: Aead,
        families: &[AddressFamily],
    ) -> Result<ProbeReport, DatapathError> {
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
        // Before any real SA: one created without the module never uses it.
        let esp_offload = self.ensure_offload(aead, families, &SysModules::system());
        Ok(ProbeReport { esp_offload })
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

    fn install_range_policy(&mut self, policy: &RangePolicy) -> Result<(), DatapathError> {
        validate_range(Op::NewPolicy, policy)?;
        if policy.src.addr().is_ipv6() {
            self.ensure_nd_bypass()?;
        }
        let p = *policy;
        self.one(
            Op::NewPolicy,
            &|| p.to_string(),
            XfrmMessage::AddPolicy(range_policy_message(policy)),
            false,
        )
        .map(|_| ())
    }

    fn delete_range_policy(&mut self, policy: &RangePolicy) -> Result<(), DatapathError> {
        let p = *policy;
        // Only what the dump recognises as meshsec's, by its index.
        let Some(index) = self.range_indexes()?.get(policy).copied() else {
            return Err(DatapathError::Kernel {
                op: Op::DelPolicy,
                target: p.to_string(),
                errno: libc::ENOENT,
                message: None,
            });
        };
        self.one(
            Op::DelPolicy,
            &|| p.to_string(),
            XfrmMessage::DeletePolicy(range_id_message(policy, index)),
            false,
        )
        .map(|_| ())
    }

    fn dump_range_policies(&mut self) -> Result<Vec<RangePolicy>, DatapathError> {
        Ok(self.range_indexes()?.into_keys().collect())
    }

    fn dump_all_policies(&mut self) -> Result<(Vec<PolicyState>, Vec<RangePolicy>), DatapathError> {
        let msgs = self.raw_policy_dump()?;
        let pols = msgs.iter().filter(|m| m.ty == XFRM_MSG_NEWPOLICY);
        let hosts = pols.clone().filter_map(|m| parse_policy(&m.payload));
        let mut ranges: Vec<RangePolicy> = pols
            .filter_map(|m| parse_range_policy(&m.payload).map(|(p, _)| p))
            .collect();
        ranges.sort();
        Ok((sort_policies(hosts.collect()), ranges))
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
        let msgs = self.raw_policy_dump()?;
        Ok(sort_policies(
            msgs.iter()
                .filter(|m| m.ty == XFRM_MSG_NEWPOLICY)
                .filter_map(|m| parse_policy(&m.payload))
                .collect(),
        ))
    }

    fn get_sas(&mut self, ids: &[SaId]) -> Result<Vec<Option<SaState>>, DatapathError> {
        self.lookup_sas(Op::GetSa, ids)
    }

    fn apply(&mut self, changes: &[Change]) -> Vec<Result<(), DatapathError>> {
        // Ownership of the SAs and host policies to fill or delete is checked
        // by one pipelined round trip of GETs for just those (no table dump:
        // the work follows the change, not the table); range deletes need
        // the kernel's index, from one policy dump. Then every request is
        // pipelined.
        let sa_targets: Vec<SaId> = changes
            .iter()
            .filter_map(|c| match c {
                Change::DeleteSa(id) => Some(*id),
                Change::FillSa(sa) => Some(sa.id()),
                _ => None,
            })
            .collect();
        let pol_targets: Vec<PolicyId> = changes
            .iter()
            .filter_map(|c| match c {
                Change::DeletePolicy(id) => Some(*id),
                _ => None,
            })
            .collect();
        let needs_range = changes.iter().any(|c| matches!(c, Change::DeleteRange(_)));
        let owned_ranges: Result<BTreeMap<RangePolicy, u32>, DatapathError> = if needs_range {
            self.range_indexes()
        } else {
            Ok(BTreeMap::new())
        };
        let owned_sas: Result<BTreeSet<SaId>, DatapathError> = if sa_targets.is_empty() {
            Ok(BTreeSet::new())
        } else {
            self.lookup_sas(Op::GetSa, &sa_targets)
                .map(|v| v.iter().flatten().map(|s| s.id()).collect())
        };
        let owned_pols: Result<BTreeMap<PolicyId, u32>, DatapathError> = if pol_targets.is_empty() {
            Ok(BTreeMap::new())
        } else {
            self.lookup_policies(Op::GetPolicy, &pol_targets)
                .map(|v| v.iter().flatten().map(|p| (p.spec.id, p.index)).collect())
        };
        let mut results: Vec<Option<Result<(), DatapathError>>> =
            (0..changes.len()).map(|_| None).collect();
        let v6_policy = |c: &Change| match c {
            Change::AddPolicy(p) => p.id.src.is_ipv6(),
            Change::AddRange(p) => p.src.addr().is_ipv6(),
            _ => false,
        };
        if changes.iter().any(v6_policy) {
            if let Err(e) = self.ensure_nd_bypass() {
                let msg = e.to_string();
                for (i, c) in changes.iter().enumerate() {
                    if v6_policy(c) {
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
                Change::AddRange(_) if results[i].is_some() => continue,
                Change::AddRange(p) => validate_range(Op::NewPolicy, p).map(|()| {
                    (
                        Op::NewPolicy,
                        p.to_string(),
                        XfrmMessage::AddPolicy(range_policy_message(p)),
                    )
                }),
                Change::DeleteRange(p) => match &owned_ranges {
                    Err(e) => Err(DatapathError::Decode {
                        op: Op::DelPolicy,
                        reason: e.to_string(),
                    }),
                    Ok(map) => match map.get(p) {
                        Some(index) => Ok((
                            Op::DelPolicy,
                            p.to_string(),
                            XfrmMessage::DeletePolicy(range_id_message(p, *index)),
                        )),
                        None => Err(DatapathError::Kernel {
                            op: Op::DelPolicy,
                            target: p.to_string(),
                            errno: libc::ENOENT,
                            message: None,
                        }),
                    },
                },
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
