//! Table tests of the pure planner: no datapath, no clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use super::*;
use crate::datapath::{Aead, PolicyId};
use crate::handshake::crypto::derive_esp_keys;
use crate::handshake::Role;

const US: &str = "192.0.2.1";
const PEER: &str = "192.0.2.2";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn target() -> Target {
    Target {
        name: "b".into(),
        local: ip(US),
        remote: ip(PEER),
        handshake: "192.0.2.2:9341".parse().unwrap(),
    }
}

fn session(id: u64, local_spi: u32, peer_spi: u32) -> Session {
    let (k1, k2) = derive_esp_keys(&[id as u8; 32], &[7; 32], b"hash", Aead::Aes128Gcm);
    let now = Instant::now();
    Session {
        peer: [2; 32],
        peer_addr: "192.0.2.2:9341".parse().unwrap(),
        role: Role::Initiator,
        session_id: id,
        local_spi,
        peer_spi,
        algorithm: Aead::Aes128Gcm,
        key_out: k1,
        key_in: k2,
        initiator_timestamp: 0,
        started_at: now,
        established_at: now,
    }
}

fn lifetimes() -> Lifetimes {
    crate::mesh::sa_lifetimes(None, None)
}

fn sa_id(dst: &str, spi: u32) -> SaId {
    SaId { dst: ip(dst), spi }
}

fn link<'a>(
    t: &'a Target,
    protected: bool,
    current: Option<&'a Session>,
    pending: Option<&'a Session>,
    retiring: Vec<&'a SaSpec>,
) -> LinkPlan<'a> {
    LinkPlan {
        target: t,
        protected,
        current,
        pending,
        retiring,
    }
}

/// `desired` for one link: (SA ids, number of policies).
fn desired_of(l: LinkPlan<'_>, actual: &KernelState) -> (Vec<SaId>, usize) {
    let d = desired([l], AdoptedPlan::default(), actual, lifetimes());
    (d.sas.keys().copied().collect(), d.policies.len())
}

#[test]
fn desired_per_link_state() {
    let t = target();
    let cur = session(1, 0x100, 0x200);
    let pend = session(2, 0x101, 0x201);
    let old_in = link_objects(&t, &session(3, 0x102, 0x202), lifetimes()).0;
    let empty = KernelState::default();
    let mut with_old = KernelState::default();
    with_old.sas.insert(old_in.id(), old_in.clone());

    // (what, link, expected SA ids, expected policy count)
    let cases: Vec<(&str, LinkPlan<'_>, &KernelState, Vec<SaId>, usize)> = vec![
        (
            "no session, not protected: nothing",
            link(&t, false, None, None, vec![]),
            &empty,
            vec![],
            0,
        ),
        (
            "re-keying after the first install: policies stay, no SAs (drop, never clear)",
            link(&t, true, None, None, vec![]),
            &empty,
            vec![],
            2,
        ),
        (
            "current session: both SAs and both policies",
            link(&t, false, Some(&cur), None, vec![]),
            &empty,
            vec![sa_id(US, 0x100), sa_id(PEER, 0x200)],
            2,
        ),
        (
            "pending responder session: its inbound SA only",
            link(&t, false, None, Some(&pend), vec![]),
            &empty,
            vec![sa_id(US, 0x101)],
            0,
        ),
        (
            "retiring inbound SA kept while the kernel has it",
            link(&t, true, Some(&cur), None, vec![&old_in]),
            &with_old,
            vec![sa_id(US, 0x100), sa_id(US, 0x102), sa_id(PEER, 0x200)],
            2,
        ),
        (
            "a vanished retiring SA is never re-added",
            link(&t, true, Some(&cur), None, vec![&old_in]),
            &empty,
            vec![sa_id(US, 0x100), sa_id(PEER, 0x200)],
            2,
        ),
    ];
    for (what, l, actual, sas, policies) in cases {
        let (got_sas, got_pols) = desired_of(l, actual);
        assert_eq!(got_sas, sas, "{what}");
        assert_eq!(got_pols, policies, "{what}");
    }
}

#[test]
fn desired_keeps_adopted_sas_only_while_present_and_their_policies() {
    let t = target();
    let adopted_sa = link_objects(&t, &session(9, 0x900, 0x901), lifetimes()).1;
    let gone_sa = link_objects(&t, &session(8, 0x800, 0x801), lifetimes()).1;
    let pols = PolicySpec::pair(ip(US), ip(PEER), Reqid::DEFAULT);
    let mut actual = KernelState::default();
    actual.sas.insert(adopted_sa.id(), adopted_sa.clone());
    let d = desired(
        Vec::<LinkPlan<'_>>::new(),
        AdoptedPlan {
            sas: &[adopted_sa.clone(), gone_sa.clone()],
            policies: &pols,
        },
        &actual,
        lifetimes(),
    );
    assert_eq!(
        d.sas.keys().copied().collect::<Vec<_>>(),
        vec![adopted_sa.id()]
    );
    assert_eq!(d.policies.len(), 2);
}

/// The kinds of a plan, in order, for compact expectations.
fn kinds(changes: &[Change]) -> Vec<String> {
    changes
        .iter()
        .map(|c| match c {
            Change::AddSa(sa) => format!("add-sa {}", sa.id()),
            Change::FillSa(sa) => format!("fill-sa {}", sa.id()),
            Change::DeleteSa(id) => format!("del-sa {id}"),
            Change::AddPolicy(p) => format!("add-pol {}", p.id),
            Change::DeletePolicy(id) => format!("del-pol {id}"),
            Change::AddRange(p) => format!("add-range {p}"),
            Change::DeleteRange(p) => format!("del-range {p}"),
        })
        .collect()
}

#[test]
fn plan_orders_changes_and_replaces_sas_installed_by_another_session() {
    let t = target();
    let cur = session(1, 0x100, 0x200);
    let (inb, outb, pols) = link_objects(&t, &cur, lifetimes());
    let desired_state = desired(
        [link(&t, true, Some(&cur), None, vec![])],
        AdoptedPlan::default(),
        &KernelState::default(),
        lifetimes(),
    );
    let pol_ids: Vec<PolicyId> = pols.iter().map(|p| p.id).collect();
    let wanted_by: HashMap<SaId, u64> = [(inb.id(), 1), (outb.id(), 1)].into();

    // Empty kernel, inbound SPI reserved by ALLOCSPI: fill it, add the
    // outbound SA, then the policies (never a policy before its SAs).
    let mut larval = KernelState::default();
    larval.larval.insert(inb.id());
    let got = kinds(&plan(&desired_state, &larval, &wanted_by, &HashMap::new()));
    assert_eq!(
        got,
        vec![
            format!("fill-sa {}", inb.id()),
            format!("add-sa {}", outb.id()),
            format!("add-pol {}", pol_ids[0]),
            format!("add-pol {}", pol_ids[1]),
        ]
    );

    // Everything in place, installed by this session: nothing to do.
    let mut full = KernelState::default();
    full.sas.insert(inb.id(), inb.clone());
    full.sas.insert(outb.id(), outb.clone());
    for p in pols {
        full.policies.insert(p.id, p);
    }
    assert!(plan(&desired_state, &full, &wanted_by, &wanted_by).is_empty());

    // The outbound SA under the same (dst, SPI) was put there by session 7
    // (the peer reused the SPI with new keys): delete and add it, first.
    let installed_by: HashMap<SaId, u64> = [(inb.id(), 1), (outb.id(), 7)].into();
    let got = kinds(&plan(&desired_state, &full, &wanted_by, &installed_by));
    assert_eq!(
        got,
        vec![
            format!("del-sa {}", outb.id()),
            format!("add-sa {}", outb.id())
        ]
    );

    // A stale SA and policy pair of a removed peer go, policies before SAs.
    let other = Target {
        remote: ip("192.0.2.3"),
        ..target()
    };
    let (o_in, o_out, o_pols) = link_objects(&other, &session(5, 0x500, 0x501), lifetimes());
    let mut stale = full.clone();
    stale.sas.insert(o_in.id(), o_in.clone());
    stale.sas.insert(o_out.id(), o_out.clone());
    for p in o_pols {
        stale.policies.insert(p.id, p);
    }
    let got = kinds(&plan(&desired_state, &stale, &wanted_by, &wanted_by));
    assert_eq!(got.len(), 4, "{got:?}");
    assert!(got[..2].iter().all(|k| k.starts_with("del-pol")), "{got:?}");
    assert!(got[2..].iter().all(|k| k.starts_with("del-sa")), "{got:?}");
}
