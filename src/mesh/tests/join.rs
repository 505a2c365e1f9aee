//! Joining a big mesh (issue 12): one new host and 100 existing members,
//! real Noise handshakes on the in-memory datapath, in virtual time.

use super::*;

/// Existing members, each alive and listening (already keyed among
/// themselves: they have nothing else to do, so only their links to the
/// new host are modelled).
const EXISTING: usize = 100;

/// What the new host has at `sim.now`: peers with which every link (one
/// per family) is established with both SAs in its datapath.
fn keyed_peers(sim: &mut crate::sim::Sim<SimMesh>, new: usize) -> usize {
    let n = &mut sim.nodes[new].0;
    let sas = sa_specs(n);
    n.mesh
        .link_status()
        .values()
        .filter(|links| {
            links.len() == 2
                && links.iter().all(|l| {
                    l.state == LinkState::Established
                        && [(l.spi_in, Direction::In), (l.spi_out, Direction::Out)]
                            .iter()
                            .all(|(spi, dir)| {
                                sas.iter()
                                    .any(|s| Some(s.spi) == *spi && s.direction == Some(*dir))
                            })
                })
        })
        .count()
}

/// The new host joins at `t0`. The new host learns of member `j` at
/// `t0 + learns[j].0` and member `j` of the new host at `t0 +
/// learns[j].1` (gossip spreads news of a host in rounds; its own part is
/// measured in docs/benchmarks.md, "Gossip at scale"). Returns the virtual
/// time until the new host has established links with all EXISTING peers
/// (None: not within `limit`), and the new host's handshake and mesh
/// counters then.
fn join(
    config: MeshConfig,
    net: crate::sim::Net,
    learns: &[(Duration, Duration)],
    limit: Duration,
) -> (Option<Duration>, HandshakeCounters, MeshCounters) {
    assert_eq!(learns.len(), EXISTING);
    let t0 = Instant::now();
    let nodes: Vec<Node> = (0..=EXISTING)
        .map(|i| node_with(&format!("n{i}"), i as u8 + 1, [7; 32], t0, config.clone()))
        .collect();
    let new = EXISTING;
    let mut sim = crate::sim::Sim::new(
        nodes.into_iter().map(|n| SimMesh(n, Vec::new())).collect(),
        net,
    );
    sim.now = t0;
    // Views as they change: (when, whose, members it knows besides itself).
    let mut known_by_new: Vec<usize> = Vec::new();
    let mut news: Vec<(Duration, usize, usize)> = Vec::new();
    for (j, (a, b)) in learns.iter().enumerate() {
        news.push((*a, new, j));
        news.push((*b, j, new));
    }
    news.sort();
    let mut news = news.into_iter().peekable();
    let step = Duration::from_millis(10);
    while sim.now < t0 + limit {
        while let Some((_, whose, of)) = news.next_if(|(at, _, _)| t0 + *at <= sim.now) {
            let others = if whose == new {
                known_by_new.push(of);
                known_by_new.clone()
            } else {
                vec![of]
            };
            let mut v = vec![member(&sim.nodes[whose].0, MemberState::Alive, true)];
            v.extend(
                others
                    .iter()
                    .map(|&j| member(&sim.nodes[j].0, MemberState::Alive, false)),
            );
            let now = sim.now;
            let n = &mut sim.nodes[whose].0;
            n.mesh.set_members(now, &v, &mut n.dp);
        }
        sim.drive_for(step);
        if keyed_peers(&mut sim, new) == EXISTING {
            let n = &sim.nodes[new].0.mesh;
            return (
                Some(sim.now - t0),
                n.handshake_counters(),
                n.counters().clone(),
            );
        }
    }
    let keyed = keyed_peers(&mut sim, new);
    let n = &sim.nodes[new].0.mesh;
    eprintln!(
        "after {limit:?}: {keyed} of {EXISTING} peers keyed; mesh {:?}; handshake {:?}",
        n.counters(),
        n.handshake_counters()
    );
    (None, n.handshake_counters(), n.counters().clone())
}

/// A new host keys with 100 members that all learn of it at once, and it
/// of them, in at most 2 s of virtual time (10 ms one-way delay, no loss).
/// Neither the per-second initiation cap (256 > its 200 links) nor the
/// responder's DoS budget (a burst of 200 >= the members' 200 initiations)
/// holds anything back.
#[test]
fn a_new_host_keys_with_100_members_within_2s() {
    let (t, hs, mesh) = join(
        MeshConfig::default(),
        crate::sim::Net::perfect(),
        &[(Duration::ZERO, Duration::ZERO); EXISTING],
        Duration::from_secs(30),
    );
    eprintln!("joined in {t:?} (virtual); {hs:?}");
    let t = t.expect("keyed with every member");
    assert!(t <= Duration::from_secs(2), "joined in {t:?}");
    assert_eq!(mesh.initiations_deferred, 0);
    assert_eq!((hs.cookie_sent, hs.rate_limited, hs.timeouts), (0, 0, 0));
}

/// As news of the new host spreads: it learns of each member within
/// 0.5 s, each member of it within 1.5 s, in any order. A handshake that
/// reached a member not yet aware of the new host got no answer; once
/// that member knows it, the pair keys within a round trip or two, not
/// at the next retransmission of the backoff (1, 2, 4, 8 s).
#[test]
fn a_new_host_keys_with_100_members_as_the_news_spreads_within_2s() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let ms = |rng: &mut rand::rngs::StdRng, max: u64| Duration::from_millis(rng.gen_range(0..=max));
    let learns: Vec<(Duration, Duration)> = (0..EXISTING)
        .map(|_| (ms(&mut rng, 500), ms(&mut rng, 1500)))
        .collect();
    let net = crate::sim::Net::lossy(
        0.0,
        0.0,
        (Duration::from_millis(2), Duration::from_millis(20)),
        12,
    );
    let (t, hs, _) = join(MeshConfig::default(), net, &learns, Duration::from_secs(30));
    eprintln!("joined in {t:?} (virtual); {hs:?}");
    let t = t.expect("keyed with every member");
    assert!(t <= Duration::from_secs(2), "joined in {t:?}");
}
