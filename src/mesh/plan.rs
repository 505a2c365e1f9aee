//! The reconciler's pure core: what the kernel should hold for the links'
//! sessions ([`desired`]), and the ordered changes that get it there from
//! what it holds ([`plan`]). No datapath, no clock: table-tested in
//! plan_tests.rs.

use std::collections::HashMap;

use super::links::Target;
use crate::datapath::{
    diff, Change, Direction, KernelState, Lifetimes, PolicySpec, Reqid, SaId, SaSpec,
    MIN_INBOUND_REPLAY_WINDOW,
};
use crate::handshake::Session;

/// Inbound anti-replay window for every SA meshsec installs.
pub const REPLAY_WINDOW: u32 = 4096;

/// The SAs and policies of one established link.
pub fn link_objects(
    target: &Target,
    session: &Session,
    lifetimes: Lifetimes,
) -> (SaSpec, SaSpec, [PolicySpec; 2]) {
    let aead = session.algorithm;
    let inbound = SaSpec {
        src: target.remote,
        dst: target.local,
        spi: session.local_spi,
        direction: Direction::In,
        reqid: Reqid::DEFAULT,
        aead,
        key: session.key_in.as_bytes().into(),
        replay_window: REPLAY_WINDOW.max(MIN_INBOUND_REPLAY_WINDOW),
        lifetimes,
    };
    let outbound = SaSpec {
        src: target.local,
        dst: target.remote,
        spi: session.peer_spi,
        direction: Direction::Out,
        reqid: Reqid::DEFAULT,
        aead,
        key: session.key_out.as_bytes().into(),
        replay_window: 0,
        lifetimes,
    };
    (
        inbound,
        outbound,
        PolicySpec::pair(target.local, target.remote, Reqid::DEFAULT),
    )
}

/// The kernel ids of a session's (inbound, outbound) SAs on a link.
pub fn sa_ids(target: &Target, session: &Session) -> (SaId, SaId) {
    (
        SaId {
            dst: target.local,
            spi: session.local_spi,
        },
        SaId {
            dst: target.remote,
            spi: session.peer_spi,
        },
    )
}

/// What one link contributes to the desired kernel state.
#[derive(Debug, Clone)]
pub struct LinkPlan<'a> {
    /// Where the link goes.
    pub target: &'a Target,
    /// The link's policies are in force (see `Link::protected`).
    pub protected: bool,
    /// The session whose SAs carry traffic (or are being installed).
    pub current: Option<&'a Session>,
    /// An unconfirmed responder session: only its inbound SA goes in.
    pub pending: Option<&'a Session>,
    /// Inbound SAs of replaced sessions, kept while present.
    pub retiring: Vec<&'a SaSpec>,
}

/// What a previous run left in the kernel and the mesh still keeps.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdoptedPlan<'a> {
    /// Adopted SAs (kept while present, never re-added).
    pub sas: &'a [SaSpec],
    /// Adopted policies (kept, re-added if deleted).
    pub policies: &'a [PolicySpec],
}

/// The kernel state the links want, given what the kernel holds (`actual`):
/// adopted and retiring SAs stay only while present (a vanished one is never
/// re-added under an old key), policies of protected links stay even while
/// the link re-keys (traffic is dropped, never sent in clear), a pending
/// responder session contributes its inbound SA only.
pub fn desired<'a>(
    links: impl IntoIterator<Item = LinkPlan<'a>>,
    adopted: AdoptedPlan<'_>,
    actual: &KernelState,
    lifetimes: Lifetimes,
) -> KernelState {
    let mut desired = KernelState::default();
    for sa in adopted
        .sas
        .iter()
        .filter(|sa| actual.sas.contains_key(&sa.id()))
    {
        desired.sas.insert(sa.id(), sa.clone());
    }
    for p in adopted.policies {
        desired.policies.insert(p.id, *p);
    }
    for link in links {
        if link.protected {
            for p in PolicySpec::pair(link.target.local, link.target.remote, Reqid::DEFAULT) {
                desired.policies.insert(p.id, p);
            }
        }
        for sa in link.retiring {
            if actual.sas.contains_key(&sa.id()) {
                desired.sas.insert(sa.id(), (*sa).clone());
            }
        }
        if let Some(pending) = link.pending {
            let (inb, _, _) = link_objects(link.target, pending, lifetimes);
            desired.sas.insert(inb.id(), inb);
        }
        let Some(session) = link.current else {
            continue;
        };
        let (inb, outb, pols) = link_objects(link.target, session, lifetimes);
        desired.sas.insert(inb.id(), inb);
        desired.sas.insert(outb.id(), outb);
        for p in pols {
            desired.policies.insert(p.id, p);
        }
    }
    desired
}

/// The ordered changes from `actual` to `desired` ([`diff`]), preceded by
/// replacements: the kernel identifies an SA by (dst, SPI) and the outbound
/// SPI is the peer's choice, so an SA already there under a desired id but
/// installed by another session (`installed_by` differs from `wanted_by`,
/// both by session id) holds another key and is deleted and added again.
pub fn plan(
    desired: &KernelState,
    actual: &KernelState,
    wanted_by: &HashMap<SaId, u64>,
    installed_by: &HashMap<SaId, u64>,
) -> Vec<Change> {
    let mut changes = Vec::new();
    for (id, sa) in &desired.sas {
        if !actual.sas.contains_key(id) {
            continue;
        }
        if let (Some(want), Some(had)) = (wanted_by.get(id), installed_by.get(id)) {
            if want != had {
                changes.push(Change::DeleteSa(*id));
                changes.push(Change::AddSa(sa.clone()));
            }
        }
    }
    changes.extend(diff(desired, actual));
    changes
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
