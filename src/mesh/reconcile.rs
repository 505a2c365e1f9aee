//! Reconciliation with the kernel: take the kernel's state (the mesh's own
//! record of it, or a dump when that record cannot be trusted), update the
//! links from it (confirmations, vanished SAs, soft limits, adopted state),
//! plan (the pure [`super::plan`]), apply in one pipelined call, record what
//! went in. Kernel events feed the same loop; targeted reads
//! ([`crate::datapath::Datapath::get_sas`]) keep the counters current
//! without dumps.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::guard::{BlockReason, Blocked};
use super::plan::{self, desired, sa_ids, AdoptedPlan};
use super::{
    backoff, jittered, keyless, Adopted, Mesh, COUNTER_POLL, ERROR_RETRY, INBOUND_LIMIT_DELAY,
    KERNEL_EVENT_DELAY,
};
use crate::datapath::{
    range_policies, AddressFamily, Change, Datapath, Direction, ErrorKind, KernelEvent,
    KernelState, PolicySpec, SaCounters, SaId, SaSpec, SaState,
};
use crate::handshake::Role;

impl Mesh {
    /// Acts on an event the kernel announced (see [`crate::datapath::XfrmMonitor`]):
    /// a soft expire re-keys the link the SA belongs to, a hard expire
    /// removes the SA from the mesh's record of the kernel (its link
    /// re-keys), a change to the tables somebody else made (a deletion, a
    /// flush, a policy replaced in place on one of meshsec's selectors) or
    /// lost events make the mesh dump the kernel.
    pub fn handle_kernel_event(&mut self, now: Instant, event: KernelEvent) {
        match event {
            KernelEvent::Expire { sa, hard: false } => {
                if self.soft_limit_reached(now, sa, "kernel soft-expire notification") {
                    self.counters.kernel_soft_expires += 1;
                }
            }
            KernelEvent::Expire { sa, hard: true } => {
                // Larval SAs of abandoned handshakes expire too (after
                // net.core.xfrm_acq_expires); only a current SA's matters.
                if self.session_of(&sa).is_some() {
                    self.counters.kernel_hard_expires += 1;
                    warn!(sa = %sa, "SA reached its hard lifetime limit and was deleted by the kernel; re-keying");
                }
                if let Some(k) = self.kernel.as_mut() {
                    k.sas.remove(&sa);
                }
                self.dirty = true;
            }
            KernelEvent::PolicyReplaced {
                src,
                src_len,
                dst,
                dst_len,
                direction,
            } if !self.holds_selector(src, src_len, dst, dst_len, direction) => {
                // Another daemon's policy: nothing of meshsec's changed.
            }
            KernelEvent::TablesChanged | KernelEvent::PolicyReplaced { .. } => {
                // Somebody else changed the tables: the record is stale from
                // now on, so a reconcile before the coalesced resync (a new
                // session installing its SAs) dumps rather than trust it: a
                // policy it believed in could be gone, and the confirmation
                // probe would then leave unprotected and be dropped.
                self.kernel = None;
                let at = now + KERNEL_EVENT_DELAY;
                self.kernel_resync_at.get_or_insert(at);
            }
            KernelEvent::Overrun => {
                self.counters.kernel_event_overruns += 1;
                // The next reconcile (now: dirty) dumps.
                self.kernel = None;
                self.dirty = true;
            }
        }
    }

    /// Whether a policy on this selector may be one of meshsec's: a
    /// host-pair policy or a strict-mode range policy in the mesh's record
    /// of the kernel, an all-addresses selector (the neighbour-discovery
    /// bypass), or anything while the record is not trusted.
    fn holds_selector(
        &self,
        src: IpAddr,
        src_len: u8,
        dst: IpAddr,
        dst_len: u8,
        direction: Direction,
    ) -> bool {
        let Some(k) = &self.kernel else {
            return true;
        };
        let host = |a: &IpAddr, len| len == if a.is_ipv4() { 32 } else { 128 };
        if host(&src, src_len)
            && host(&dst, dst_len)
            && k.policies.contains_key(&crate::datapath::PolicyId {
                src,
                dst,
                direction,
            })
        {
            return true;
        }
        (src_len == 0 && dst_len == 0)
            || k.ranges.iter().any(|r| {
                r.direction == direction
                    && (r.src.addr(), r.src.len()) == (src, src_len)
                    && (r.dst.addr(), r.dst.len()) == (dst, dst_len)
            })
    }

    /// Schedules a re-key of the link whose current session owns `sa`: at
    /// once for our outbound SA, after [`INBOUND_LIMIT_DELAY`] for our inbound
    /// SA (the peer's outbound). Each SA acts once. Returns whether `sa` is a
    /// current SA of some link.
    fn soft_limit_reached(&mut self, now: Instant, sa: SaId, via: &str) -> bool {
        for (id, link) in self.links.iter_mut() {
            let Some(session) = &link.session else {
                continue;
            };
            let (inbound, outbound) = sa_ids(&link.target, session);
            let delay = if sa == outbound {
                Duration::ZERO
            } else if sa == inbound {
                INBOUND_LIMIT_DELAY
            } else {
                continue;
            };
            if !self.limits_seen.insert(sa) {
                return true;
            }
            self.counters.soft_limits_reached += 1;
            let at = now + delay;
            link.rekey_at = Some(link.rekey_at.map_or(at, |t| t.min(at)));
            info!(peer = %link.target.name, family = %id.family, sa = %sa, via, "SA reached its soft lifetime limit; re-keying");
            return true;
        }
        false
    }

    /// Makes the kernel match the links after a full dump (the periodic
    /// resync; see [`Mesh::handle_timeout`] for when the mesh does without).
    pub fn reconcile(&mut self, now: Instant, dp: &mut dyn Datapath) {
        self.reconcile_with(now, dp, true);
    }

    /// Makes the kernel match the links: take its state (`full`: one dump
    /// of SAs and policies; otherwise the mesh's record of it), update link
    /// state from it (confirmations, retirements, vanished SAs), plan (the
    /// pure [`super::desired`] and [`super::plan()`]), apply the whole plan in
    /// one pipelined [`crate::datapath::Datapath::apply`], record the
    /// outcome. A change that fails leaves the record untrusted: the next
    /// reconcile, [`ERROR_RETRY`] later at most, dumps. Returns whether it
    /// dumped (fresh counters).
    pub(super) fn reconcile_with(
        &mut self,
        now: Instant,
        dp: &mut dyn Datapath,
        full: bool,
    ) -> bool {
        self.last_reconcile = now;
        let recorded = self.kernel.take().filter(|_| !full);
        let dumped = recorded.is_none();
        let mut actual = match recorded {
            Some(mut k) => {
                // Every inbound SA meshsec installs sits on an SPI it
                // reserved (ALLOCSPI): one not in the record yet is filled
                // (a reservation that expired is added instead, see apply).
                k.larval = self
                    .links
                    .values()
                    .flat_map(|l| {
                        let current = l.session.as_ref().map(|s| sa_ids(&l.target, s).0);
                        let pending = l.pending.as_ref().map(|(s, _)| sa_ids(&l.target, s).0);
                        current.into_iter().chain(pending)
                    })
                    .filter(|id| !k.sas.contains_key(id))
                    .collect();
                k
            }
            None => match self.observe(now, dp) {
                Some(k) => k,
                None => {
                    self.kernel_resync_at.get_or_insert(now + ERROR_RETRY);
                    return false;
                }
            },
        };
        self.adopt(now, &actual);
        self.check_soft_limits(now);
        self.confirm_pending(now);
        for link in self.links.values_mut() {
            link.retiring.retain(|(_, deadline)| now < *deadline);
        }
        self.rekey_vanished(now, &actual);
        let changes = self.plan(&actual);
        let (failed_sas, all_ok) = self.apply(now, changes, dp, &mut actual);
        actual.larval.clear();
        self.range_policies_seen = actual.ranges.len();
        self.kernel_counters
            .retain(|id, _| actual.sas.contains_key(id));
        if all_ok {
            self.kernel = Some(actual);
        } else {
            self.kernel_resync_at.get_or_insert(now + ERROR_RETRY);
        }
        self.record(now, &failed_sas);
        dumped
    }

    /// Reads the pending responder sessions' inbound SAs (one targeted
    /// round trip): a packet on one confirms its session, and the next
    /// reconcile switches to it; so does a confirmation deadline passing.
    pub(super) fn poll_pending(&mut self, now: Instant, dp: &mut dyn Datapath) {
        self.last_confirm_poll = now;
        let pending: Vec<(SaId, Instant)> = self
            .links
            .values()
            .filter_map(|l| {
                let (s, deadline) = l.pending.as_ref()?;
                Some((sa_ids(&l.target, s).0, *deadline))
            })
            .collect();
        if pending.is_empty() {
            return;
        }
        let ids: Vec<SaId> = pending.iter().map(|(id, _)| *id).collect();
        match dp.get_sas(&ids) {
            Ok(states) => self.take_counters(&ids, states),
            Err(e) => {
                self.log_error(now, &format!("cannot read the pending SAs: {e}"));
                return;
            }
        }
        let decided = pending.iter().any(|(id, deadline)| {
            now >= *deadline || self.kernel_counters.get(id).is_some_and(|c| c.packets > 0)
        });
        if decided {
            self.dirty = true;
        }
    }

    /// Reads the current SAs' counters (one targeted round trip) for the
    /// listing and the soft-limit check. Returns whether it read any.
    pub(super) fn poll_counters(&mut self, now: Instant, dp: &mut dyn Datapath) -> bool {
        self.next_counters = now + COUNTER_POLL;
        let ids: Vec<SaId> = self
            .links
            .values()
            .filter(|l| l.installed)
            .filter_map(|l| l.session.as_ref().map(|s| sa_ids(&l.target, s)))
            .flat_map(|(i, o)| [i, o])
            .collect();
        if ids.is_empty() {
            return false;
        }
        match dp.get_sas(&ids) {
            Ok(states) => self.take_counters(&ids, states),
            Err(e) => {
                self.log_error(now, &format!("cannot read the SA counters: {e}"));
                return false;
            }
        }
        self.check_soft_limits(now);
        true
    }

    /// Records what a targeted read found; an SA the mesh installed that is
    /// gone makes the next reconcile dump the kernel (no notification said
    /// so, or it was lost).
    fn take_counters(&mut self, ids: &[SaId], states: Vec<Option<SaState>>) {
        for (id, state) in ids.iter().zip(states) {
            match state {
                Some(s) => {
                    self.kernel_counters.insert(*id, s.counters);
                }
                None => {
                    self.kernel_counters.remove(id);
                    if self.kernel.as_ref().is_some_and(|k| k.sas.contains_key(id)) {
                        self.kernel = None;
                        self.dirty = true;
                    }
                }
            }
        }
    }

    /// Reads the kernel's meshsec-owned SAs and policies (and the SAs'
    /// counters, for the listing and the soft-limit check).
    fn observe(&mut self, now: Instant, dp: &mut dyn Datapath) -> Option<KernelState> {
        self.counters.kernel_dumps += 1;
        self.last_confirm_poll = now;
        self.next_counters = now + COUNTER_POLL;
        let dumped = match (dp.dump_sas(), dp.dump_all_policies()) {
            (Ok(s), Ok((p, r))) => (s, p, r),
            (Err(e), _) | (_, Err(e)) => {
                self.log_error(now, &format!("cannot read the kernel's XFRM state: {e}"));
                return None;
            }
        };
        self.kernel_counters = dumped.0.iter().map(|s| (s.id(), s.counters)).collect();
        self.range_policies_seen = dumped.2.len();
        let mut state = KernelState::from_dumps(&dumped.0, &dumped.1);
        state.ranges = dumped.2.into_iter().collect();
        Some(state)
    }

    /// Confirmation: the initiator's first ESP packet on a pending session's
    /// inbound SA proves it holds the keys; the session then takes over.
    fn confirm_pending(&mut self, now: Instant) {
        for (id, link) in self.links.iter_mut() {
            let Some((pending, deadline)) = &link.pending else {
                continue;
            };
            let (in_id, _) = sa_ids(&link.target, pending);
            let confirmed = self
                .kernel_counters
                .get(&in_id)
                .is_some_and(|c| c.packets > 0);
            if confirmed {
                let (session, _) = link.pending.take().expect("checked");
                info!(peer = %link.target.name, family = %id.family, "responder session confirmed by the peer's traffic");
                self.counters.sessions_confirmed += 1;
                link.switch_to(session, now, &self.config);
            } else if now >= *deadline {
                warn!(peer = %link.target.name, family = %id.family, "responder session never confirmed; dropping it");
                self.counters.sessions_unconfirmed += 1;
                link.pending = None;
                if link.session.is_none() {
                    link.next_attempt = now;
                }
            }
        }
    }

    /// An installed link whose SA vanished gets fresh keys, never the old ones again.
    fn rekey_vanished(&mut self, now: Instant, actual: &KernelState) {
        for link in self.links.values_mut() {
            let Some(session) = &link.session else {
                continue;
            };
            if !link.installed {
                continue;
            }
            let (inb, outb) = sa_ids(&link.target, session);
            if !actual.sas.contains_key(&inb) || !actual.sas.contains_key(&outb) {
                warn!(peer = %link.target.name, "installed SA missing from the kernel; re-keying the link");
                self.counters.sas_vanished += 1;
                link.session = None;
                link.installed = false;
                link.established_at = None;
                link.next_attempt = now;
            }
        }
    }

    /// The changes that make `actual` what the links want (pure, see [`super::plan()`]).
    fn plan(&self, actual: &KernelState) -> Vec<Change> {
        // Adopted policies and blocked pairs both stay (policies without SAs).
        let mut kept_policies = self.guard.policies();
        if let Some(a) = &self.adopted {
            kept_policies.extend(a.policies.iter().copied());
        }
        let adopted = AdoptedPlan {
            sas: self.adopted.as_ref().map_or(&[][..], |a| &a.sas),
            policies: &kept_policies,
        };
        let links = self.links.values().map(|l| l.plan());
        let mut desired = desired(links, adopted, actual, self.config.lifetimes);
        desired.ranges = range_policies(&self.protect, &self.self_addrs)
            .into_iter()
            .collect();
        let wanted_by: HashMap<SaId, u64> = self
            .links
            .values()
            .filter_map(|l| {
                l.session
                    .as_ref()
                    .map(|s| (sa_ids(&l.target, s), s.session_id))
            })
            .flat_map(|((i, o), sid)| [(i, sid), (o, sid)])
            .collect();
        plan::plan(&desired, actual, &wanted_by, &self.installed_by)
    }

    /// Applies `changes` in one pipelined call, counts the outcome and
    /// records what succeeded in `kernel`; returns the SAs that did not go
    /// in, and whether every change went through. A larval SA that expired
    /// before it was filled is added instead; deleting what is already gone
    /// is done.
    fn apply(
        &mut self,
        now: Instant,
        changes: Vec<Change>,
        dp: &mut dyn Datapath,
        kernel: &mut KernelState,
    ) -> (Vec<SaId>, bool) {
        let mut failed_sas = Vec::new();
        let mut all_ok = true;
        if changes.is_empty() {
            return (failed_sas, all_ok);
        }
        // Policies go only once what replaces them is in: the plan adds before it deletes,
        // but each change succeeds or fails alone, so a failed add (ENOBUFS, a foreign
        // policy on the selector) would otherwise still let the old block go and leave
        // the traffic in clear. Deletes wait for the adds' outcome (a second pipelined
        // call) and are held back, fail closed, while any policy add fails. A delete
        // followed by an add of the same policy (a replacement) stays in order.
        let later = |i: usize| match &changes[i] {
            Change::DeleteRange(_) => true,
            Change::DeletePolicy(id) => !matches!(
                changes.get(i + 1),
                Some(Change::AddPolicy(p)) if p.id == *id
            ),
            _ => false,
        };
        let deferred: Vec<bool> = (0..changes.len()).map(later).collect();
        let (first, deletes): (Vec<_>, Vec<_>) =
            changes.into_iter().zip(deferred).partition(|(_, d)| !d);
        let first: Vec<Change> = first.into_iter().map(|(c, _)| c).collect();
        let deletes: Vec<Change> = deletes.into_iter().map(|(c, _)| c).collect();
        // (An empty call is skipped: it would cost a round trip for nothing.)
        let mut outcomes: Vec<(&Change, _)> = if first.is_empty() {
            Vec::new()
        } else {
            first.iter().zip(dp.apply(&first)).collect()
        };
        let add_failed = outcomes
            .iter()
            .any(|(c, r)| matches!(c, Change::AddPolicy(_) | Change::AddRange(_)) && r.is_err());
        if add_failed && !deletes.is_empty() {
            all_ok = false;
            self.counters.changes_failed += deletes.len() as u64;
            self.log_error(
                now,
                &format!(
                    "a policy could not be added; {} policy deletion(s) held back until it is (traffic stays blocked, never clear)",
                    deletes.len()
                ),
            );
            // The next resync tries again.
        } else if !deletes.is_empty() {
            outcomes.extend(deletes.iter().zip(dp.apply(&deletes)));
        }
        for (change, result) in outcomes {
            let result = match (change, result) {
                (Change::FillSa(sa), Err(e)) if e.kind() == ErrorKind::NotFound => {
                    dp.install_sa(sa)
                }
                (Change::DeleteSa(_) | Change::DeletePolicy(_), Err(e))
                    if e.kind() == ErrorKind::NotFound =>
                {
                    Ok(())
                }
                (_, r) => r,
            };
            match result {
                Ok(()) => {
                    self.counters.changes_applied += 1;
                    match change {
                        Change::AddSa(sa) | Change::FillSa(sa) => {
                            if let Some(sid) = self.session_of(&sa.id()) {
                                self.installed_by.insert(sa.id(), sid);
                            }
                            kernel.larval.remove(&sa.id());
                            kernel.sas.insert(sa.id(), keyless(sa));
                        }
                        Change::DeleteSa(id) => {
                            self.installed_by.remove(id);
                            kernel.larval.remove(id);
                            kernel.sas.remove(id);
                        }
                        Change::AddPolicy(p) => {
                            kernel.policies.insert(p.id, *p);
                        }
                        Change::DeletePolicy(id) => {
                            kernel.policies.remove(id);
                        }
                        Change::AddRange(p) => {
                            kernel.ranges.insert(*p);
                        }
                        Change::DeleteRange(p) => {
                            kernel.ranges.remove(p);
                        }
                    }
                    debug!(change = %change, "applied");
                }
                Err(e) => {
                    all_ok = false;
                    self.counters.changes_failed += 1;
                    if let Change::AddSa(sa) | Change::FillSa(sa) = change {
                        failed_sas.push(sa.id());
                    }
                    self.log_error(now, &format!("{change}: {e}"));
                }
            }
        }
        (failed_sas, all_ok)
    }

    /// Records what went in: links whose SAs failed start over with a new
    /// handshake (keys that did not go in are never retried); links whose
    /// SAs are all in become established (re-key timer, confirmation probe).
    fn record(&mut self, now: Instant, failed_sas: &[SaId]) {
        let unix_now = self.unix_secs(now);
        let mut newly_installed = false;
        for link in self.links.values_mut() {
            let Some(session) = &link.session else {
                continue;
            };
            let (inb, outb) = sa_ids(&link.target, session);
            if failed_sas.contains(&inb) || failed_sas.contains(&outb) {
                link.session = None;
                link.failures += 1;
                link.next_attempt = now + backoff(link.failures);
                continue;
            }
            if !link.installed {
                newly_installed = true;
                link.installed = true;
                link.protected = true;
                // From now on the address and the key are this peer's.
                self.guard
                    .bind(link.target.remote, session.peer, &link.target.name);
                link.rekey_at =
                    Some(now + jittered(self.config.rekey_interval, session.session_id));
                let family = AddressFamily::of(link.target.local);
                if session.role == Role::Initiator {
                    // Prove to the responder that we hold the keys: a datagram
                    // through the new outbound SA confirms its session.
                    self.probes.push_back((family, link.target.handshake, outb));
                    for after in super::PROBE_AGAIN {
                        self.probes_again
                            .push((now + after, family, link.target.handshake, outb));
                    }
                }
                link.established_at = Some(unix_now);
                info!(peer = %link.target.name, family = %family, "SAs and policies installed");
            }
        }
        // Failed links leave desired state; the next pass removes their
        // leftovers. A link newly installed lets go of what it replaces of
        // the adopted state at the next pass.
        let adopted_left = self
            .adopted
            .as_ref()
            .is_some_and(|a| !a.sas.is_empty() || !a.policies.is_empty());
        self.dirty = !failed_sas.is_empty() || (newly_installed && adopted_left);
    }

    /// Wall-clock seconds at `now`, from the anchor taken at start.
    pub(super) fn unix_secs(&self, now: Instant) -> u64 {
        let (at, unix) = self.wall_anchor;
        match now.checked_duration_since(at) {
            Some(after) => (unix + after).as_secs(),
            None => unix.saturating_sub(at - now).as_secs(),
        }
    }

    /// The counters' view of soft limits: catches what a lost (or never
    /// received) kernel notification would have reported.
    fn check_soft_limits(&mut self, now: Instant) {
        let kernel_counters = &self.kernel_counters;
        self.limits_seen
            .retain(|id| kernel_counters.contains_key(id));
        let l = self.config.lifetimes;
        let over = |c: &SaCounters| {
            (l.soft_packets > 0 && c.packets >= l.soft_packets)
                || (l.soft_bytes > 0 && c.bytes >= l.soft_bytes)
        };
        let mut reached = Vec::new();
        for link in self.links.values().filter(|l| l.installed) {
            let Some(session) = &link.session else {
                continue;
            };
            let (inbound, outbound) = sa_ids(&link.target, session);
            for sa in [outbound, inbound] {
                if !self.limits_seen.contains(&sa)
                    && self.kernel_counters.get(&sa).is_some_and(over)
                {
                    reached.push(sa);
                }
            }
        }
        for sa in reached {
            self.soft_limit_reached(now, sa, "counter check");
        }
    }

    /// Takes over what a previous run left (first call), and lets go of it
    /// link by link as fresh SAs replace it: adopted outbound SAs go, adopted
    /// inbound SAs retire like any replaced inbound SA.
    fn adopt(&mut self, now: Instant, actual: &KernelState) {
        if self.adopted.is_none() {
            let has_policy = |local: IpAddr, remote: IpAddr| {
                actual.policies.values().any(|p| {
                    (p.id.src == local && p.id.dst == remote)
                        || (p.id.src == remote && p.id.dst == local)
                })
            };
            let released = self.guard.drop_restored_absent(has_policy);
            if released > 0 {
                info!(
                    pairs = released,
                    "blocked pairs of the previous run whose policies were removed while the agent was down: released"
                );
            }
            let sas: Vec<SaSpec> = actual.sas.values().cloned().collect();
            // Pairs the restored guard blocks are its own (released by the
            // peer's leave or forget), not anonymous adopted policies.
            let policies: Vec<PolicySpec> = actual
                .policies
                .values()
                .filter(|p| {
                    !(self.guard.is_blocked(p.id.src, p.id.dst)
                        || self.guard.is_blocked(p.id.dst, p.id.src))
                })
                .copied()
                .collect();
            if !sas.is_empty() || !policies.is_empty() {
                info!(
                    sas = sas.len(),
                    policies = policies.len(),
                    "adopted SAs and policies left by a previous run; re-keying them"
                );
            }
            self.adopted = Some(Adopted {
                sas,
                policies,
                deadline: now + self.config.adopt_grace,
            });
            return;
        }
        let retire_after = self.config.retire_after;
        let Some(adopted) = self.adopted.as_mut() else {
            return;
        };
        if now >= adopted.deadline {
            if !adopted.sas.is_empty() || !adopted.policies.is_empty() {
                info!(
                    sas = adopted.sas.len(),
                    policies = adopted.policies.len(),
                    "adoption period over; removing the SAs no link replaced, keeping their policies (blocked)"
                );
            }
            adopted.sas.clear();
            // The pairs stay protected: with no SA the kernel drops (fail closed).
            for p in adopted.policies.drain(..) {
                let (local, remote) = match p.id.direction {
                    Direction::Out => (p.id.src, p.id.dst),
                    Direction::In => (p.id.dst, p.id.src),
                };
                self.guard.block(Blocked {
                    local,
                    remote,
                    peer: None,
                    reason: BlockReason::Adopted,
                    since: now,
                });
            }
            return;
        }
        for link in self.links.values_mut() {
            let (local, remote) = (link.target.local, link.target.remote);
            if link.protected {
                adopted.policies.retain(|p| {
                    !((p.id.src == local && p.id.dst == remote)
                        || (p.id.src == remote && p.id.dst == local))
                });
            }
            if !link.installed {
                continue;
            }
            adopted.sas.retain(|sa| {
                let ours =
                    (sa.src == local && sa.dst == remote) || (sa.src == remote && sa.dst == local);
                if ours && sa.direction == Direction::In {
                    link.retiring.push((sa.clone(), now + retire_after));
                }
                !ours
            });
        }
    }

    /// The session whose SA has this id, if any link's current session has it.
    fn session_of(&self, id: &SaId) -> Option<u64> {
        self.links.values().find_map(|l| {
            let s = l.session.as_ref()?;
            let (local_in, out) = sa_ids(&l.target, s);
            (*id == local_in || *id == out).then_some(s.session_id)
        })
    }
}
