//! Membership in: the links a view wants, the pairs that stay blocked when
//! a link goes (fail closed), address bindings and conflicts, `forget`.

use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::guard::{BlockReason, Blocked, Conflict};
use super::{wanted_links, Link, LinkId, Mesh};
use crate::datapath::{Datapath, SaId};
use crate::gossip::members::{Member, MemberState};

impl Mesh {
    /// Updates the wanted links from a membership view (its `last_heard_ms`
    /// as of `now`). A protected pair whose link is no longer wanted stays
    /// blocked (its policies stay, so the kernel drops rather than sends in
    /// clear) unless its peer left. Only links whose target changed are
    /// touched. The view is kept: a dead member's links go when its grace
    /// runs out by the mesh's own timer, without a new view.
    pub fn set_members(&mut self, now: Instant, members: &[Member], dp: &mut dyn Datapath) {
        self.view = members.to_vec();
        self.view_at = now;
        self.update_links(now, dp);
    }

    /// Works the links out again from the kept view, aged to `now`: a dead
    /// member's `last_heard_ms` grows with the time since the view arrived.
    pub(super) fn update_links(&mut self, now: Instant, dp: &mut dyn Datapath) {
        let view = std::mem::take(&mut self.view);
        let age = now.saturating_duration_since(self.view_at);
        let grace = self.config.dead_grace;
        let aged: Vec<Member>;
        let members: &[Member] = if age.is_zero() {
            &view
        } else {
            aged = view
                .iter()
                .map(|m| {
                    let mut m = m.clone();
                    if m.state == MemberState::Dead {
                        m.last_heard_ms = m
                            .last_heard_ms
                            .saturating_add(u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
                    }
                    m
                })
                .collect();
            &aged
        };
        self.dead_expiry = members
            .iter()
            .filter(|m| !m.is_self && m.state == MemberState::Dead)
            .filter_map(|m| grace.checked_sub(Duration::from_millis(m.last_heard_ms)))
            .filter(|left| !left.is_zero())
            .map(|left| now + left)
            .min();
        self.apply_members(now, members, dp);
        self.view = view;
    }

    fn apply_members(&mut self, now: Instant, members: &[Member], dp: &mut dyn Datapath) {
        // A member that left gives up its addresses and blocked pairs.
        for m in members.iter().filter(|m| m.state == MemberState::Left) {
            if let Some(k) = m.public_key {
                let released = self.guard.release(&m.name, &k);
                if released > 0 {
                    info!(peer = %m.name, pairs = released, "peer left: its blocked pairs are released");
                    self.dirty = true;
                }
            }
        }
        // Claims are judged per view (so the set is bounded by the view);
        // each counts when it appears.
        let bound = self.guard.bound();
        let mut key_claims = std::collections::BTreeSet::new();
        for m in members
            .iter()
            .filter(|m| !m.is_self && m.state != MemberState::Left)
        {
            let Some(k) = m.public_key else { continue };
            if let Some(owner) = bound.keys.get(&k).filter(|o| **o != m.name) {
                let claim = (m.name.clone(), k);
                if !self.key_claims.contains(&claim) {
                    self.counters.refused_key_claims += 1;
                    warn!(claimant = %m.name, owner = %owner, "record carries a peer key bound to another name; ignored");
                }
                key_claims.insert(claim);
            }
        }
        self.key_claims = key_claims;
        let conflicts = self.guard.conflicts(members);
        for c in conflicts.iter().filter(|c| !self.conflicts.contains(c)) {
            self.counters.refused_claims += 1;
            warn!(claimant = %c.claimant, address = %c.address, bound_to = %c.bound_to, "claim on an address bound to another peer; ignored");
        }
        self.conflicts = conflicts;
        let wanted = wanted_links(
            &self.self_key,
            &self.self_addrs,
            members,
            self.config.dead_grace,
            &self.guard.bound(),
        );
        let gone: Vec<LinkId> = self
            .links
            .keys()
            .filter(|id| !wanted.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            let link = self.links.remove(&id).expect("present");
            let member = members.iter().find(|m| m.public_key == Some(id.peer));
            let left = member.is_some_and(|m| m.state == MemberState::Left);
            if link.protected && !left {
                let reason = match member {
                    None => BlockReason::PeerUnreachable,
                    Some(m) if m.state == MemberState::Dead => BlockReason::PeerUnreachable,
                    Some(_) => BlockReason::NoUsableRecord,
                };
                warn!(peer = %link.target.name, family = %id.family, %reason, "link removed; its traffic stays blocked (never clear) until the peer is back, leaves, or meshsec forget");
                self.guard.block(Blocked {
                    local: link.target.local,
                    remote: link.target.remote,
                    peer: Some((link.target.name.clone(), id.peer)),
                    reason,
                    since: now,
                });
            } else {
                info!(peer = %link.target.name, family = %id.family, "link removed");
            }
            if let Some(ep) = self.endpoints.get_mut(&id.family) {
                if let Some(spi) = ep.forget(&id.peer) {
                    let _ = dp.delete_sa(SaId {
                        dst: link.target.local,
                        spi,
                    });
                }
            }
            self.dirty = true;
        }
        let mut refused = 0u64;
        for (id, target) in wanted {
            // Blocked pairs count against the cap too (each keeps two
            // policies); a link that takes a blocked pair back adds nothing.
            let full = self.links.len() + self.guard.blocked_len() >= self.config.max_links
                && !self.guard.is_blocked(target.local, target.remote);
            match self.links.get_mut(&id) {
                Some(link) if link.target == target => {}
                Some(link) => {
                    // Addresses changed: the old session's SAs no longer fit.
                    // The peer itself gave up the old address: it is released.
                    info!(peer = %target.name, family = %id.family, "link addresses changed; re-keying");
                    self.guard.unbind(link.target.remote, &id.peer);
                    let protected = self.guard.unblock(target.local, target.remote);
                    link.target = target;
                    link.session = None;
                    link.installed = false;
                    link.protected = protected;
                    link.next_attempt = now;
                    if let Some(ep) = self.endpoints.get_mut(&id.family) {
                        if let Some(spi) = ep.cancel(&id.peer) {
                            let _ = dp.delete_sa(SaId {
                                dst: link.target.local,
                                spi,
                            });
                        }
                    }
                    self.dirty = true;
                }
                None if full => refused += 1,
                None => {
                    debug!(peer = %target.name, family = %id.family, "link wanted");
                    // A blocked pair stays protected while the link re-keys.
                    let protected = self.guard.unblock(target.local, target.remote);
                    self.links.insert(
                        id,
                        Link {
                            target,
                            session: None,
                            pending: None,
                            retiring: Vec::new(),
                            rekey_at: None,
                            installed: false,
                            protected,
                            established_at: None,
                            next_attempt: now,
                            failures: 0,
                        },
                    );
                }
            }
        }
        if refused > 0 {
            self.counters.links_refused += refused;
            if let Some(suppressed) = self.error_log.check(now, "links_refused") {
                warn!(
                    refused,
                    max_links = self.config.max_links,
                    suppressed,
                    "membership wants more links than the cap; the rest are not linked"
                );
            }
        }
    }

    /// Releases what is held for the peer `name` (a node name, or a peer
    /// address): its address bindings and blocked pairs, whose policies then
    /// go at the next reconcile. Returns how many entries were released.
    pub fn forget(&mut self, name: &str) -> usize {
        let n = self.guard.forget(name);
        if n > 0 {
            info!(peer = %name, entries = n, "forgotten: bindings and blocked pairs released");
            self.dirty = true;
        }
        n
    }

    /// Claims on addresses bound to another peer (ignored), as of the last view.
    pub fn conflicts(&self) -> &[Conflict] {
        &self.conflicts
    }

    /// The pairs kept blocked (policies without SAs), and why.
    pub fn blocked(&self) -> Vec<Blocked> {
        self.guard.blocked().cloned().collect()
    }
}
