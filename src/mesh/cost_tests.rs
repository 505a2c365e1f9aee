//! What each event costs in kernel work: full dumps and netlink round trips
//! counted by the in-memory datapath ([`crate::datapath::WriteCalls`]) on
//! meshes woken only at their own `poll_timeout()`.

use super::*;
use crate::datapath::WriteCalls;

fn calls(nodes: &[Node]) -> Vec<WriteCalls> {
    nodes.iter().map(|n| n.dp.write_calls()).collect()
}

/// The kernel work done by each node between two snapshots.
fn delta(before: &[WriteCalls], nodes: &[Node]) -> Vec<WriteCalls> {
    before
        .iter()
        .zip(nodes)
        .map(|(b, n)| {
            let a = n.dp.write_calls();
            WriteCalls {
                apply: a.apply - b.apply,
                applied_changes: a.applied_changes - b.applied_changes,
                direct_writes: a.direct_writes - b.direct_writes,
                dumps: a.dumps - b.dumps,
                get_sas: a.get_sas - b.get_sas,
                got_sas: a.got_sas - b.got_sas,
                round_trips: a.round_trips - b.round_trips,
            }
        })
        .collect()
}

fn step(nodes: &mut Vec<Node>, now: &mut Instant, d: Duration) {
    let rounds = (d.as_millis() / 100) as usize;
    run(nodes, now, rounds, Duration::from_millis(100), |_| false);
}

/// At steady state a mesh reads the kernel's tables once a minute (the
/// periodic resync: one look at the SA table and one at the policy table),
/// and otherwise only its current SAs' counters, every 10 s, in one round
/// trip. Before: a dump every 2 s.
#[test]
fn steady_state_dumps_at_most_once_a_minute() {
    let (mut nodes, mut now) = established(3);
    let before = calls(&nodes);
    step(&mut nodes, &mut now, Duration::from_secs(600));
    for (i, d) in delta(&before, &nodes).iter().enumerate() {
        // 10 resyncs in 10 minutes, two tables each.
        assert!(d.dumps <= 2 * 10, "node {i}: {d:?}");
        // Counter reads every 10 s: one round trip for the node's 8 SAs.
        assert!(d.get_sas <= 60, "node {i}: {d:?}");
        assert!(d.got_sas <= 60 * 8, "node {i}: {d:?}");
        assert_eq!(d.applied_changes, 0, "node {i}: nothing to change: {d:?}");
        assert!(d.round_trips <= 2 * 10 + 60, "node {i}: {d:?}");
        assert!(nodes[i].mesh.counters().kernel_dumps <= 12, "node {i}");
    }
}

/// A member joining costs the others no dump: each installs the two new
/// links (one per family) through a handful of round trips (SPI
/// reservation, the pipelined installs, the confirmation reads).
#[test]
fn a_new_member_costs_no_dump_and_a_few_round_trips_per_link() {
    let (mut nodes, mut now) = established(3);
    nodes.push(node("n3", 4, [7; 32], now));
    let before = calls(&nodes);
    introduce(&mut nodes, 0..4, now);
    step(&mut nodes, &mut now, Duration::from_secs(3));
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
    let d = delta(&before, &nodes);
    for (i, d) in d.iter().enumerate().take(3) {
        assert_eq!(d.dumps, 0, "node {i}: {d:?}");
        // Two new links: per link an SPI reservation and one or two
        // applies, and (as responder) a few 100 ms confirmation reads.
        assert!(d.round_trips <= 2 * 5, "node {i}: {d:?}");
        // Per link: its two SAs and two policies, nothing else touched.
        assert_eq!(d.applied_changes, 2 * 4, "node {i}: {d:?}");
    }
    // The newcomer read the kernel once, at its start.
    assert_eq!(d[3].dumps, 2, "{:?}", d[3]);
}

/// A re-key costs no dump and a bounded number of round trips on either
/// side; the replaced inbound SA goes at its deadline, by one delete in one
/// apply, with no reads of the kernel while it waits.
#[test]
fn a_rekey_costs_no_dump_and_retirement_is_one_delete_at_the_deadline() {
    let (mut nodes, mut now) = established(2);
    let before = calls(&nodes);
    assert_eq!(nodes[0].mesh.force_rekey(now, Some("n1")), 2);
    step(&mut nodes, &mut now, Duration::from_secs(1));
    let d = delta(&before, &nodes);
    for (i, d) in d.iter().enumerate() {
        assert_eq!(d.dumps, 0, "node {i}: {d:?}");
        assert!(d.round_trips <= 2 * 5, "node {i}: {d:?}");
        // Per link: the new inbound SA filled, the new outbound added, the
        // old outbound deleted (the policies stay).
        assert_eq!(d.applied_changes, 2 * 3, "node {i}: {d:?}");
    }
    assert!(nodes.iter().all(|n| n.mesh.counters().kernel_dumps == 1));
    // Each node has two replaced inbound SAs (one per family) retiring.
    let deadline = |n: &Node| {
        let all: Vec<Instant> = n
            .mesh
            .links
            .values()
            .flat_map(|l| l.retiring.iter().map(|(_, t)| *t))
            .collect();
        assert_eq!(all.len(), 2, "{} retiring SAs", n.name);
        all.into_iter().max().unwrap()
    };
    let last = nodes.iter().map(deadline).max().unwrap();
    let waiting = calls(&nodes);
    let until = last.saturating_duration_since(now);
    step(&mut nodes, &mut now, until - Duration::from_millis(200));
    for (i, d) in delta(&waiting, &nodes).iter().enumerate() {
        // At most one counter read in the 10 s wait; nothing else.
        assert_eq!(d.dumps, 0, "node {i}: {d:?}");
        assert!(d.round_trips <= 1, "node {i}: {d:?}");
    }
    let retire = calls(&nodes);
    step(&mut nodes, &mut now, Duration::from_millis(400));
    for (i, d) in delta(&retire, &nodes).iter().enumerate() {
        assert_eq!(d.dumps, 0, "node {i}: {d:?}");
        assert_eq!(d.applied_changes, 2, "node {i}: two deletes: {d:?}");
        assert!(d.apply <= 2, "node {i}: {d:?}");
        assert!(nodes[i].mesh.links.values().all(|l| l.retiring.is_empty()));
    }
    for n in nodes.iter_mut() {
        assert_eq!(sa_specs(n).len(), 4, "{}: two SAs per family", n.name);
    }
    assert_outbound_accepted(&mut nodes, "after the retirement");
}

/// Somebody deletes an SA and the notification is lost: the counter read
/// finds it gone and the mesh dumps and repairs without waiting for the
/// periodic resync.
#[test]
fn an_sa_gone_without_a_notification_is_found_by_the_counter_read() {
    let (mut nodes, mut now) = established(2);
    let victim = outbound_v4(&mut nodes[0]);
    nodes[0].dp.delete_sa(victim).unwrap();
    let dumps = nodes[0].mesh.counters().kernel_dumps;
    step(&mut nodes, &mut now, COUNTER_POLL + Duration::from_secs(2));
    assert_eq!(nodes[0].mesh.counters().kernel_dumps, dumps + 1);
    assert_eq!(nodes[0].mesh.counters().sas_vanished, 1);
    assert_ne!(outbound_v4(&mut nodes[0]), victim);
    assert_outbound_accepted(&mut nodes, "after the repair");
}

/// A change that keeps failing (somebody else's policy holds the selector)
/// leaves the mesh's record of the kernel untrusted; it is read again at the
/// error retry (every 2 s), not at every wake-up of a busy driver.
#[test]
fn a_change_that_keeps_failing_costs_one_dump_per_retry_not_per_wake_up() {
    let (mut nodes, mut now) = established(2);
    let n = &mut nodes[0];
    let [out, _] = PolicySpec::pair(n.addrs[0], nodes[1].addrs[0], Reqid::DEFAULT);
    let n = &mut nodes[0];
    n.dp.delete_policy(out.id).unwrap();
    n.dp.add_foreign_policy(out.id);
    n.mesh.handle_kernel_event(now, KernelEvent::TablesChanged);
    let before = n.dp.write_calls();
    let failed = n.mesh.counters().changes_failed;
    // A driver woken every 10 ms (datagrams, commands, views) for 10 s.
    for _ in 0..1000 {
        now += Duration::from_millis(10);
        n.mesh.handle_timeout(now, &mut n.dp);
    }
    let d = delta(&[before], std::slice::from_ref(&nodes[0]))[0];
    assert!(
        nodes[0].mesh.counters().changes_failed > failed,
        "the add keeps failing"
    );
    // The event's dump, then one per 2 s retry: two tables each.
    assert!(d.dumps <= 2 * (1 + 5 + 1), "{d:?}");
}

/// Between somebody else's deletion and the coalesced resync 200 ms later,
/// a reconcile (here: a new session to install) reads the kernel rather
/// than trusting the mesh's record: the policy deleted by hand goes back at
/// once, so nothing the reconcile installs relies on a policy that is gone.
#[test]
fn a_reconcile_after_a_foreign_change_reads_the_kernel_first() {
    let (mut nodes, now) = established(2);
    let [out, _] = PolicySpec::pair(nodes[0].addrs[0], nodes[1].addrs[0], Reqid::DEFAULT);
    let n = &mut nodes[0];
    n.dp.delete_policy(out.id).unwrap();
    n.mesh.handle_kernel_event(now, KernelEvent::TablesChanged);
    n.mesh.dirty = true;
    n.mesh
        .handle_timeout(now + Duration::from_millis(10), &mut n.dp);
    assert!(
        n.dp.dump_policies()
            .unwrap()
            .iter()
            .any(|p| p.spec.id == out.id),
        "the policy is back before the coalesced resync"
    );
}

/// `ip xfrm policy update` (or another daemon's UPDPOLICY) on a meshsec
/// selector replaces meshsec's policy; the kernel announces only the new
/// policy, no deletion. The mesh reads the kernel within a second (it used
/// to, at the 2 s resync, before the record; the periodic resync is now
/// 60 s) and finds its policy gone; the same event on a selector meshsec
/// does not use costs nothing.
#[test]
fn a_policy_replaced_in_place_is_noticed_at_once() {
    let (mut nodes, mut now) = established(2);
    let [out, _] = PolicySpec::pair(nodes[0].addrs[0], nodes[1].addrs[0], Reqid::DEFAULT);
    let replaced = |src, dst| KernelEvent::PolicyReplaced {
        src,
        src_len: 32,
        dst,
        dst_len: 32,
        direction: Direction::Out,
    };
    let n = &mut nodes[0];
    let dumps = n.mesh.counters().kernel_dumps;
    let other: IpAddr = "198.51.100.7".parse().unwrap();
    n.mesh.handle_kernel_event(now, replaced(out.id.src, other));
    step(&mut nodes, &mut now, Duration::from_secs(1));
    let n = &mut nodes[0];
    assert_eq!(n.mesh.counters().kernel_dumps, dumps, "another selector");
    n.dp.delete_policy(out.id).unwrap();
    n.dp.add_foreign_policy(out.id);
    let failed = n.mesh.counters().changes_failed;
    n.mesh
        .handle_kernel_event(now, replaced(out.id.src, out.id.dst));
    step(&mut nodes, &mut now, Duration::from_secs(1));
    let n = &nodes[0];
    assert_eq!(n.mesh.counters().kernel_dumps, dumps + 1, "read at once");
    assert!(
        n.mesh.counters().changes_failed > failed,
        "the mesh found its policy gone and tried to put it back"
    );
}

/// Once the kernel's notifications are no longer heard (the monitor socket
/// failed), nothing reports a policy deleted by hand; the mesh reads the
/// kernel every 2 s again and puts it back within seconds, not at the next
/// 60 s resync.
#[test]
fn without_notifications_a_deleted_policy_is_back_within_seconds() {
    let (mut nodes, mut now) = established(2);
    let [out, _] = PolicySpec::pair(nodes[0].addrs[0], nodes[1].addrs[0], Reqid::DEFAULT);
    nodes[0].mesh.monitor_lost(now);
    step(&mut nodes, &mut now, Duration::from_secs(1));
    nodes[0].dp.delete_policy(out.id).unwrap();
    step(&mut nodes, &mut now, Duration::from_secs(3));
    assert!(
        nodes[0]
            .dp
            .dump_policies()
            .unwrap()
            .iter()
            .any(|p| p.spec.id == out.id),
        "the policy is back"
    );
    assert_outbound_accepted(&mut nodes, "after the repair");
}
