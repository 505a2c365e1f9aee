//! Meshes of in-memory nodes exchanging handshake datagrams directly, with
//! a virtual clock: membership in, kernel state out.

use super::*;
use crate::datapath::{Direction, KernelEvent, MemoryDatapath};
use crate::gossip::members::{Member, MemberState};

struct Node {
    name: String,
    key: StaticKeypair,
    addrs: Vec<IpAddr>,
    mesh: Mesh,
    dp: MemoryDatapath,
}

/// Wall-clock time at `now` for the test meshes: a fixed epoch plus the
/// virtual time since a base instant shared by every test, so a mesh
/// restarted later (a new agent) stamps later handshakes, as a real clock
/// would.
fn wall(now: Instant) -> Duration {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let base = BASE.get_or_init(|| {
        let t = Instant::now();
        t.checked_sub(Duration::from_secs(60)).unwrap_or(t)
    });
    Duration::from_secs(1_700_000_000) + now.saturating_duration_since(*base)
}

/// Timers due at `now` fire, and the kernel is re-read whatever is due.
fn resync(n: &mut Node, now: Instant) {
    n.mesh.handle_timeout(now, &mut n.dp);
    n.mesh.reconcile(now, &mut n.dp);
}

fn node(name: &str, i: u8, secret: [u8; 32], now: Instant) -> Node {
    node_with(name, i, secret, now, MeshConfig::default())
}

fn node_with(name: &str, i: u8, secret: [u8; 32], now: Instant, config: MeshConfig) -> Node {
    let key = StaticKeypair::from_private([i; 32]);
    let addrs: Vec<IpAddr> = vec![
        format!("192.0.2.{}", 10 + i).parse().unwrap(),
        format!("2001:db8::{}", 10 + i).parse().unwrap(),
    ];
    let mesh = Mesh::new(
        config,
        key.clone(),
        &[secret],
        addrs.clone(),
        now,
        wall(now),
    )
    .unwrap();
    Node {
        name: name.into(),
        key,
        addrs,
        mesh,
        dp: MemoryDatapath::new(),
    }
}

/// The node's agent restarts (kill -9: the kernel keeps everything) with
/// the same key, default config and cluster secret `secret`.
fn restart(n: &mut Node, secret: [u8; 32], now: Instant) {
    n.mesh = Mesh::new(
        MeshConfig::default(),
        n.key.clone(),
        &[secret],
        n.addrs.clone(),
        now,
        wall(now),
    )
    .unwrap();
}

fn member(n: &Node, state: MemberState, is_self: bool) -> Member {
    Member {
        name: n.name.clone(),
        gossip_addr: SocketAddr::new(n.addrs[0], 9340),
        data_addrs: n.addrs.clone(),
        state,
        public_key: Some(*n.key.public()),
        signing_key: None,
        generation: 1,
        handshake_port: Some(9341),
        protocol: Some(1),
        last_heard_ms: 0,
        is_self,
    }
}

fn view(nodes: &[Node], me: usize, state_of: impl Fn(usize) -> MemberState) -> Vec<Member> {
    nodes
        .iter()
        .enumerate()
        .map(|(j, n)| {
            member(
                n,
                if j == me {
                    MemberState::Alive
                } else {
                    state_of(j)
                },
                j == me,
            )
        })
        .collect()
}

/// Runs the nodes for `rounds × step` of virtual time on the shared harness
/// ([`crate::sim`]): each node is woken only when its `poll_timeout()` is
/// due, datagrams take 10 ms, and the n-th handshake datagram sent (from 1)
/// is dropped when `drop(n)` says so. Datagrams still in flight at the end
/// are delivered before it returns (the clock moves on by that much).
fn run(
    nodes: &mut Vec<Node>,
    now: &mut Instant,
    rounds: usize,
    step: Duration,
    mut drop: impl FnMut(usize) -> bool + 'static,
) {
    let mut sim = crate::sim::Sim::new(
        nodes.drain(..).map(|n| SimMesh(n, Vec::new())).collect(),
        crate::sim::Net::perfect(),
    );
    sim.now = *now;
    let mut sent = 0usize;
    sim.filter = Some(Box::new(move |p: &crate::sim::Packet| {
        if driver::parse_probe(&p.bytes).is_some() {
            return crate::sim::Verdict::Pass;
        }
        sent += 1;
        if drop(sent) {
            crate::sim::Verdict::Drop
        } else {
            crate::sim::Verdict::Pass
        }
    }));
    sim.drive_for(step * rounds as u32);
    // Nothing stays in flight between runs (the harness lives for one run):
    // let what was sent arrive, and whatever it triggers, a few ms later.
    while !sim.in_flight.is_empty() {
        sim.drive_for(Duration::from_millis(10));
    }
    *now = sim.now;
    nodes.extend(sim.nodes.into_iter().map(|n| n.0));
}

/// Confirmation probes travel through the sender's outbound SA: the model
/// counts one packet on the receiver's inbound SA with that id, as the
/// kernel would (only if the receiver has that SA).
fn deliver_probes(nodes: &mut [Node]) {
    let mut probes = Vec::new();
    for n in nodes.iter_mut() {
        while let Some((_, to, sa)) = n.mesh.poll_probe() {
            probes.push((to, sa));
        }
    }
    for (to, sa) in probes {
        if let Some(dst) = nodes.iter_mut().find(|n| n.addrs.contains(&to.ip())) {
            dst.dp.record_traffic(sa, 64, 1);
        }
    }
}

fn sa_specs(n: &mut Node) -> Vec<crate::datapath::SaState> {
    n.dp.dump_sas()
        .unwrap()
        .into_iter()
        .filter(|s| !s.larval)
        .collect()
}

#[test]
fn three_nodes_establish_crossed_sas_per_family() {
    let mut now = Instant::now();
    let secret = [7u8; 32];
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| node(&format!("n{i}"), i as u8 + 1, secret, now))
        .collect();
    introduce(&mut nodes, 0..3, now);
    run(&mut nodes, &mut now, 20, Duration::from_millis(100), |_| {
        false
    });

    for (i, node) in nodes.iter_mut().enumerate() {
        let sas = sa_specs(node);
        // 2 peers × 2 families × (in + out).
        assert_eq!(sas.len(), 8, "node {i}: {sas:?}");
        assert_eq!(node.dp.dump_policies().unwrap().len(), 8);
        let st = node.mesh.link_status();
        assert_eq!(st.len(), 2);
        assert!(st
            .values()
            .flatten()
            .all(|l| l.state == LinkState::Established));
    }
    // Every outbound SA of a node is an inbound SA of its peer, with the same key.
    for i in 0..3 {
        for out in sa_specs(&mut nodes[i])
            .into_iter()
            .filter(|s| s.direction == Some(Direction::Out))
        {
            let j = nodes
                .iter()
                .position(|n| n.addrs.contains(&out.dst))
                .unwrap();
            let key_here = nodes[i].dp.key_of(out.id()).unwrap().to_vec();
            let peer_in = sa_specs(&mut nodes[j])
                .into_iter()
                .find(|s| s.id() == out.id())
                .expect("peer has the inbound SA");
            assert_eq!(peer_in.direction, Some(Direction::In));
            assert_eq!(
                nodes[j].dp.key_of(peer_in.id()).unwrap(),
                key_here.as_slice()
            );
        }
    }
    // Keys of the two families and the two directions all differ.
    let mut keys: Vec<Vec<u8>> = sa_specs(&mut nodes[0])
        .iter()
        .map(|s| nodes[0].dp.key_of(s.id()).unwrap().to_vec())
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 8);
}

#[test]
fn handshake_survives_loss_and_wrong_secret_installs_nothing() {
    let mut now = Instant::now();
    let mut nodes = vec![
        node("a", 1, [1; 32], now),
        node("b", 2, [1; 32], now),
        node("evil", 3, [2; 32], now),
    ];
    introduce(&mut nodes, 0..3, now);
    // Drop every third datagram.
    run(&mut nodes, &mut now, 200, Duration::from_millis(100), |k| {
        k % 3 == 0
    });
    assert_eq!(
        sa_specs(&mut nodes[0])
            .iter()
            .filter(|s| s.dst == nodes[1].addrs[0] || s.src == nodes[1].addrs[0])
            .count(),
        2
    );
    assert_eq!(
        sa_specs(&mut nodes[2]).len(),
        0,
        "wrong secret must install nothing"
    );
    assert!(sa_specs(&mut nodes[0])
        .iter()
        .all(|s| !nodes[2].addrs.contains(&s.dst) && !nodes[2].addrs.contains(&s.src)));
    assert_eq!(nodes[0].dp.dump_policies().unwrap().len(), 4);
}

#[test]
fn left_member_is_removed_and_vanished_sa_is_rekeyed_with_new_spis() {
    let mut now = Instant::now();
    let mut nodes = vec![node("a", 1, [1; 32], now), node("b", 2, [1; 32], now)];
    introduce(&mut nodes, 0..2, now);
    run(&mut nodes, &mut now, 20, Duration::from_millis(100), |_| {
        false
    });
    let before: Vec<SaId> = sa_specs(&mut nodes[0]).iter().map(|s| s.id()).collect();
    assert_eq!(before.len(), 4);

    // Someone deletes an SA by hand: the next resync re-keys that link (new SPIs).
    let victim = before[0];
    nodes[0].dp.delete_sa(victim).unwrap();
    let n = &mut nodes[0];
    resync(n, now);
    run(&mut nodes, &mut now, 30, Duration::from_millis(100), |_| {
        false
    });
    let after: Vec<SaId> = sa_specs(&mut nodes[0]).iter().map(|s| s.id()).collect();
    assert_eq!(after.len(), 4);
    assert!(
        !after.contains(&victim),
        "the vanished SA's keys must not come back"
    );
    assert_eq!(nodes[0].mesh.counters().sas_vanished, 1);

    // b leaves: a removes its SAs and policies at once.
    let v = view(&nodes, 0, |_| MemberState::Left);
    let n = &mut nodes[0];
    n.mesh.set_members(now, &v, &mut n.dp);
    n.mesh.handle_timeout(now, &mut n.dp);
    assert!(sa_specs(&mut nodes[0]).is_empty());
    assert!(nodes[0].dp.dump_policies().unwrap().is_empty());
}

#[test]
fn dead_member_keeps_sas_for_the_grace_period() {
    let now = Instant::now();
    let a = node("a", 1, [1; 32], now);
    let b = node("b", 2, [1; 32], now);
    let mut dead = member(&b, MemberState::Dead, false);
    dead.last_heard_ms = 30_000;
    let links = wanted_links(
        a.key.public(),
        &a.addrs,
        &[member(&a, MemberState::Alive, true), dead.clone()],
        Duration::from_secs(60),
        &Default::default(),
    );
    assert_eq!(links.len(), 2);
    dead.last_heard_ms = 61_000;
    let links = wanted_links(
        a.key.public(),
        &a.addrs,
        &[dead],
        Duration::from_secs(60),
        &Default::default(),
    );
    assert!(links.is_empty());
}

#[test]
fn hostile_addresses_and_duplicate_claims_are_not_linked() {
    let now = Instant::now();
    let a = node("a", 1, [1; 32], now);
    let b = node("b", 2, [1; 32], now);
    let c = node("c", 3, [1; 32], now);
    let me = member(&a, MemberState::Alive, true);
    let mut mb = member(&b, MemberState::Alive, false);
    let mut mc = member(&c, MemberState::Alive, false);
    // b claims c's IPv4 address; c claims our own IPv6 address.
    mb.data_addrs = vec![c.addrs[0], b.addrs[1]];
    mc.data_addrs = vec![c.addrs[0], a.addrs[1]];
    let links = wanted_links(
        a.key.public(),
        &a.addrs,
        &[me.clone(), mb.clone(), mc.clone()],
        Duration::from_secs(60),
        &Default::default(),
    );
    let remotes: Vec<IpAddr> = links.values().map(|t| t.remote).collect();
    assert_eq!(
        remotes,
        vec![b.addrs[1]],
        "only b's own IPv6 address is usable"
    );
    // Unspecified, loopback and multicast addresses are never linked.
    mb.data_addrs = vec![
        "0.0.0.0".parse().unwrap(),
        "::1".parse().unwrap(),
        "ff02::1".parse().unwrap(),
    ];
    assert!(wanted_links(
        a.key.public(),
        &a.addrs,
        &[me.clone(), mb.clone()],
        Duration::from_secs(60),
        &Default::default()
    )
    .is_empty());
    // Two members with one key: neither is linked.
    let mut mc2 = member(&c, MemberState::Alive, false);
    mc2.public_key = member(&b, MemberState::Alive, false).public_key;
    let mb2 = member(&b, MemberState::Alive, false);
    assert!(wanted_links(
        a.key.public(),
        &a.addrs,
        &[me, mb2, mc2],
        Duration::from_secs(60),
        &Default::default()
    )
    .is_empty());
}

#[test]
fn families_only_where_both_sides_have_addresses() {
    let now = Instant::now();
    let a = node("a", 1, [1; 32], now);
    let b = node("b", 2, [1; 32], now);
    let mut mb = member(&b, MemberState::Alive, false);
    mb.data_addrs.retain(|x| x.is_ipv4());
    let links = wanted_links(
        a.key.public(),
        &a.addrs,
        &[mb],
        Duration::from_secs(60),
        &Default::default(),
    );
    assert_eq!(
        links.keys().map(|k| k.family).collect::<Vec<_>>(),
        vec![AddressFamily::V4]
    );
}

fn mesh_of(n: usize, now: Instant) -> Vec<Node> {
    let mut nodes: Vec<Node> = (0..n)
        .map(|i| node(&format!("n{i}"), i as u8 + 1, [1; 32], now))
        .collect();
    introduce(&mut nodes, 0..n, now);
    nodes
}

/// Every outbound SA a node has is an inbound SA of its peer with the same
/// key: traffic sent right now would be accepted (nothing is lost).
fn assert_outbound_accepted(nodes: &mut [Node], when: &str) {
    for i in 0..nodes.len() {
        let outs: Vec<_> = sa_specs(&mut nodes[i])
            .into_iter()
            .filter(|s| s.direction == Some(Direction::Out))
            .collect();
        for out in outs {
            let j = nodes
                .iter()
                .position(|n| n.addrs.contains(&out.dst))
                .expect("peer");
            let key = nodes[i].dp.key_of(out.id()).unwrap().to_vec();
            assert_eq!(
                nodes[j].dp.key_of(out.id()).map(|k| k.to_vec()).as_deref(),
                Some(key.as_slice()),
                "{when}: {}'s outbound {:?} has no matching inbound SA on {}",
                nodes[i].name,
                out.id(),
                nodes[j].name
            );
        }
    }
}

#[test]
fn policies_stay_while_a_link_rekeys() {
    let mut now = Instant::now();
    let mut nodes = mesh_of(2, now);
    run(&mut nodes, &mut now, 20, Duration::from_millis(100), |_| {
        false
    });
    assert_eq!(nodes[0].dp.dump_policies().unwrap().len(), 4);
    let victim = sa_specs(&mut nodes[0])[0].id();
    nodes[0].dp.delete_sa(victim).unwrap();
    let n = &mut nodes[0];
    resync(n, now);
    // Nothing delivered yet: the link is re-handshaking, and must not fall back to plaintext.
    assert_eq!(
        nodes[0].dp.dump_policies().unwrap().len(),
        4,
        "fail closed while re-keying"
    );
}

#[test]
fn ten_forced_rekeys_in_30s_never_leave_an_unmatched_outbound_sa() {
    let mut now = Instant::now();
    let mut nodes = mesh_of(3, now);
    run(&mut nodes, &mut now, 30, Duration::from_millis(100), |_| {
        false
    });
    let before: Vec<SaId> = sa_specs(&mut nodes[0]).iter().map(|s| s.id()).collect();
    assert_eq!(before.len(), 8);
    for k in 0..10 {
        // Alternate which side starts the re-key, so both roles are exercised.
        let who = k % 3;
        let n = &mut nodes[who];
        assert!(n.mesh.force_rekey(now, None) > 0);
        for _ in 0..30 {
            run(&mut nodes, &mut now, 1, Duration::from_millis(100), |_| {
                false
            });
            assert_outbound_accepted(&mut nodes, &format!("rekey {k}"));
        }
    }
    run(
        &mut nodes,
        &mut now,
        150,
        Duration::from_millis(100),
        |_| false,
    );
    let after: Vec<SaId> = sa_specs(&mut nodes[0]).iter().map(|s| s.id()).collect();
    assert_eq!(
        after.len(),
        8,
        "old inbound SAs retired, nothing leaked: {after:?}"
    );
    assert!(
        after.iter().all(|id| !before.contains(id)),
        "every SA was replaced"
    );
    assert!(nodes.iter().all(|n| n.mesh.counters().rekeys_started > 0));
    assert!(
        nodes
            .iter()
            .map(|n| n.mesh.counters().sessions_confirmed)
            .sum::<u64>()
            >= 10
    );
}

#[test]
fn replayed_initiation_after_a_restart_installs_nothing_lasting() {
    let mut now = Instant::now();
    let mut nodes = mesh_of(2, now);
    // An on-path observer records everything b sends.
    let mut captured = Vec::new();
    for _ in 0..20 {
        for n in nodes.iter_mut() {
            n.mesh.handle_timeout(now, &mut n.dp);
        }
        let mut inflight = Vec::new();
        for (k, n) in nodes.iter_mut().enumerate() {
            while let Some((family, to, bytes)) = n.mesh.poll_transmit() {
                let from = SocketAddr::new(
                    *n.addrs
                        .iter()
                        .find(|a| AddressFamily::of(**a) == family)
                        .unwrap(),
                    9341,
                );
                if k == 1 {
                    captured.push((family, from, bytes.clone()));
                }
                inflight.push((family, from, to, bytes));
            }
        }
        for (family, from, to, bytes) in inflight {
            if let Some(dst) = nodes.iter_mut().find(|n| n.addrs.contains(&to.ip())) {
                dst.mesh
                    .handle_datagram(now, family, from, &bytes, &mut dst.dp);
            }
        }
        deliver_probes(&mut nodes);
        now += Duration::from_millis(100);
    }
    assert!(nodes[0]
        .mesh
        .link_status()
        .values()
        .flatten()
        .all(|l| l.state == LinkState::Established));
    // a's agent restarts (same key, same kernel); the attacker replays b's old datagrams at once.
    now += Duration::from_secs(5);
    restart(&mut nodes[0], [1; 32], now);
    let v = view(&nodes, 0, |_| MemberState::Alive);
    let n = &mut nodes[0];
    n.mesh.set_members(now, &v, &mut n.dp);
    for (family, from, bytes) in &captured {
        let n = &mut nodes[0];
        n.mesh
            .handle_datagram(now, *family, *from, bytes, &mut n.dp);
    }
    // The replayed session is never confirmed (10 s), a's own handshake then
    // replaces the adopted SAs, whose inbound half retires 10 s later.
    for round in 0..260 {
        run(&mut nodes, &mut now, 1, Duration::from_millis(100), |_| {
            false
        });
        assert_outbound_accepted(&mut nodes, &format!("round {round} after replay"));
    }
    assert!(
        nodes[0].mesh.counters().sessions_unconfirmed >= 1,
        "{:?}",
        nodes[0].mesh.counters()
    );
    assert_eq!(sa_specs(&mut nodes[0]).len(), 4);
    assert!(nodes[0]
        .mesh
        .link_status()
        .values()
        .flatten()
        .all(|l| l.state == LinkState::Established));
}

#[test]
fn restarted_agents_adopt_kernel_state_and_rekey_without_a_gap() {
    let mut now = Instant::now();
    let mut nodes = mesh_of(3, now);
    run(&mut nodes, &mut now, 30, Duration::from_millis(100), |_| {
        false
    });
    let before: Vec<SaId> = sa_specs(&mut nodes[0]).iter().map(|s| s.id()).collect();
    assert_eq!(before.len(), 8);
    // Both ends of the 0-1 links restart (kill -9: the kernel keeps everything).
    for i in [0, 1] {
        restart(&mut nodes[i], [1; 32], now);
    }
    // Before it knows any member, the restarted agent must not touch what it found.
    for i in [0, 1] {
        let n = &mut nodes[i];
        resync(n, now);
    }
    assert_eq!(sa_specs(&mut nodes[0]).len(), 8, "adopted, not flushed");
    assert_outbound_accepted(&mut nodes, "right after restart");
    introduce(&mut nodes, [0, 1], now);
    for round in 0..200 {
        run(&mut nodes, &mut now, 1, Duration::from_millis(100), |_| {
            false
        });
        assert_outbound_accepted(&mut nodes, &format!("round {round} after restart"));
    }
    let after: Vec<SaId> = sa_specs(&mut nodes[0]).iter().map(|s| s.id()).collect();
    assert_eq!(after.len(), 8, "{after:?}");
    assert!(
        after.iter().all(|id| !before.contains(id)),
        "adopted SAs were re-keyed: before {before:?} after {after:?}"
    );
    assert_eq!(nodes[0].dp.dump_policies().unwrap().len(), 8);
}

/// Two established nodes whose SAs carry a 1000-packet soft limit.
fn limited_pair(now: &mut Instant) -> Vec<Node> {
    let config = MeshConfig {
        lifetimes: crate::config::RekeyPolicy {
            after_packets: Some(1000),
            ..Default::default()
        }
        .lifetimes(),
        ..MeshConfig::default()
    };
    let mut nodes: Vec<Node> = (0..2)
        .map(|i| node_with(&format!("n{i}"), i as u8 + 1, [1; 32], *now, config.clone()))
        .collect();
    introduce(&mut nodes, 0..2, *now);
    run(&mut nodes, now, 30, Duration::from_millis(100), |_| false);
    for n in nodes.iter_mut() {
        let sas = sa_specs(n);
        assert_eq!(sas.len(), 4);
        assert!(
            sas.iter()
                .all(|s| s.lifetimes.soft_packets == 1000 && s.lifetimes.hard_packets == 2000),
            "{sas:?}"
        );
    }
    nodes
}

/// Node `i`'s outbound SA of the IPv4 link, i.e. the peer's inbound one.
fn outbound_v4(n: &mut Node) -> SaId {
    sa_specs(n)
        .into_iter()
        .find(|s| s.direction == Some(Direction::Out) && s.dst.is_ipv4())
        .expect("outbound v4 SA")
        .id()
}

#[test]
fn soft_expire_of_an_outbound_sa_rekeys_its_link_at_once_and_only_once() {
    let mut now = Instant::now();
    let mut nodes = limited_pair(&mut now);
    let out = outbound_v4(&mut nodes[0]);
    // The kernel reports both ends at the same moment: n0's outbound, n1's inbound.
    nodes[0].mesh.handle_kernel_event(
        now,
        KernelEvent::Expire {
            sa: out,
            hard: false,
        },
    );
    nodes[1].mesh.handle_kernel_event(
        now,
        KernelEvent::Expire {
            sa: out,
            hard: false,
        },
    );
    // A repeated notification acts no more.
    nodes[0].mesh.handle_kernel_event(
        now,
        KernelEvent::Expire {
            sa: out,
            hard: false,
        },
    );
    run(&mut nodes, &mut now, 1, Duration::from_millis(100), |_| {
        false
    });
    assert_eq!(
        nodes[0].mesh.counters().rekeys_started,
        1,
        "the sender re-keys at once"
    );
    for _ in 0..60 {
        run(&mut nodes, &mut now, 1, Duration::from_millis(100), |_| {
            false
        });
        assert_outbound_accepted(&mut nodes, "during the limit re-key");
    }
    assert!(
        !sa_specs(&mut nodes[0]).iter().any(|s| s.id() == out),
        "the expired SA is gone"
    );
    assert_ne!(outbound_v4(&mut nodes[0]), out);
    assert_eq!(
        nodes[1].mesh.counters().rekeys_started,
        0,
        "the receiver's fallback was not needed"
    );
    let c0 = nodes[0].mesh.counters();
    assert_eq!((c0.kernel_soft_expires, c0.soft_limits_reached), (2, 1));
    assert_eq!(nodes[1].mesh.counters().soft_limits_reached, 1);
    // The IPv6 link was not touched.
    assert_eq!(nodes[0].mesh.counters().sessions_established, 3);
}

#[test]
fn soft_expire_of_an_inbound_sa_rekeys_after_a_delay_if_the_peer_does_not() {
    let mut now = Instant::now();
    let mut nodes = limited_pair(&mut now);
    let inbound = outbound_v4(&mut nodes[0]);
    nodes[1].mesh.handle_kernel_event(
        now,
        KernelEvent::Expire {
            sa: inbound,
            hard: false,
        },
    );
    let t0 = now;
    while now < t0 + INBOUND_LIMIT_DELAY - Duration::from_millis(100) {
        run(&mut nodes, &mut now, 1, Duration::from_millis(100), |_| {
            false
        });
    }
    assert_eq!(
        nodes[1].mesh.counters().rekeys_started,
        0,
        "not before the delay"
    );
    run(&mut nodes, &mut now, 40, Duration::from_millis(100), |_| {
        false
    });
    assert_eq!(nodes[1].mesh.counters().rekeys_started, 1);
    assert_ne!(outbound_v4(&mut nodes[0]), inbound, "the link has new SAs");
}

#[test]
fn counters_at_the_soft_limit_rekey_even_without_a_notification() {
    let mut now = Instant::now();
    let mut nodes = limited_pair(&mut now);
    let out = outbound_v4(&mut nodes[0]);
    assert!(nodes[0].dp.record_traffic(out, 999 * 100, 999));
    let n = &mut nodes[0];
    resync(n, now);
    assert_eq!(
        n.mesh.counters().soft_limits_reached,
        0,
        "999 packets: below the limit"
    );
    assert!(n.dp.record_traffic(out, 100, 1));
    resync(n, now);
    assert_eq!(n.mesh.counters().soft_limits_reached, 1);
    run(&mut nodes, &mut now, 30, Duration::from_millis(100), |_| {
        false
    });
    assert_eq!(nodes[0].mesh.counters().rekeys_started, 1);
    assert_eq!(nodes[0].mesh.counters().kernel_soft_expires, 0);
    assert_ne!(outbound_v4(&mut nodes[0]), out);
}

#[test]
fn expiry_of_unknown_sas_and_table_changes_rekey_nothing() {
    let mut now = Instant::now();
    let mut nodes = limited_pair(&mut now);
    let before = sa_specs(&mut nodes[0]);
    let stranger = SaId {
        dst: "192.0.2.99".parse().unwrap(),
        spi: 0xdead,
    };
    nodes[0].mesh.handle_kernel_event(
        now,
        KernelEvent::Expire {
            sa: stranger,
            hard: false,
        },
    );
    nodes[0]
        .mesh
        .handle_kernel_event(now, KernelEvent::TablesChanged);
    nodes[0].mesh.handle_kernel_event(now, KernelEvent::Overrun);
    run(&mut nodes, &mut now, 40, Duration::from_millis(100), |_| {
        false
    });
    let c = nodes[0].mesh.counters();
    assert_eq!(
        (
            c.rekeys_started,
            c.kernel_soft_expires,
            c.soft_limits_reached,
            c.kernel_event_overruns
        ),
        (0, 0, 0, 1)
    );
    assert_eq!(sa_specs(&mut nodes[0]), before);
}

#[test]
fn a_table_change_event_repairs_drift_before_the_periodic_resync() {
    let mut now = Instant::now();
    let mut nodes = limited_pair(&mut now);
    let victim = outbound_v4(&mut nodes[0]);
    nodes[0].dp.delete_sa(victim).unwrap();
    nodes[0]
        .mesh
        .handle_kernel_event(now, KernelEvent::TablesChanged);
    // `run` never asks for the periodic resync: only the event can notice.
    run(&mut nodes, &mut now, 30, Duration::from_millis(100), |_| {
        false
    });
    assert_eq!(nodes[0].mesh.counters().sas_vanished, 1);
    assert_ne!(outbound_v4(&mut nodes[0]), victim);
    assert_outbound_accepted(&mut nodes, "after the repair");
}

#[test]
fn a_slow_rekey_handshake_rekeys_each_link_once() {
    let mut now = Instant::now();
    let mut nodes = mesh_of(2, now);
    run(&mut nodes, &mut now, 30, Duration::from_millis(100), |_| {
        false
    });
    let (started, established) = (
        nodes[0].mesh.counters().rekeys_started,
        nodes[0].mesh.counters().sessions_established,
    );
    assert_eq!(nodes[0].mesh.force_rekey(now, None), 2);
    // The first 1.5 s of handshake datagrams are lost: retransmits finish the
    // re-keys after the 1 s retry deadline has passed.
    let t0 = now;
    let clock = std::cell::Cell::new(now);
    for _ in 0..100 {
        let cut = clock.get() < t0 + Duration::from_millis(1500);
        run(
            &mut nodes,
            &mut now,
            1,
            Duration::from_millis(100),
            move |_| cut,
        );
        clock.set(now);
    }
    let c = nodes[0].mesh.counters();
    assert_eq!(
        c.rekeys_started - started,
        2,
        "one re-key per link, not a second one after the switch"
    );
    assert_eq!(c.sessions_established - established, 2);
    assert_outbound_accepted(&mut nodes, "after the slow re-keys");
}

#[test]
fn a_new_initiating_secret_restarts_handshakes_in_flight() {
    let mut now = Instant::now();
    let mut nodes = mesh_of(2, now);
    run(&mut nodes, &mut now, 30, Duration::from_millis(100), |_| {
        false
    });
    let established = nodes[0].mesh.counters().sessions_established;
    assert_eq!(nodes[0].mesh.force_rekey(now, None), 2);
    // The initiations (old secret) go out and are lost.
    run(&mut nodes, &mut now, 1, Duration::from_millis(100), |_| {
        true
    });
    // Both ends move on: n1 already knows only the new secret, n0 initiates with it.
    let new = [9u8; 32];
    let n = &mut nodes[1];
    n.mesh.set_keyring(now, &[new], &mut n.dp).unwrap();
    let n = &mut nodes[0];
    n.mesh.set_keyring(now, &[new, [1; 32]], &mut n.dp).unwrap();
    // Well within the 20 s handshake timeout the links have new sessions.
    run(&mut nodes, &mut now, 20, Duration::from_millis(100), |_| {
        false
    });
    assert_eq!(
        nodes[0].mesh.counters().sessions_established - established,
        2
    );
    assert_eq!(nodes[1].mesh.handshake_counters().bad_mac, 0);
    assert_outbound_accepted(&mut nodes, "after the re-keys under the new secret");
    // No SPI reservation of the abandoned initiations is left behind.
    assert_eq!(
        nodes[0]
            .dp
            .dump_sas()
            .unwrap()
            .iter()
            .filter(|s| s.larval)
            .count(),
        0
    );
}

#[test]
fn kernel_writes_go_through_one_pipelined_apply_per_reconcile() {
    let mut now = Instant::now();
    let mut nodes = introduced(3, now);
    run(&mut nodes, &mut now, 20, Duration::from_millis(100), |_| {
        false
    });
    for (i, n) in nodes.iter_mut().enumerate() {
        assert_eq!(sa_specs(n).len(), 8, "node {i} established");
        let calls = n.dp.write_calls();
        // 8 SAs + 8 policies at least went in, all of them through apply.
        assert!(calls.applied_changes >= 16, "node {i}: {calls:?}");
        assert_eq!(calls.direct_writes, 0, "node {i}: {calls:?}");
        // Batched: fewer apply calls than changes (one per reconcile with work).
        assert!(calls.apply < calls.applied_changes, "node {i}: {calls:?}");
    }
}

/// A mesh node for the shared harness ([`crate::sim`]): driven only when
/// its own `poll_timeout()` is due. Confirmation probes travel as datagrams
/// tagged with the SA they would use; the receiver counts one packet on its
/// inbound SA with that id, as the kernel would.
struct SimMesh(Node, Vec<(SocketAddr, SocketAddr, Vec<u8>)>);

impl crate::sim::SimNode for SimMesh {
    fn owns(&self, addr: SocketAddr) -> bool {
        addr.port() == 9341 && self.0.addrs.contains(&addr.ip())
    }

    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, to: SocketAddr, bytes: &[u8]) {
        let n = &mut self.0;
        // The driver's probe format; the in-memory datapath counts it as the
        // kernel counts a probe that came through ESP.
        if let Some(spi) = driver::parse_probe(bytes) {
            n.dp.probe_arrived(SaId {
                dst: to.ip(),
                spi: spi.expect("probes name their SA"),
            });
            return;
        }
        let family = AddressFamily::of(to.ip());
        n.mesh.handle_datagram(now, family, from, bytes, &mut n.dp);
    }

    fn poll_transmit(&mut self, _now: Instant) -> Option<(SocketAddr, SocketAddr, Vec<u8>)> {
        let n = &mut self.0;
        let from = |family| {
            let ip = n.addrs.iter().find(|a| AddressFamily::of(**a) == family);
            SocketAddr::new(*ip.expect("an address of the family"), 9341)
        };
        if let Some((family, to, bytes)) = n.mesh.poll_transmit() {
            return Some((from(family), to, bytes));
        }
        if let Some(copy) = self.1.pop() {
            return Some(copy);
        }
        // Three copies, as the driver sends (one lost probe costs a confirm timeout).
        let (family, to, sa) = n.mesh.poll_probe()?;
        let probe = (from(family), to, driver::probe_datagram(sa.spi).to_vec());
        self.1.extend([probe.clone(), probe.clone()]);
        Some(probe)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.0.mesh.poll_timeout()
    }

    fn handle_timeout(&mut self, now: Instant) {
        let n = &mut self.0;
        n.mesh.handle_timeout(now, &mut n.dp);
    }
}

/// Three meshes on the harness, every one told about the others.
fn sim_cluster(config: MeshConfig, net: crate::sim::Net) -> crate::sim::Sim<SimMesh> {
    let now = Instant::now();
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| node_with(&format!("n{i}"), i as u8 + 1, [7; 32], now, config.clone()))
        .collect();
    introduce(&mut nodes, 0..3, now);
    let mut sim = crate::sim::Sim::new(
        nodes.into_iter().map(|n| SimMesh(n, Vec::new())).collect(),
        net,
    );
    sim.now = now;
    sim
}

fn established_links(sim: &crate::sim::Sim<SimMesh>) -> usize {
    sim.nodes
        .iter()
        .flat_map(|n| n.0.mesh.link_status().into_values().flatten())
        .filter(|l| l.state == LinkState::Established)
        .count()
}

/// Woken only at its own `poll_timeout()`, with the periodic resync pushed
/// out of reach, a mesh still establishes over a lossy network, confirms the
/// responder sessions, re-keys at its interval and retires the replaced SAs:
/// a wake-up later than any of those timers (or a missing one) stalls it.
#[test]
fn a_mesh_woken_only_at_its_poll_timeout_establishes_rekeys_and_retires() {
    let config = MeshConfig {
        resync_interval: Duration::from_secs(3600),
        rekey_interval: Duration::from_secs(20),
        retire_after: Duration::from_secs(3),
        ..MeshConfig::default()
    };
    let net = crate::sim::Net::lossy(
        0.1,
        0.05,
        (Duration::from_millis(5), Duration::from_millis(40)),
        11,
    );
    let mut sim = sim_cluster(config, net);
    sim.drive_for(Duration::from_secs(15));
    // 3 nodes × 2 peers × 2 families.
    assert_eq!(established_links(&sim), 12, "established before any re-key");
    let confirmed: u64 = sim
        .nodes
        .iter()
        .map(|n| n.0.mesh.counters().sessions_confirmed)
        .sum();
    assert_eq!(confirmed, 6, "every responder session confirmed");
    let before: Vec<Vec<SaId>> = sim
        .nodes
        .iter_mut()
        .map(|n| sa_specs(&mut n.0).iter().map(|s| s.id()).collect())
        .collect();
    // Re-keys are due 18-22 s after each link was installed (one end of
    // each link starts it; the other answers).
    sim.drive_for(Duration::from_secs(12));
    let rekeys: u64 = sim
        .nodes
        .iter()
        .map(|n| n.0.mesh.counters().rekeys_started)
        .sum();
    assert!(rekeys >= 6, "every link re-keyed: {rekeys} re-keys");
    // Replaced inbound SAs retire 3 s after the switch: 2 SAs per link remain.
    sim.drive_for(Duration::from_secs(5));
    for (i, n) in sim.nodes.iter_mut().enumerate() {
        let now: Vec<SaId> = sa_specs(&mut n.0).iter().map(|s| s.id()).collect();
        assert_eq!(now.len(), 8, "node {i}: retired SAs removed: {now:?}");
        assert!(
            now.iter().all(|id| !before[i].contains(id)),
            "node {i}: every SA replaced"
        );
    }
    assert_eq!(established_links(&sim), 12);
    let unconfirmed: u64 = sim
        .nodes
        .iter()
        .map(|n| n.0.mesh.counters().sessions_unconfirmed)
        .sum();
    assert_eq!(unconfirmed, 0);
}

/// The responder's inbound SA is in the kernel before its response can be
/// polled, whatever order a driver calls the mesh in.
#[test]
fn the_responder_installs_its_inbound_sa_before_the_response_leaves() {
    let now = Instant::now();
    let mut nodes = introduced(2, now);
    // Only n0 runs its timers: it initiates on both families.
    let n = &mut nodes[0];
    n.mesh.handle_timeout(now, &mut n.dp);
    let mut initiations = Vec::new();
    while let Some(t) = nodes[0].mesh.poll_transmit() {
        initiations.push(t);
    }
    assert_eq!(initiations.len(), 2);
    let from_v4 = SocketAddr::new(nodes[0].addrs[0], 9341);
    let from_v6 = SocketAddr::new(nodes[0].addrs[1], 9341);
    for (family, _, bytes) in &initiations {
        let from = if *family == AddressFamily::V4 {
            from_v4
        } else {
            from_v6
        };
        let n = &mut nodes[1];
        n.mesh.handle_datagram(now, *family, from, bytes, &mut n.dp);
    }
    // No handle_timeout on n1: the responses are polled at once.
    let mut responses = 0;
    while nodes[1].mesh.poll_transmit().is_some() {
        responses += 1;
    }
    assert_eq!(responses, 2);
    let sas = sa_specs(&mut nodes[1]);
    let inbound: Vec<_> = sas
        .iter()
        .filter(|s| s.direction == Some(Direction::In))
        .collect();
    assert_eq!(inbound.len(), 2, "both inbound SAs installed: {sas:?}");
    assert!(sas.iter().all(|s| s.direction != Some(Direction::Out)));
}

/// Handshakes lost for longer than the handshake timeout are retransmitted
/// and then retried on the mesh's own timers (the endpoints' retransmit and
/// timeout timers, the link's next attempt), with nothing else to wake it.
#[test]
fn lost_handshakes_are_retried_on_the_mesh_s_own_timers() {
    let config = MeshConfig {
        resync_interval: Duration::from_secs(3600),
        handshake: HsConfig {
            handshake_timeout: Duration::from_secs(3),
            ..HsConfig::default()
        },
        ..MeshConfig::default()
    };
    let mut sim = sim_cluster(config, crate::sim::Net::perfect());
    sim.nodes.truncate(2);
    let blackout_until = sim.now + Duration::from_secs(4);
    sim.filter = Some(Box::new(move |p: &crate::sim::Packet| {
        if p.at < blackout_until {
            crate::sim::Verdict::Drop
        } else {
            crate::sim::Verdict::Pass
        }
    }));
    sim.drive_for(Duration::from_secs(4));
    let failed: u64 = sim
        .nodes
        .iter()
        .map(|n| n.0.mesh.counters().handshakes_failed)
        .sum();
    assert!(failed > 0, "the first handshakes timed out");
    sim.drive_for(Duration::from_secs(8));
    // n0 and n1 (n2 is gone, its links stay unestablished): 2 links each.
    let up = sim
        .nodes
        .iter()
        .flat_map(|n| n.0.mesh.link_status().into_iter())
        .filter(|(peer, _)| peer != "n2")
        .flat_map(|(_, links)| links)
        .filter(|l| l.state == LinkState::Established)
        .count();
    assert_eq!(up, 4, "re-tried and established after the blackout");
}

/// Nodes n0..n{k-1} (secret [7; 32]), each told about all the others at
/// `now`; nothing run yet.
/// Gives each node in `which` a view where every node is alive.
fn introduce(nodes: &mut [Node], which: impl IntoIterator<Item = usize>, now: Instant) {
    for i in which {
        let v = view(nodes, i, |_| MemberState::Alive);
        let n = &mut nodes[i];
        n.mesh.set_members(now, &v, &mut n.dp);
    }
}

fn introduced(k: usize, now: Instant) -> Vec<Node> {
    introduced_with(k, now, MeshConfig::default())
}

/// [`introduced`] with this mesh configuration on every node.
fn introduced_with(k: usize, now: Instant, config: MeshConfig) -> Vec<Node> {
    let mut nodes: Vec<Node> = (0..k)
        .map(|i| node_with(&format!("n{i}"), i as u8 + 1, [7; 32], now, config.clone()))
        .collect();
    introduce(&mut nodes, 0..k, now);
    nodes
}

/// Nodes 0..n established with each other (all alive), and the clock.
fn established(n: usize) -> (Vec<Node>, Instant) {
    let mut now = Instant::now();
    let mut nodes = introduced(n, now);
    run(&mut nodes, &mut now, 30, Duration::from_millis(100), |_| {
        false
    });
    for (i, nd) in nodes.iter().enumerate() {
        assert!(
            nd.mesh
                .link_status()
                .values()
                .flatten()
                .all(|l| l.state == LinkState::Established),
            "node {i} established"
        );
    }
    (nodes, now)
}

fn policy_pairs(n: &mut Node) -> usize {
    n.dp.dump_policies().unwrap().len()
}

/// Finding 4: silence (gossip dropped, no secret needed) must never turn a
/// protected pair into plaintext: past the grace period the SAs go, the
/// policies stay (the kernel drops), and the link comes back by itself.
#[test]
fn a_peer_silent_past_the_grace_period_stays_blocked_never_clear() {
    let (mut nodes, mut now) = established(2);
    assert_eq!(policy_pairs(&mut nodes[0]), 4);
    let mut v = view(&nodes, 0, |_| MemberState::Dead);
    v[1].last_heard_ms = 120_000; // past the 60 s grace
    let n = &mut nodes[0];
    n.mesh.set_members(now, &v, &mut n.dp);
    resync(n, now);
    assert!(sa_specs(&mut nodes[0]).is_empty(), "SAs removed");
    assert_eq!(
        policy_pairs(&mut nodes[0]),
        4,
        "policies kept: drop, never clear"
    );
    let blocked = nodes[0].mesh.blocked();
    assert_eq!(blocked.len(), 2, "{blocked:?}");
    assert!(blocked
        .iter()
        .all(|b| b.reason == BlockReason::PeerUnreachable));
    // Gossip heals: the link re-keys and the pair is protected throughout.
    let v = view(&nodes, 0, |_| MemberState::Alive);
    let n = &mut nodes[0];
    n.mesh.set_members(now, &v, &mut n.dp);
    assert!(nodes[0].mesh.blocked().is_empty());
    for _ in 0..30 {
        run(&mut nodes, &mut now, 1, Duration::from_millis(100), |_| {
            false
        });
        assert_eq!(policy_pairs(&mut nodes[0]), 4);
    }
    assert_eq!(sa_specs(&mut nodes[0]).len(), 4, "re-keyed");
    // Gone from gossip altogether (GC): blocked again; `forget` releases it.
    let v = view(&nodes[..1], 0, |_| MemberState::Alive);
    let n = &mut nodes[0];
    n.mesh.set_members(now, &v, &mut n.dp);
    resync(n, now);
    assert_eq!(policy_pairs(&mut nodes[0]), 4);
    assert_eq!(nodes[0].mesh.forget("n1"), 4, "2 bindings + 2 pairs");
    let n = &mut nodes[0];
    resync(n, now);
    assert_eq!(
        policy_pairs(&mut nodes[0]),
        0,
        "forgotten: policies removed"
    );
}

/// A peer that left (its own statement) releases its pairs at once.
#[test]
fn a_peer_that_left_releases_its_pairs() {
    let (mut nodes, now) = established(2);
    let v = view(&nodes, 0, |_| MemberState::Left);
    let n = &mut nodes[0];
    n.mesh.set_members(now, &v, &mut n.dp);
    resync(n, now);
    assert_eq!(policy_pairs(&mut nodes[0]), 0);
    assert!(nodes[0].mesh.blocked().is_empty());
}

/// Finding 4, second half: policies found at start-up that no member
/// re-keys within the adoption period stay (blocked), never deleted.
#[test]
fn adopted_policies_nobody_rekeys_stay_blocked() {
    let (mut nodes, now) = established(2);
    restart(&mut nodes[0], [7; 32], now);
    let n = &mut nodes[0];
    resync(n, now);
    // No member ever shows up; the adoption period (120 s) ends.
    let later = now + Duration::from_secs(121);
    resync(n, later);
    resync(n, later);
    assert!(sa_specs(&mut nodes[0]).is_empty(), "stale SAs removed");
    assert_eq!(policy_pairs(&mut nodes[0]), 4, "policies kept");
    assert!(nodes[0]
        .mesh
        .blocked()
        .iter()
        .all(|b| b.reason == BlockReason::Adopted && b.peer.is_none()));
}

/// Finding 3: a member claiming the addresses of two others must not make
/// them drop their link (and policies): the addresses stay bound to the
/// keys they were linked to, the late claimant gets nothing.
#[test]
fn a_member_claiming_others_addresses_changes_nothing_between_them() {
    let (mut nodes, now) = established(3);
    let spis_before: Vec<SaId> = sa_specs(&mut nodes[0]).iter().map(|s| s.id()).collect();
    let attacker = node("evil", 9, [7; 32], now);
    for i in 0..3 {
        let mut v = view(&nodes, i, |_| MemberState::Alive);
        let mut fake = member(&attacker, MemberState::Alive, false);
        fake.data_addrs = nodes[0]
            .addrs
            .iter()
            .chain(&nodes[1].addrs)
            .copied()
            .collect();
        v.push(fake);
        let n = &mut nodes[i];
        n.mesh.set_members(now, &v, &mut n.dp);
        resync(n, now);
    }
    let spis_after: Vec<SaId> = sa_specs(&mut nodes[0]).iter().map(|s| s.id()).collect();
    assert_eq!(spis_before, spis_after, "n0's SAs untouched");
    assert_eq!(policy_pairs(&mut nodes[0]), 8);
    let st = nodes[2].mesh.link_status();
    assert!(
        !st.contains_key("evil"),
        "the claimant gets no link: {st:?}"
    );
    assert_eq!(st.len(), 2);
    // Shown and counted: on n2, evil's 4 claims (n0's and n1's v4 and v6).
    let c = nodes[2].mesh.conflicts();
    assert_eq!(c.len(), 4, "{c:?}");
    assert!(c.iter().all(|c| c.claimant == "evil"));
    assert_eq!(nodes[2].mesh.counters().refused_claims, 4);
}

/// Finding 7: a departed member's record does not block its replacement
/// (a new key) on the same addresses.
#[test]
fn a_replacement_takes_over_the_addresses_of_a_member_that_left() {
    let (mut nodes, now) = established(2);
    let mut v = view(&nodes, 0, |_| MemberState::Alive);
    v[1].state = MemberState::Left;
    let replacement = node("n1-new", 42, [7; 32], now);
    let mut r = member(&replacement, MemberState::Alive, false);
    r.data_addrs = nodes[1].addrs.clone();
    v.push(r);
    let n = &mut nodes[0];
    n.mesh.set_members(now, &v, &mut n.dp);
    let st = nodes[0].mesh.link_status();
    assert_eq!(st.get("n1-new").map(|l| l.len()), Some(2), "{st:?}");
}

/// Address proof: an initiation from a member's key must come from that
/// member's address, or it gets no response (and nothing is installed).
#[test]
fn an_initiation_from_another_address_gets_no_response() {
    let now = Instant::now();
    let mut nodes = introduced(2, now);
    let n = &mut nodes[0];
    n.mesh.handle_timeout(now, &mut n.dp);
    let (family, _, bytes) = nodes[0].mesh.poll_transmit().expect("an initiation");
    let elsewhere: SocketAddr = if family == AddressFamily::V4 {
        "192.0.2.99:9341".parse().unwrap()
    } else {
        "[2001:db8::99]:9341".parse().unwrap()
    };
    let n = &mut nodes[1];
    n.mesh
        .handle_datagram(now, family, elsewhere, &bytes, &mut n.dp);
    assert!(nodes[1].mesh.poll_transmit().is_none(), "no response");
    assert!(sa_specs(&mut nodes[1]).is_empty(), "nothing installed");
    assert_eq!(nodes[1].mesh.handshake_counters().install_failed, 1);
}

/// Address proof, initiator side: a response that does not come from the
/// peer's data address establishes nothing.
#[test]
fn a_response_from_another_address_establishes_nothing() {
    let now = Instant::now();
    let mut nodes = introduced(2, now);
    let n = &mut nodes[0];
    n.mesh.handle_timeout(now, &mut n.dp);
    let (family, _, init) = nodes[0].mesh.poll_transmit().expect("an initiation");
    let from0 = SocketAddr::new(
        *nodes[0]
            .addrs
            .iter()
            .find(|a| AddressFamily::of(**a) == family)
            .unwrap(),
        9341,
    );
    let n = &mut nodes[1];
    n.mesh.handle_datagram(now, family, from0, &init, &mut n.dp);
    let (_, _, resp) = nodes[1].mesh.poll_transmit().expect("a response");
    let elsewhere: SocketAddr = if family == AddressFamily::V4 {
        "192.0.2.99:9341".parse().unwrap()
    } else {
        "[2001:db8::99]:9341".parse().unwrap()
    };
    let n = &mut nodes[0];
    n.mesh
        .handle_datagram(now, family, elsewhere, &resp, &mut n.dp);
    resync(n, now);
    assert_eq!(nodes[0].mesh.counters().refused_wrong_source, 1);
    assert!(sa_specs(&mut nodes[0]).is_empty(), "nothing installed");
}

/// `n` members that publish a key, an address and a handshake port but
/// never answer (what a holder of the cluster secret can make up).
fn fake_members(n: u32) -> Vec<Member> {
    (0..n)
        .map(|i| {
            let mut private = [7u8; 32];
            private[1..5].copy_from_slice(&i.to_le_bytes());
            let addr = IpAddr::from([10, 1, (i >> 8) as u8, i as u8]);
            Member {
                name: format!("fake{i}"),
                gossip_addr: SocketAddr::new(addr, 9340),
                data_addrs: vec![addr],
                state: MemberState::Alive,
                public_key: Some(*StaticKeypair::from_private(private).public()),
                generation: 1,
                handshake_port: Some(9341),
                protocol: Some(1),
                last_heard_ms: 0,
                is_self: false,
                signing_key: None,
            }
        })
        .collect()
}

#[test]
fn fake_members_get_initiations_at_most_at_the_cap_and_all_eventually() {
    let t0 = Instant::now();
    let cap = 100;
    let config = MeshConfig {
        max_initiations_per_sec: cap,
        ..MeshConfig::default()
    };
    let mut a = node_with("a", 1, [9; 32], t0, config);
    let mut members = fake_members(500);
    members.push(member(&a, MemberState::Alive, true));
    a.mesh.set_members(t0, &members, &mut a.dp);
    // A new initiation is a datagram never sent before (retransmissions
    // repeat their bytes); its time is when the mesh was woken to send it.
    let mut seen = std::collections::HashSet::new();
    let mut starts: Vec<Instant> = Vec::new();
    let mut peers = std::collections::HashSet::new();
    let mut now = t0;
    let end = t0 + Duration::from_secs(8);
    for _ in 0..100_000 {
        a.mesh.handle_timeout(now, &mut a.dp);
        while let Some((_, to, bytes)) = a.mesh.poll_transmit() {
            if seen.insert(bytes) {
                starts.push(now);
                peers.insert(to);
            }
        }
        now = a.mesh.poll_timeout().unwrap().max(now);
        if now > end {
            break;
        }
    }
    assert_eq!(peers.len(), 500, "every link is attempted");
    for (i, t) in starts.iter().enumerate() {
        let in_window = starts[i..]
            .iter()
            .take_while(|u| **u < *t + Duration::from_secs(1))
            .count();
        assert!(
            in_window <= cap,
            "{in_window} initiations in the second from {t:?}"
        );
    }
    // The mesh woke exactly when the cap let the next batch start.
    assert_eq!(starts[cap], t0 + Duration::from_secs(1));
    assert!(a.mesh.counters().initiations_deferred >= 400);
}

#[test]
fn links_beyond_the_cap_are_refused_and_counted() {
    let t0 = Instant::now();
    let config = MeshConfig {
        max_links: 10,
        ..MeshConfig::default()
    };
    let mut a = node_with("a", 1, [9; 32], t0, config);
    let members = fake_members(50);
    a.mesh.set_members(t0, &members, &mut a.dp);
    let links: usize = a.mesh.link_status().values().map(Vec::len).sum();
    assert_eq!(links, 10);
    assert_eq!(a.mesh.counters().links_refused, 40);
    // Existing links stay; once members go, refused ones get their room.
    let kept = a.mesh.link_status();
    a.mesh.set_members(t0, &members, &mut a.dp);
    assert_eq!(a.mesh.link_status(), kept);
    assert_eq!(a.mesh.counters().links_refused, 80);
    let rest: Vec<Member> = members
        .into_iter()
        .filter(|m| !kept.contains_key(&m.name))
        .collect();
    a.mesh.set_members(t0, &rest, &mut a.dp);
    let now_linked = a.mesh.link_status();
    assert_eq!(now_linked.len(), 10);
    assert!(now_linked.keys().all(|k| !kept.contains_key(k)));
}

/// Review attack 1: under names of its own, a member publishes records
/// carrying the honest peer's Noise key, one up and one `left`. The key is
/// bound to the name it was protected under, so neither claim counts, and a
/// `left` releases only what is held for its own name: the honest pair keeps
/// its link and its policies.
#[test]
fn records_carrying_a_peers_key_under_other_names_change_nothing() {
    let (mut nodes, now) = established(2);
    let spis: Vec<SaId> = sa_specs(&mut nodes[0]).iter().map(|s| s.id()).collect();
    let mut c1 = member(&nodes[1], MemberState::Alive, false);
    c1.name = "c1".into();
    c1.data_addrs = vec!["192.0.2.99".parse().unwrap()];
    let mut c2 = c1.clone();
    c2.name = "c2".into();
    c2.state = MemberState::Left;
    let mut v = view(&nodes, 0, |_| MemberState::Alive);
    v.push(c1);
    for round in 0..2 {
        if round == 1 {
            v.push(c2.clone());
        }
        let n = &mut nodes[0];
        n.mesh.set_members(now, &v, &mut n.dp);
        resync(n, now);
        let now_spis: Vec<SaId> = sa_specs(&mut nodes[0]).iter().map(|s| s.id()).collect();
        assert_eq!(now_spis, spis, "round {round}: n0-n1 SAs untouched");
        assert_eq!(policy_pairs(&mut nodes[0]), 4, "round {round}");
        assert!(nodes[0].mesh.blocked().is_empty(), "round {round}");
    }
    assert!(nodes[0].mesh.counters().refused_key_claims >= 1);
}

/// Review attack 3: after a restart (bindings empty), an attacker claims an
/// honest peer's addresses while the peer's record is not valid here yet.
/// Addresses are bound only once a link is protected, so the attacker (who
/// cannot complete a handshake from those addresses) binds nothing, and the
/// honest peer is never refused in its favour.
#[test]
fn after_a_restart_a_claim_alone_binds_nothing() {
    let (mut nodes, now) = established(2);
    restart(&mut nodes[0], [7; 32], now);
    let attacker = StaticKeypair::from_private([77; 32]);
    let mut c = member(&nodes[1], MemberState::Alive, false);
    c.name = "c".into();
    c.public_key = Some(*attacker.public());
    let mut v = view(&nodes, 0, |_| MemberState::Alive);
    v[1].public_key = None;
    v.push(c.clone());
    let n = &mut nodes[0];
    n.mesh.set_members(now, &v, &mut n.dp);
    let mut v = view(&nodes, 0, |_| MemberState::Alive);
    v.push(c);
    let n = &mut nodes[0];
    n.mesh.set_members(now, &v, &mut n.dp);
    assert!(
        nodes[0].mesh.conflicts().iter().all(|x| x.bound_to != "c"),
        "{:?}",
        nodes[0].mesh.conflicts()
    );
}

/// n1 dead past the grace period, seen from n0: its pairs blocked (for n1).
fn blocked_for_n1(nodes: &mut [Node], now: Instant) {
    let mut v = view(nodes, 0, |_| MemberState::Dead);
    v[1].last_heard_ms = 120_000;
    let n = &mut nodes[0];
    n.mesh.set_members(now, &v, &mut n.dp);
    resync(n, now);
    assert_eq!(nodes[0].mesh.blocked().len(), 2);
}

/// The guard through its file format, as the driver saves it.
fn saved(n: &Node) -> GuardFile {
    let text = serde_json::to_string(&n.mesh.guard_file()).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A restart keeps what fail closed holds *and for whom*: blocked pairs
/// still name their peer (so its signed `left` releases them at once, and
/// `forget NAME` finds them), and addresses stay bound (a claimant with
/// another key is refused). Without the saved guard the pairs come back as
/// anonymous adopted policies that a `left` cannot release.
#[test]
fn a_restart_keeps_the_blocked_pairs_and_bindings_and_whose_they_are() {
    let (mut nodes, now) = established(2);
    blocked_for_n1(&mut nodes, now);
    let file = saved(&nodes[0]);
    assert_eq!((file.bindings.len(), file.blocked.len()), (2, 2));
    restart(&mut nodes[0], [7; 32], now);
    nodes[0].mesh.restore_guard(&file).unwrap();
    let n = &mut nodes[0];
    resync(n, now);
    let blocked = nodes[0].mesh.blocked();
    assert_eq!(blocked.len(), 2, "{blocked:?}");
    assert!(blocked.iter().all(|b| {
        b.reason == BlockReason::PeerUnreachable && b.peer.as_ref().is_some_and(|(n, _)| n == "n1")
    }));
    assert_eq!(policy_pairs(&mut nodes[0]), 4);
    // An impostor claiming n1's addresses with its own key is refused.
    let mut c = member(&nodes[1], MemberState::Alive, false);
    c.name = "c".into();
    c.public_key = Some(*StaticKeypair::from_private([77; 32]).public());
    let mut v = view(&nodes, 0, |_| MemberState::Dead);
    v[1].last_heard_ms = 120_000;
    v.push(c);
    let n = &mut nodes[0];
    n.mesh.set_members(now, &v, &mut n.dp);
    assert_eq!(nodes[0].mesh.conflicts().len(), 2, "both of n1's addresses");
    assert!(!nodes[0].mesh.link_status().contains_key("c"));
    // n1 leaves for good: its pairs go at once, not after the adoption period.
    let v = view(&nodes, 0, |_| MemberState::Left);
    let n = &mut nodes[0];
    n.mesh.set_members(now, &v, &mut n.dp);
    resync(n, now);
    assert!(nodes[0].mesh.blocked().is_empty());
    assert_eq!(policy_pairs(&mut nodes[0]), 0);
    assert!(saved(&nodes[0]).blocked.is_empty() && saved(&nodes[0]).bindings.is_empty());
}

/// What the operator removed while the agent was down (`meshsec flush`)
/// is not put back from the saved guard.
#[test]
fn restored_pairs_whose_policies_were_flushed_are_released() {
    let (mut nodes, now) = established(2);
    blocked_for_n1(&mut nodes, now);
    let file = saved(&nodes[0]);
    nodes[0].dp.flush_owned().unwrap();
    restart(&mut nodes[0], [7; 32], now);
    nodes[0].mesh.restore_guard(&file).unwrap();
    let rev = nodes[0].mesh.guard_revision();
    let n = &mut nodes[0];
    resync(n, now);
    assert!(nodes[0].mesh.blocked().is_empty());
    assert_eq!(policy_pairs(&mut nodes[0]), 0);
    assert_ne!(nodes[0].mesh.guard_revision(), rev, "a change to save");
}

/// A reboot empties the kernel, which is not the operator flushing: the
/// restored blocked pairs stay blocked (their policies go back in), so a
/// peer still unreachable after the reboot (an attacker dropping its gossip
/// and handshakes) gets no traffic in clear.
#[test]
fn restored_pairs_stay_blocked_after_a_reboot() {
    let (mut nodes, now) = established(2);
    nodes[0].mesh.set_boot_id(Some("boot-1".into()));
    blocked_for_n1(&mut nodes, now);
    let file = saved(&nodes[0]);
    assert_eq!(file.boot_id.as_deref(), Some("boot-1"));
    // The reboot: the kernel holds nothing meshsec installed.
    nodes[0].dp.flush_owned().unwrap();
    restart(&mut nodes[0], [7; 32], now);
    nodes[0].mesh.set_boot_id(Some("boot-2".into()));
    nodes[0].mesh.restore_guard(&file).unwrap();
    let n = &mut nodes[0];
    resync(n, now);
    assert_eq!(nodes[0].mesh.blocked().len(), 2);
    assert_eq!(policy_pairs(&mut nodes[0]), 4, "policies back in");
    assert_eq!(saved(&nodes[0]).boot_id.as_deref(), Some("boot-2"));
}

/// Blocked pairs count against `max_links`: a member cycling identities
/// (each linked, then silent) cannot grow the kernel's policy table past
/// the cap; a blocked pair's own link is never refused.
#[test]
fn blocked_pairs_count_against_the_link_cap() {
    let mut now = Instant::now();
    let config = MeshConfig {
        max_links: 2,
        ..MeshConfig::default()
    };
    let mut nodes = introduced_with(2, now, config.clone());
    run(&mut nodes, &mut now, 30, Duration::from_millis(100), |_| {
        false
    });
    blocked_for_n1(&mut nodes, now);
    // Then n2 joins.
    nodes.push(node_with("n2", 3, [7; 32], now, config));
    let v = {
        let mut v = view(&nodes, 0, |i| {
            if i == 1 {
                MemberState::Dead
            } else {
                MemberState::Alive
            }
        });
        v[1].last_heard_ms = 120_000;
        v
    };
    let n = &mut nodes[0];
    n.mesh.set_members(now, &v, &mut n.dp);
    assert!(
        !nodes[0].mesh.link_status().contains_key("n2"),
        "n2 refused"
    );
    assert_eq!(nodes[0].mesh.counters().links_refused, 2);
    // n1 back: its link takes its blocked pair back.
    let v = view(&nodes[..2], 0, |_| MemberState::Alive);
    let n = &mut nodes[0];
    n.mesh.set_members(now, &v, &mut n.dp);
    assert_eq!(nodes[0].mesh.link_status()["n1"].len(), 2);
    assert!(nodes[0].mesh.blocked().is_empty());
}

/// Refused key claims are remembered per view only: a member minting
/// claimant names cannot grow the set without bound.
#[test]
fn refused_key_claims_are_kept_per_view() {
    let (mut nodes, now) = established(2);
    for i in 0..50 {
        let mut c = member(&nodes[1], MemberState::Alive, false);
        c.name = format!("c{i}");
        c.data_addrs = vec!["192.0.2.99".parse().unwrap()];
        let mut v = view(&nodes, 0, |_| MemberState::Alive);
        v.push(c);
        let n = &mut nodes[0];
        n.mesh.set_members(now, &v, &mut n.dp);
    }
    assert_eq!(nodes[0].mesh.counters().refused_key_claims, 50);
    assert_eq!(nodes[0].mesh.key_claims.len(), 1);
}

/// After a reboot the kernel holds nothing; pairs whose links were up (their
/// addresses bound) stay blocked until the links re-key, so an attacker who
/// drops handshakes after a reboot gets no traffic in clear.
#[test]
fn pairs_protected_before_a_reboot_stay_blocked_until_their_links_rekey() {
    let (mut nodes, mut now) = established(2);
    nodes[0].mesh.set_boot_id(Some("boot-1".into()));
    let file = saved(&nodes[0]);
    assert_eq!((file.bindings.len(), file.blocked.len()), (2, 0));
    nodes[0].dp.flush_owned().unwrap();
    restart(&mut nodes[0], [7; 32], now);
    nodes[0].mesh.set_boot_id(Some("boot-2".into()));
    nodes[0].mesh.restore_guard(&file).unwrap();
    let n = &mut nodes[0];
    resync(n, now);
    let blocked = nodes[0].mesh.blocked();
    assert_eq!(blocked.len(), 2, "{blocked:?}");
    assert!(blocked.iter().all(|b| b.reason == BlockReason::Rebooted));
    assert_eq!(policy_pairs(&mut nodes[0]), 4, "dropped, not sent in clear");
    // The same boot (an agent restart, the operator flushed): nothing added.
    let mut same = file.clone();
    same.boot_id = Some("boot-2".into());
    restart(&mut nodes[0], [7; 32], now);
    nodes[0].mesh.set_boot_id(Some("boot-2".into()));
    nodes[0].mesh.restore_guard(&same).unwrap();
    assert!(nodes[0].mesh.blocked().is_empty());
    // Rebooted again: blocked, and the peer comes back: its link re-keys.
    restart(&mut nodes[0], [7; 32], now);
    nodes[0].mesh.set_boot_id(Some("boot-3".into()));
    nodes[0].mesh.restore_guard(&file).unwrap();
    introduce(&mut nodes, 0..2, now);
    run(&mut nodes, &mut now, 30, Duration::from_millis(100), |_| {
        false
    });
    assert!(nodes[0].mesh.blocked().is_empty());
    assert_eq!(nodes[0].mesh.link_status()["n1"].len(), 2);
    assert!(nodes[0].mesh.link_status()["n1"]
        .iter()
        .all(|l| l.state == LinkState::Established));
}

/// Strict mode: the protected ranges' policies are part of the desired
/// state, so the reconciler installs them, takes them over unchanged after
/// a restart, removes a range dropped by a reload (or by a restart without
/// it), and never touches somebody else's policy.
#[test]
fn protected_ranges_are_reconciled_adopted_and_removed() {
    use crate::datapath::{Prefix, RangePolicy};
    let mut now = Instant::now();
    let mut nodes = mesh_of(2, now);
    let v4: Prefix = "192.0.2.0/24".parse().unwrap();
    let v6: Prefix = "2001:db8::/64".parse().unwrap();
    let foreign = RangePolicy::block("198.51.100.0/24".parse().unwrap())[0];
    nodes[0].dp.add_foreign_range_policy(foreign);
    nodes[0].mesh.set_protect(vec![v4, v6]);
    run(&mut nodes, &mut now, 20, Duration::from_millis(100), |_| {
        false
    });
    // Per range: two blocks, the lo exemption, our own address's exemption.
    let ranges = nodes[0].dp.dump_range_policies().unwrap();
    assert_eq!(ranges.len(), 8, "{ranges:#?}");
    assert!(ranges.contains(&RangePolicy::local_out(nodes[0].addrs[1])));
    assert_eq!(nodes[0].mesh.range_policies_installed(), 8);
    // The members' links (inside the ranges) are up beside the blocks.
    assert_eq!(nodes[0].dp.dump_policies().unwrap().len(), 4);
    assert!(nodes[1].dp.dump_range_policies().unwrap().is_empty());

    // kill -9 and start again with the same ranges: nothing to change.
    restart(&mut nodes[0], [1; 32], now);
    nodes[0].mesh.set_protect(vec![v4, v6]);
    resync(&mut nodes[0], now);
    assert_eq!(nodes[0].dp.dump_range_policies().unwrap(), ranges);
    assert_eq!(nodes[0].mesh.counters().changes_applied, 0);

    // Reload without the IPv6 range: its policies go, the IPv4 ones stay.
    nodes[0].mesh.set_protect(vec![v4]);
    resync(&mut nodes[0], now);
    let left = nodes[0].dp.dump_range_policies().unwrap();
    assert_eq!(left.len(), 4, "{left:#?}");
    assert!(left.iter().all(|p| p.src.addr().is_ipv4()));

    // A restart with no range configured removes the rest.
    restart(&mut nodes[0], [1; 32], now);
    resync(&mut nodes[0], now);
    assert!(nodes[0].dp.dump_range_policies().unwrap().is_empty());
    // Somebody else's policy on a range selector is still there.
    let e = nodes[0].dp.install_range_policy(&foreign).unwrap_err();
    assert_eq!(e.kind(), crate::datapath::ErrorKind::AlreadyExists);
}

/// Found in review: a reload that widens a range (10.0.0.0/24 -> 10.0.0.0/16) plans "add the /16
/// blocks, then delete the /24 blocks", but the changes are applied independently: when an
/// add fails (here somebody else's policy on the /16 selector: EEXIST; in the kernel also
/// ENOBUFS, or the ND bypass failing for IPv6), the delete still runs and the /24 is left
/// with no block at all: plaintext to hosts that were protected a moment before. The
/// deletes now wait until the adds are in.
#[test]
fn a_failed_range_add_does_not_release_the_old_range() {
    use crate::datapath::{Prefix, RangePolicy};
    let now = Instant::now();
    let mut nodes = mesh_of(2, now);
    let narrow: Prefix = "192.0.2.0/25".parse().unwrap();
    let wide: Prefix = "192.0.2.0/24".parse().unwrap();
    nodes[0].mesh.set_protect(vec![narrow]);
    resync(&mut nodes[0], now);
    let blocks = RangePolicy::block(narrow);
    let held = nodes[0].dp.dump_range_policies().unwrap();
    assert!(blocks.iter().all(|b| held.contains(b)), "{held:#?}");
    // Somebody else's policy sits on the wide range's outbound selector.
    nodes[0]
        .dp
        .add_foreign_range_policy(RangePolicy::block(wide)[0]);
    nodes[0].mesh.set_protect(vec![wide]);
    resync(&mut nodes[0], now);
    let held = nodes[0].dp.dump_range_policies().unwrap();
    let out_covered = held.iter().any(|p| {
        p.rule == crate::datapath::RangeRule::Block
            && p.direction == crate::datapath::Direction::Out
            && p.dst.contains("192.0.2.9".parse().unwrap())
    });
    assert!(
        out_covered,
        "nothing blocks 192.0.2.9 outbound any more: {held:#?}"
    );
}

/// The view is republished on changes of state only, not as a dead
/// member's last-heard time grows: its links go when its grace runs out by
/// the mesh's own timer, at that instant (`poll_timeout` names it).
#[test]
fn a_dead_member_s_links_expire_by_the_mesh_s_own_timer() {
    let (mut nodes, now) = established(2);
    let mut v = view(&nodes, 0, |_| MemberState::Dead);
    v[1].last_heard_ms = 30_000;
    let n = &mut nodes[0];
    n.mesh.set_members(now, &v, &mut n.dp);
    resync(n, now);
    assert_eq!(sa_specs(n).len(), 4, "within the grace: kept");
    let expiry = now + Duration::from_secs(30);
    assert!(n.mesh.poll_timeout().is_some_and(|t| t <= expiry));
    // Woken only at its poll_timeout, never given another view.
    let mut t = now;
    let gone_at = loop {
        t = n.mesh.poll_timeout().expect("a timer").max(t);
        assert!(t <= expiry + Duration::from_secs(5), "links never expired");
        n.mesh.handle_timeout(t, &mut n.dp);
        if n.mesh.link_status().is_empty() {
            break t;
        }
        assert!(t < expiry, "links outlived the grace");
    };
    assert_eq!(gone_at, expiry, "removed when the grace ended");
    assert!(sa_specs(n).is_empty(), "SAs removed");
    assert_eq!(policy_pairs(n), 4, "policies kept: drop, never clear");
    assert_eq!(n.mesh.blocked().len(), 2);
}

/// A membership change touches only the links it changes: every other
/// link keeps its session (the same SAs, no new handshake).
#[test]
fn a_membership_change_touches_only_its_links() {
    let (mut nodes, mut now) = established(5);
    let before: Vec<SaId> = sa_specs(&mut nodes[0]).iter().map(|s| s.id()).collect();
    assert_eq!(before.len(), 16, "4 peers × 2 families × in + out");
    let started = nodes[0].mesh.handshake_counters();
    // n1 changes its IPv4 data address, n2 leaves, n3 moves its gossip
    // address and n4 goes quiet (dead, within the grace): two links change.
    let mut v = view(&nodes, 0, |j| {
        if j == 2 {
            MemberState::Left
        } else if j == 4 {
            MemberState::Dead
        } else {
            MemberState::Alive
        }
    });
    v[1].data_addrs[0] = "192.0.2.99".parse().unwrap();
    v[3].gossip_addr = "192.0.2.98:9340".parse().unwrap();
    v[4].last_heard_ms = 5_000;
    let n = &mut nodes[0];
    n.mesh.set_members(now, &v, &mut n.dp);
    resync(n, now);
    let after: Vec<SaId> = sa_specs(&mut nodes[0]).iter().map(|s| s.id()).collect();
    let kept = after.iter().filter(|s| before.contains(s)).count();
    assert_eq!(
        kept, 10,
        "n1's IPv6, n3's and n4's SAs untouched: {after:?}"
    );
    assert_eq!(after.len(), 10, "n1's IPv4 and n2's SAs gone");
    assert_eq!(
        nodes[0].mesh.handshake_counters().sent,
        started.sent + 1,
        "one handshake: n1's new IPv4 link"
    );
    run(&mut nodes, &mut now, 5, Duration::from_millis(100), |_| {
        false
    });
    let st = nodes[0].mesh.link_status();
    assert_eq!(st.len(), 3, "n1, n3, n4: {st:?}");
    assert_eq!(st["n1"].len(), 2);
}

mod join;

#[path = "cost_tests.rs"]
mod cost_tests;

/// The initiator sends its confirmation probe again (1, 3 and 6 s after the
/// first) while the SA is current: when every copy of the first probe is
/// lost (in the VM: sent in clear because somebody deleted the pair's policy
/// at that moment), the responder still confirms well within its 10 s
/// confirmation timeout instead of dropping the session.
#[test]
fn a_lost_first_probe_is_sent_again_and_the_responder_confirms() {
    let net = crate::sim::Net::perfect();
    let mut sim = sim_cluster(MeshConfig::default(), net);
    let mut probes_seen = 0usize;
    sim.filter = Some(Box::new(move |p: &crate::sim::Packet| {
        if driver::parse_probe(&p.bytes).is_none() {
            return crate::sim::Verdict::Pass;
        }
        probes_seen += 1;
        // The first burst of every initiator: 3 links × 2 families × 3 copies.
        if probes_seen <= 18 {
            crate::sim::Verdict::Drop
        } else {
            crate::sim::Verdict::Pass
        }
    }));
    sim.drive_for(Duration::from_secs(5));
    let confirmed: u64 = sim
        .nodes
        .iter()
        .map(|n| n.0.mesh.counters().sessions_confirmed)
        .sum();
    let unconfirmed: u64 = sim
        .nodes
        .iter()
        .map(|n| n.0.mesh.counters().sessions_unconfirmed)
        .sum();
    assert_eq!(
        (confirmed, unconfirmed),
        (6, 0),
        "every responder confirmed by a later probe"
    );
    assert_eq!(established_links(&sim), 12);
}
