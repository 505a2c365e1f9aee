//! Protocol-level tests of the handshake, on the shared simulation harness ([`crate::sim`]):
//! a virtual clock and a lossy, duplicating, reordering network.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::wire::{INITIATION_LEN, INITIATION_MAC1_OFF, RESPONSE_LEN};
use super::*;
use crate::sim::{Net, Packet, Sim, SimNode, Verdict};

const SECRET: [u8; 32] = [0x5a; 32];
const UNIX_T0: Duration = Duration::from_secs(1_780_000_000);

#[derive(Default)]
pub(crate) struct TestCtx {
    pub members: HashSet<PublicKey>,
    pub next_spi: u32,
    pub allocs: u32,
    pub fail_alloc: bool,
}

impl HandshakeContext for TestCtx {
    fn is_member(&self, peer: &PublicKey) -> bool {
        self.members.contains(peer)
    }
    fn alloc_spi(&mut self, _peer: &PublicKey) -> Result<u32, SpiAllocError> {
        if self.fail_alloc {
            return Err(SpiAllocError("test".into()));
        }
        self.allocs += 1;
        self.next_spi += 1;
        Ok(self.next_spi)
    }
}

/// One endpoint at one address, with everything it reported.
pub(crate) struct HsNode {
    pub ep: Endpoint,
    pub addr: SocketAddr,
    pub ctx: TestCtx,
    pub events: Vec<Event>,
    pub rejects: Vec<Rejected>,
    /// What `Endpoint::handle` returned for the last datagram delivered.
    pub last: Option<Result<(), Rejected>>,
}

impl HsNode {
    fn new(ep: Endpoint, addr: SocketAddr, ctx: TestCtx) -> Self {
        HsNode {
            ep,
            addr,
            ctx,
            events: vec![],
            rejects: vec![],
            last: None,
        }
    }
    pub fn established(&self) -> Vec<&Session> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Established(s) => Some(s),
                _ => None,
            })
            .collect()
    }
    pub fn failed(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Event::Failed { .. }))
            .count()
    }
    fn drain_events(&mut self) {
        while let Some(e) = self.ep.poll_event() {
            self.events.push(e);
        }
    }
}

impl SimNode for HsNode {
    fn owns(&self, addr: SocketAddr) -> bool {
        addr == self.addr
    }
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, _: SocketAddr, bytes: &[u8]) {
        let r = self.ep.handle(now, from, bytes, &mut self.ctx);
        if let Err(e) = r {
            self.rejects.push(e);
        }
        self.last = Some(r);
        self.drain_events();
    }
    fn poll_transmit(&mut self, _: Instant) -> Option<(SocketAddr, SocketAddr, Vec<u8>)> {
        self.drain_events();
        let (to, bytes) = self.ep.poll_transmit()?;
        Some((self.addr, to, bytes))
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.ep.poll_timeout()
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.ep.handle_timeout(now);
        self.drain_events();
    }
}

/// Two members that know each other: `nodes[A]` has the lower public key (checked).
pub(crate) type Pair = Sim<HsNode>;
const A: usize = 0;
const B: usize = 1;

pub(crate) fn keypair(seed: u8) -> StaticKeypair {
    StaticKeypair::from_private([seed; 32])
}

pub(crate) fn fast_config() -> Config {
    Config {
        max_jitter: Duration::from_millis(50),
        ..Config::default()
    }
}

pub(crate) fn pair(net: Net) -> Pair {
    pair_with(net, fast_config(), fast_config(), &[SECRET], &[SECRET])
}

pub(crate) fn pair_with(
    net: Net,
    ca: Config,
    cb: Config,
    ka: &[[u8; 32]],
    kb: &[[u8; 32]],
) -> Pair {
    let now = Instant::now();
    let (mut ka_pair, mut kb_pair) = (keypair(1), keypair(2));
    if ka_pair.public() > kb_pair.public() {
        std::mem::swap(&mut ka_pair, &mut kb_pair);
    }
    let (pa, pb) = (*ka_pair.public(), *kb_pair.public());
    let a = HsNode::new(
        Endpoint::with_seed(ca, ka_pair, ka, now, UNIX_T0, 1).unwrap(),
        "127.0.0.1:4001".parse().unwrap(),
        TestCtx {
            members: [pb].into(),
            next_spi: 0x1000,
            ..Default::default()
        },
    );
    let b = HsNode::new(
        Endpoint::with_seed(cb, kb_pair, kb, now, UNIX_T0 + Duration::from_millis(3), 2).unwrap(),
        "127.0.0.2:4002".parse().unwrap(),
        TestCtx {
            members: [pa].into(),
            next_spi: 0x2000,
            ..Default::default()
        },
    );
    let mut sim = Sim::new(vec![a, b], net);
    sim.now = now;
    sim
}

/// N members on one virtual network, each knowing all the others.
fn cluster(n: usize, net: Net) -> Sim<HsNode> {
    let now = Instant::now();
    let keys: Vec<StaticKeypair> = (0..n).map(|i| keypair(10 + i as u8)).collect();
    let pubs: Vec<PublicKey> = keys.iter().map(|k| *k.public()).collect();
    let nodes = keys
        .into_iter()
        .enumerate()
        .map(|(i, kp)| {
            HsNode::new(
                Endpoint::with_seed(fast_config(), kp, &[SECRET], now, UNIX_T0, i as u64).unwrap(),
                SocketAddr::new([127, 0, 1, i as u8 + 1].into(), 4000),
                TestCtx {
                    members: pubs.iter().copied().filter(|p| p != &pubs[i]).collect(),
                    next_spi: 0x1000 * (i as u32 + 1),
                    ..Default::default()
                },
            )
        })
        .collect();
    let mut sim = Sim::new(nodes, net);
    sim.now = now;
    sim
}

impl Sim<HsNode> {
    pub fn pa(&self) -> PublicKey {
        *self.nodes[A].ep.public_key()
    }
    pub fn pb(&self) -> PublicKey {
        *self.nodes[B].ep.public_key()
    }

    /// The last initiation the network carried.
    pub fn last_initiation(&self) -> Packet {
        self.capture
            .iter()
            .rev()
            .find(|c| c.bytes.len() == INITIATION_LEN)
            .expect("an initiation was sent")
            .clone()
    }

    /// Delivers one datagram to whichever node owns `p.to` right now; what its endpoint
    /// returned (None: nobody owns the address).
    pub fn deliver_result(&mut self, p: &Packet) -> Option<Result<(), Rejected>> {
        let i = self.owner(p.to)?;
        self.nodes[i].last = None;
        self.deliver(p);
        self.nodes[i].last.take()
    }
}

/// Asserts two sessions are the two halves of one handshake.
pub(crate) fn assert_halves(x: &Session, y: &Session) {
    assert_eq!(x.session_id, y.session_id, "same handshake");
    assert_eq!(x.key_out, y.key_in, "x→y keys agree");
    assert_eq!(x.key_in, y.key_out, "y→x keys agree");
    assert_ne!(x.key_in, x.key_out, "directions differ");
    assert_eq!(x.local_spi, y.peer_spi);
    assert_eq!(x.peer_spi, y.local_spi);
    assert_eq!(x.algorithm, y.algorithm);
    assert_eq!(x.initiator_timestamp, y.initiator_timestamp);
    assert_ne!(x.role, y.role);
    assert_eq!(x.key_out.as_bytes().len(), x.algorithm.key_len());
}

#[test]
fn clean_handshake_matches_keys_and_spis() {
    let mut p = pair(Net::perfect());
    let (pa, pb) = (p.pa(), p.pb());
    let baddr = p.nodes[B].addr;
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1111).unwrap();
    p.drive_for(Duration::from_secs(5));
    let (sa, sb) = (p.nodes[A].established(), p.nodes[B].established());
    assert_eq!((sa.len(), sb.len()), (1, 1));
    assert_halves(sa[0], sb[0]);
    assert_eq!(sa[0].role, Role::Initiator);
    assert_eq!(sa[0].local_spi, 0x1111);
    assert_eq!(
        sb[0].local_spi, 0x2001,
        "responder allocated through the context"
    );
    assert_eq!(sa[0].peer, pb);
    assert_eq!(sb[0].peer, pa);
    assert_eq!(sb[0].peer_addr, p.nodes[A].addr);
    assert_eq!(sa[0].algorithm, Aead::Aes128Gcm);
    assert_eq!(sa[0].key_out.as_bytes().len(), 20);
    assert_eq!(p.nodes[A].ep.counters().retransmits, 0);
    assert!(
        p.nodes[A].ep.poll_timeout().is_none(),
        "no timers after completion"
    );
    assert_eq!(p.capture.len(), 2, "one round trip");
    assert_eq!(p.capture[0].bytes.len(), INITIATION_LEN);
    assert_eq!(p.capture[1].bytes.len(), RESPONSE_LEN);
}

#[test]
fn every_algorithm_gives_its_key_length() {
    for alg in [Aead::Aes128Gcm, Aead::Aes256Gcm, Aead::ChaCha20Poly1305] {
        let cfg = Config {
            algorithm: alg,
            ..fast_config()
        };
        let mut p = pair_with(Net::perfect(), cfg.clone(), cfg, &[SECRET], &[SECRET]);
        let (pb, baddr) = (p.pb(), p.nodes[B].addr);
        p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1111).unwrap();
        p.drive_for(Duration::from_secs(2));
        let (sa, sb) = (p.nodes[A].established(), p.nodes[B].established());
        assert_eq!(sa.len(), 1);
        assert_halves(sa[0], sb[0]);
        assert_eq!(sa[0].key_in.as_bytes().len(), alg.key_len());
    }
}

#[test]
fn algorithm_mismatch_gives_no_session() {
    let cb = Config {
        algorithm: Aead::ChaCha20Poly1305,
        ..fast_config()
    };
    let mut p = pair_with(Net::perfect(), fast_config(), cb, &[SECRET], &[SECRET]);
    let (pb, baddr) = (p.pb(), p.nodes[B].addr);
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1111).unwrap();
    p.drive_for(Duration::from_secs(30));
    assert!(p.nodes[A].established().is_empty() && p.nodes[B].established().is_empty());
    assert!(p.nodes[B].ep.counters().alg_mismatch >= 1);
    assert_eq!(p.nodes[A].failed(), 1);
}

#[test]
fn scripted_loss_recovers_by_retransmission() {
    let mut p = pair(Net::perfect());
    let (pb, baddr) = (p.pb(), p.nodes[B].addr);
    // Drop the first two initiations and the first response.
    let (mut inits, mut resps) = (0, 0);
    p.filter = Some(Box::new(move |pk: &Packet| {
        let drop = match pk.bytes.len() {
            INITIATION_LEN => {
                inits += 1;
                inits <= 2
            }
            RESPONSE_LEN => {
                resps += 1;
                resps <= 1
            }
            _ => false,
        };
        if drop {
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    }));
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1111).unwrap();
    let t0 = p.now;
    p.drive_for(Duration::from_secs(20));
    let (sa, sb) = (p.nodes[A].established(), p.nodes[B].established());
    assert_eq!(sa.len(), 1);
    assert_eq!(
        sb.len(),
        1,
        "the 4th initiation is answered from the cache, not a new session"
    );
    assert_halves(sa[0], sb[0]);
    assert_eq!(p.nodes[A].ep.counters().retransmits, 3);
    assert_eq!(p.nodes[B].ep.counters().retransmit_answered, 1);
    assert_eq!(p.nodes[B].ctx.allocs, 1, "one SPI for one session");
    // Backoff 1 s, 2 s, 4 s (+ ≤50 ms jitter each): the 4th send is at ~7 s.
    let done = sa[0].established_at - t0;
    assert!(
        done > Duration::from_secs(7) && done < Duration::from_secs(8),
        "{done:?}"
    );
}

#[test]
fn random_loss_dup_reorder_completes_consistently() {
    let mut completed = 0;
    for seed in 0..25 {
        let net = Net {
            loss: 0.3,
            dup: 0.2,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(1500),
            rng: StdRng::seed_from_u64(seed),
        };
        let mut p = pair(net);
        let (pb, baddr) = (p.pb(), p.nodes[B].addr);
        p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1111).unwrap();
        p.drive_for(Duration::from_secs(40));
        let (sa, sb) = (p.nodes[A].established(), p.nodes[B].established());
        assert!(
            sa.len() <= 1 && sb.len() <= 1,
            "seed {seed}: at most one session per side"
        );
        if let Some(s) = sa.first() {
            completed += 1;
            assert_eq!(
                sb.len(),
                1,
                "seed {seed}: initiator done implies responder done"
            );
            assert_halves(s, sb[0]);
        } else {
            assert_eq!(
                p.nodes[A].failed(),
                1,
                "seed {seed}: no session means a Failed event"
            );
        }
        assert!(p.nodes[B].ctx.allocs <= 1, "seed {seed}");
    }
    assert!(completed >= 22, "only {completed}/25 completed at 30% loss");
}

#[test]
fn times_out_with_backoff_and_reports_spi() {
    let mut p = pair(Net::perfect());
    let (pb, baddr) = (p.pb(), p.nodes[B].addr);
    p.filter = Some(Box::new(|_: &Packet| Verdict::Drop));
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x4242).unwrap();
    assert_eq!(
        p.nodes[A].ep.initiate(p.now, pb, baddr, 0x4243),
        Err(InitiateError::InProgress)
    );
    p.drive_for(Duration::from_secs(60));
    let sends: Vec<_> = p.capture.iter().map(|c| c.at).collect();
    assert_eq!(sends.len(), 5, "sends at ~0, 1, 3, 7, 15 s");
    let gaps: Vec<u64> = sends
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis() as u64 / 1000)
        .collect();
    assert_eq!(gaps, vec![1, 2, 4, 8]);
    assert!(matches!(
        p.nodes[A].events.as_slice(),
        [Event::Failed {
            local_spi: 0x4242,
            reason: FailReason::Timeout,
            ..
        }]
    ));
    assert!(!p.nodes[A].ep.is_initiating(&pb));
    assert!(p.nodes[A].ep.poll_timeout().is_none());
}

#[test]
fn initiate_argument_errors() {
    let mut p = pair(Net::perfect());
    let (pa, pb, baddr) = (p.pa(), p.pb(), p.nodes[B].addr);
    assert_eq!(
        p.nodes[A].ep.initiate(p.now, pa, baddr, 0x1000),
        Err(InitiateError::SelfPeer)
    );
    assert_eq!(
        p.nodes[A].ep.initiate(p.now, pb, baddr, 255),
        Err(InitiateError::ReservedSpi(255))
    );
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1000).unwrap();
    assert_eq!(p.nodes[A].ep.cancel(&pb), Some(0x1000));
    assert_eq!(p.nodes[A].ep.cancel(&pb), None);
}

fn both_initiate(p: &mut Pair) {
    let (pa, pb, aaddr, baddr) = (p.pa(), p.pb(), p.nodes[A].addr, p.nodes[B].addr);
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0xa000).unwrap();
    p.nodes[B].ep.initiate(p.now, pa, aaddr, 0xb000).unwrap();
}

#[test]
fn simultaneous_initiation_yields_one_session() {
    let mut p = pair(Net::perfect());
    both_initiate(&mut p);
    p.drive_for(Duration::from_secs(30));
    let (sa, sb) = (p.nodes[A].established(), p.nodes[B].established());
    assert_eq!((sa.len(), sb.len()), (1, 1));
    assert_halves(sa[0], sb[0]);
    assert_eq!(sa[0].role, Role::Initiator, "lower static key initiates");
    assert_eq!(
        sb[0].local_spi, 0xb000,
        "B reused the SPI of its abandoned initiation"
    );
    assert_eq!(p.nodes[B].ctx.allocs, 0);
    assert_eq!(p.nodes[A].ep.counters().collision_dropped, 1);
    assert_eq!(p.nodes[B].ep.counters().collision_abandoned, 1);
    assert_eq!(p.nodes[A].failed() + p.nodes[B].failed(), 0);
    assert!(p.nodes[A].ep.poll_timeout().is_none() && p.nodes[B].ep.poll_timeout().is_none());
}

/// A (the lower key) initiates before B knows it (gossip has not told B yet: `unknown_peer`,
/// no answer). Once B knows A it initiates too; A drops that in the collision and, since B
/// evidently knows it now, resends its own initiation at once instead of at its next
/// retransmission (1 s, then 2, 4, 8 s after the last).
#[test]
fn a_collision_resends_an_initiation_the_peer_dropped_before_it_knew_us() {
    let mut p = pair(Net::perfect());
    let members = std::mem::take(&mut p.nodes[B].ctx.members);
    let (pa, pb, aaddr, baddr) = (p.pa(), p.pb(), p.nodes[A].addr, p.nodes[B].addr);
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0xa000).unwrap();
    p.drive_for(Duration::from_millis(300));
    assert_eq!(p.nodes[B].ep.counters().unknown_peer, 1);
    p.nodes[B].ctx.members = members;
    let t = p.now;
    p.nodes[B].ep.initiate(t, pa, aaddr, 0xb000).unwrap();
    p.drive_for(Duration::from_millis(100));
    let (sa, sb) = (p.nodes[A].established(), p.nodes[B].established());
    assert_eq!(
        (sa.len(), sb.len()),
        (1, 1),
        "keyed within 100 ms of B's initiation"
    );
    assert_halves(sa[0], sb[0]);
    assert_eq!(sa[0].role, Role::Initiator, "lower static key initiates");
    assert!(sa[0].established_at - t <= Duration::from_millis(40));
    assert_eq!(p.nodes[A].ep.counters().collision_dropped, 1);
    assert_eq!(p.nodes[A].ep.counters().retransmits, 1, "the resend");
    assert_eq!(p.nodes[B].ep.counters().collision_abandoned, 1);
}

/// The resend after a collision happens once per attempt: copies of the peer's initiation
/// (replayed by anyone on the path) cannot make us send more.
#[test]
fn a_collision_resends_at_most_once_per_attempt() {
    let mut p = pair(Net::perfect());
    let (pa, pb, aaddr, baddr) = (p.pa(), p.pb(), p.nodes[A].addr, p.nodes[B].addr);
    // A's initiations never reach B: A stays initiating.
    p.filter = Some(Box::new(move |pk: &Packet| {
        if pk.to == baddr {
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    }));
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0xa000).unwrap();
    p.nodes[B].ep.initiate(p.now, pa, aaddr, 0xb000).unwrap();
    p.drive_for(Duration::from_millis(50));
    let b_init = p
        .capture
        .iter()
        .find(|c| c.from == baddr && c.bytes.len() == INITIATION_LEN)
        .expect("B initiated")
        .clone();
    let sent = p.nodes[A].ep.counters().sent;
    for _ in 0..10 {
        assert_eq!(
            p.deliver_result(&b_init),
            Some(Err(Rejected::CollisionDropped))
        );
    }
    assert_eq!(p.nodes[A].ep.counters().collision_dropped, 11);
    assert_eq!(
        p.nodes[A].ep.counters().sent,
        sent,
        "resent once, at the first collision"
    );
    assert_eq!(p.nodes[A].ep.counters().retransmits, 1);
}

#[test]
fn abandoned_initiation_arriving_late_is_rejected() {
    let mut p = pair(Net::perfect());
    let baddr = p.nodes[B].addr;
    // B's (the higher key's) initiation is held back until A has completed.
    p.filter = Some(Box::new(move |pk: &Packet| {
        if pk.from == baddr && pk.bytes.len() == INITIATION_LEN {
            Verdict::Delay(Duration::from_millis(500))
        } else {
            Verdict::Pass
        }
    }));
    both_initiate(&mut p);
    p.drive_for(Duration::from_secs(30));
    let (sa, sb) = (p.nodes[A].established(), p.nodes[B].established());
    assert_eq!(
        (sa.len(), sb.len()),
        (1, 1),
        "no second session from the late initiation"
    );
    assert_halves(sa[0], sb[0]);
    assert_eq!(p.nodes[A].ep.counters().replayed, 1);
}

#[test]
fn simultaneous_initiation_under_random_network() {
    for seed in 0..25 {
        let net = Net {
            loss: 0.2,
            dup: 0.2,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(800),
            rng: StdRng::seed_from_u64(100 + seed),
        };
        let mut p = pair(net);
        both_initiate(&mut p);
        p.drive_for(Duration::from_secs(60));
        let (sa, sb) = (p.nodes[A].established(), p.nodes[B].established());
        assert!(
            sa.len() <= 1 && sb.len() <= 1,
            "seed {seed}: {} / {} sessions",
            sa.len(),
            sb.len()
        );
        if let (Some(x), Some(y)) = (sa.first(), sb.first()) {
            assert_halves(x, y);
        } else {
            assert!(sa.len() + sb.len() <= 1, "seed {seed}");
        }
    }
}

#[test]
fn replayed_initiation_rejected() {
    let mut p = pair(Net::perfect());
    let (pb, baddr) = (p.pb(), p.nodes[B].addr);
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1111).unwrap();
    p.drive_for(Duration::from_secs(2));
    assert_eq!(p.nodes[B].established().len(), 1);
    let init = p.capture[0].clone();
    let resp = p.capture[1].bytes.clone();
    let sent_before = p.nodes[B].ep.counters().sent;

    // Within the cache window an exact copy gets the same response and nothing else.
    assert_eq!(p.deliver_result(&init), Some(Ok(())));
    assert_eq!(p.capture.last().unwrap().bytes, resp);
    assert_eq!(p.nodes[B].established().len(), 1);

    // After it, the copy is a replay: DH work, then rejected by the timestamp; no reply.
    p.advance(p.nodes[B].ep.config().response_cache_ttl + Duration::from_secs(1));
    let sent = p.nodes[B].ep.counters().sent;
    assert_eq!(p.deliver_result(&init), Some(Err(Rejected::Replayed)));
    assert_eq!(p.nodes[B].ep.counters().sent, sent);
    assert_eq!(p.nodes[B].ep.counters().sent, sent_before + 1);
    assert_eq!(p.nodes[B].established().len(), 1);

    // A second handshake makes the first initiation older than the floor, cache or not.
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1112).unwrap();
    p.drive_for(Duration::from_secs(2));
    assert_eq!(p.nodes[B].established().len(), 2);
    assert_eq!(p.deliver_result(&init), Some(Err(Rejected::Replayed)));
    assert_eq!(p.nodes[B].ep.counters().replayed, 2);
    assert_eq!(p.nodes[B].established().len(), 2);
}

#[test]
fn stale_response_rejected() {
    let mut p = pair(Net::perfect());
    let (pb, baddr) = (p.pb(), p.nodes[B].addr);
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1111).unwrap();
    p.drive_for(Duration::from_secs(2));
    let resp = p.capture[1].clone();
    assert_eq!(
        p.deliver_result(&resp),
        Some(Err(Rejected::StaleResponse)),
        "replayed after completion"
    );

    // A new initiation is outstanding; the old response does not match it.
    p.filter = Some(Box::new(|_: &Packet| Verdict::Drop));
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1112).unwrap();
    p.collect();
    assert_eq!(p.deliver_result(&resp), Some(Err(Rejected::StaleResponse)));
    assert_eq!(p.nodes[A].established().len(), 1);
    assert!(
        p.nodes[A].ep.is_initiating(&pb),
        "still waiting for the right response"
    );

    // Even with the index rewritten to the outstanding one, mac1/Noise reject it.
    let cur = p.capture.last().unwrap().bytes.clone();
    let mut forged = resp.bytes.clone();
    forged[8..12].copy_from_slice(&cur[4..8]);
    let r = p.deliver_result(&Packet {
        bytes: forged,
        ..resp.clone()
    });
    assert_eq!(r, Some(Err(Rejected::BadMac)));
    assert_eq!(p.nodes[A].ep.counters().stale_response, 2);
}

#[test]
fn wrong_cluster_secret_gives_no_session() {
    let mut p = pair_with(
        Net::perfect(),
        fast_config(),
        fast_config(),
        &[SECRET],
        &[[0x11; 32]],
    );
    let (pb, baddr) = (p.pb(), p.nodes[B].addr);
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1111).unwrap();
    p.drive_for(Duration::from_secs(30));
    assert!(p.nodes[A].established().is_empty() && p.nodes[B].established().is_empty());
    assert_eq!(p.nodes[B].ep.counters().bad_mac, 5);
    assert_eq!(
        p.nodes[B].ep.counters().dh_work,
        0,
        "rejected before any DH"
    );
    assert_eq!(p.nodes[B].ep.counters().sent, 0, "no reply");
    assert_eq!(p.nodes[A].failed(), 1);
    assert_eq!(p.nodes[B].ctx.allocs, 0);
}

#[test]
fn wrong_psk_with_right_mac1_fails_decryption() {
    // An attacker that knows the mac1 key but not the PSK (or a mixed-up keyring) gets no
    // further than Noise: build the initiation by hand with a different PSK.
    let mut p = pair(Net::perfect());
    let (pb, baddr) = (p.pb(), p.nodes[B].addr);
    let a_kp = keypair(if p.pa() == *keypair(1).public() { 1 } else { 2 });
    let payload = wire::InitPayload {
        timestamp: 1,
        spi: 0x1000,
        alg: 1,
    };
    let (_, noise) = noise::initiator_start(
        &dh::StaticDh::new(&a_kp),
        &pb,
        &[9; 32],
        None,
        &payload.encode(),
    )
    .unwrap();
    let mut msg = wire::encode_initiation(7, &noise);
    noise::put_mac(
        &mut msg,
        INITIATION_MAC1_OFF,
        &crypto::derive_mac1_key(&SECRET, &pb),
    );
    let pk = Packet {
        at: p.now,
        from: p.nodes[A].addr,
        to: baddr,
        bytes: msg.to_vec(),
    };
    // IKpsk2 mixes the PSK only into message 2, so B can read message 1 and answers (as
    // WireGuard would) ...
    assert_eq!(p.deliver_result(&pk), Some(Ok(())));
    assert_eq!(p.nodes[B].established().len(), 1);
    // ... but its response is keyed with the real PSK, so a sender without it cannot complete
    // the handshake or learn the keys.
    let resp = p.capture.last().unwrap().bytes.clone();
    let (mut hs, _) = noise::initiator_start(
        &dh::StaticDh::new(&a_kp),
        &pb,
        &[9; 32],
        None,
        &payload.encode(),
    )
    .unwrap();
    let resp_noise: [u8; wire::NOISE_RESP_LEN] =
        resp[12..12 + wire::NOISE_RESP_LEN].try_into().unwrap();
    assert!(noise::initiator_finish(&mut hs, &resp_noise).is_err());
}

#[test]
fn keyring_rotation_both_orders() {
    let new = [0x77; 32];
    // Initiator already on the new secret, responder holds both.
    let mut p = pair_with(
        Net::perfect(),
        fast_config(),
        fast_config(),
        &[new],
        &[SECRET, new],
    );
    let (pb, baddr) = (p.pb(), p.nodes[B].addr);
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1111).unwrap();
    p.drive_for(Duration::from_secs(2));
    assert_eq!(p.nodes[A].established().len(), 1);
    assert_halves(p.nodes[A].established()[0], p.nodes[B].established()[0]);
    // Initiator still on the old secret, responder already rotated (new first, old kept).
    let mut p = pair_with(
        Net::perfect(),
        fast_config(),
        fast_config(),
        &[SECRET],
        &[new, SECRET],
    );
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1111).unwrap();
    p.drive_for(Duration::from_secs(2));
    assert_eq!(p.nodes[A].established().len(), 1);
    // After dropping the old secret it no longer works.
    p.nodes[B].ep.set_keyring(&[new]).unwrap();
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1112).unwrap();
    p.drive_for(Duration::from_secs(30));
    assert_eq!(p.nodes[A].established().len(), 1);
    assert_eq!(p.nodes[A].failed(), 1);
    assert_eq!(
        p.nodes[B].ep.set_keyring(&[]),
        Err(ConfigError::EmptyKeyring)
    );
}

#[test]
fn a_new_initiating_secret_cancels_outstanding_initiations() {
    let new = [0x42u8; 32];
    let mut p = pair_with(
        Net::perfect(),
        fast_config(),
        fast_config(),
        &[SECRET],
        &[SECRET],
    );
    let (pb, baddr) = (p.pb(), p.nodes[B].addr);
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1111).unwrap();
    // Same first secret (one added behind it): the initiation goes on.
    assert_eq!(p.nodes[A].ep.set_keyring(&[SECRET, new]).unwrap(), vec![]);
    assert!(p.nodes[A].ep.is_initiating(&pb));
    // A new first secret: the initiation (old secret) is handed back.
    assert_eq!(
        p.nodes[A].ep.set_keyring(&[new, SECRET]).unwrap(),
        vec![(pb, 0x1111)]
    );
    assert!(!p.nodes[A].ep.is_initiating(&pb));
    // Started again under the new secret, it completes with a peer that knows it.
    p.nodes[B].ep.set_keyring(&[new]).unwrap();
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1112).unwrap();
    p.drive_for(Duration::from_secs(2));
    assert_eq!(p.nodes[A].established().len(), 1);
}

#[test]
fn unknown_static_key_gets_no_reply() {
    let mut p = pair(Net::perfect());
    p.nodes[B].ctx.members.clear();
    let (pb, baddr) = (p.pb(), p.nodes[B].addr);
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1111).unwrap();
    p.drive_for(Duration::from_secs(30));
    assert!(p.nodes[B].established().is_empty() && p.nodes[A].established().is_empty());
    assert_eq!(p.nodes[B].ep.counters().unknown_peer, 5);
    assert_eq!(p.nodes[B].ep.counters().sent, 0);
    assert_eq!(p.nodes[B].ctx.allocs, 0, "no SPI allocated for strangers");
}

#[test]
fn spi_alloc_failure_gives_no_reply() {
    let mut p = pair(Net::perfect());
    p.nodes[B].ctx.fail_alloc = true;
    let (pb, baddr) = (p.pb(), p.nodes[B].addr);
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1111).unwrap();
    p.drive_for(Duration::from_secs(2));
    assert!(p.nodes[B].established().is_empty());
    assert_eq!(p.nodes[B].ep.counters().spi_alloc_failed, 2);
    // The allocator recovers and the next retransmission succeeds.
    p.nodes[B].ctx.fail_alloc = false;
    p.drive_for(Duration::from_secs(10));
    assert_eq!(p.nodes[A].established().len(), 1);
    assert_halves(p.nodes[A].established()[0], p.nodes[B].established()[0]);
}

#[test]
fn garbage_and_mutations_are_counted_not_fatal() {
    let mut p = pair(Net::perfect());
    let (pb, baddr) = (p.pb(), p.nodes[B].addr);
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1111).unwrap();
    p.collect();
    let init = p.in_flight.pop().unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let from = p.nodes[A].addr;
    let mut n = 0u64;
    // Random bytes of every length up to 300.
    for len in 0..300 {
        let mut bytes = vec![0u8; len];
        rng.fill(&mut bytes[..]);
        if len > 0 && rng.gen_bool(0.5) {
            bytes[0] = wire::VERSION;
        }
        if len > 1 {
            bytes[1] = rng.gen_range(0..5);
        }
        if len > 3 && rng.gen_bool(0.7) {
            bytes[2] = 0;
            bytes[3] = 0;
        }
        for to in [baddr, p.nodes[A].addr] {
            let r = p
                .deliver_result(&Packet {
                    at: p.now,
                    from,
                    to,
                    bytes: bytes.clone(),
                })
                .unwrap();
            assert!(r.is_err());
            n += 1;
        }
    }
    // Every truncation of a valid initiation, and every single-bit flip of its authenticated
    // part.
    for len in 0..init.bytes.len() {
        let r = p
            .deliver_result(&Packet {
                bytes: init.bytes[..len].to_vec(),
                ..init.clone()
            })
            .unwrap();
        assert!(matches!(
            r,
            Err(Rejected::BadLength | Rejected::BadVersion | Rejected::BadType)
        ));
        n += 1;
    }
    for bit in 0..(INITIATION_MAC1_OFF + 16) * 8 {
        let mut bytes = init.bytes.clone();
        bytes[bit / 8] ^= 1 << (bit % 8);
        let r = p
            .deliver_result(&Packet {
                bytes,
                ..init.clone()
            })
            .unwrap();
        // Flipping the type byte turns it into another type of the wrong length.
        assert!(
            matches!(
                r,
                Err(Rejected::BadMac
                    | Rejected::BadVersion
                    | Rejected::BadType
                    | Rejected::BadLength)
            ),
            "bit {bit}: {r:?}"
        );
        n += 1;
    }
    let total = |c: &Counters| {
        c.bad_len + c.bad_version + c.bad_type + c.bad_mac + c.stale_response + c.bad_cookie
    };
    assert_eq!(
        total(p.nodes[A].ep.counters()) + total(p.nodes[B].ep.counters()),
        n
    );
    assert!(p.nodes[A].events.is_empty() && p.nodes[B].events.is_empty());
    assert_eq!(p.nodes[B].ep.counters().dh_work, 0);
    // The real initiation still works afterwards.
    assert_eq!(p.deliver_result(&init), Some(Ok(())));
    assert_eq!(p.nodes[B].established().len(), 1);
}

/// Valid-mac1 initiations from a non-member that knows the cluster secret and B's public key
/// (a leaked secret, or captured traffic), sent from many spoofed addresses.
fn flood_packets(p: &Pair, count: usize) -> Vec<Vec<u8>> {
    let mut attacker = Endpoint::new(fast_config(), keypair(9), &[SECRET], p.now, UNIX_T0).unwrap();
    let pb = p.pb();
    (0..count)
        .map(|i| {
            attacker
                .initiate(p.now, pb, p.nodes[B].addr, 0x9000 + i as u32)
                .unwrap();
            let (_, bytes) = attacker.poll_transmit().unwrap();
            attacker.cancel(&pb);
            bytes
        })
        .collect()
}

#[test]
fn flood_triggers_cookies_and_member_still_completes() {
    let cb = Config {
        load_rate: 20,
        load_burst: 5,
        cookie_reply_rate: 1000,
        cookie_reply_burst: 50,
        ..fast_config()
    };
    let mut p = pair_with(Net::perfect(), fast_config(), cb, &[SECRET], &[SECRET]);
    let flood = flood_packets(&p, 40);
    let (pb, baddr) = (p.pb(), p.nodes[B].addr);
    let mut rng = StdRng::seed_from_u64(3);
    // 3 s of flood at 2 packets per ms; A starts its handshake 100 ms in.
    let start = p.now;
    let mut sent_flood = 0u64;
    for ms in 0..3000u64 {
        p.drive_for(Duration::from_millis(1));
        if ms == 100 {
            p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1111).unwrap();
        }
        for _ in 0..2 {
            let from: SocketAddr = SocketAddr::new(
                [127, 3, rng.gen(), rng.gen()].into(),
                rng.gen_range(1024..65535),
            );
            let bytes = flood[rng.gen_range(0..flood.len())].clone();
            p.deliver(&Packet {
                at: p.now,
                from,
                to: baddr,
                bytes,
            });
            sent_flood += 1;
        }
    }
    let c = p.nodes[B].ep.counters().clone();
    assert!(p.nodes[B].ep.is_under_load(p.now));
    assert_eq!(
        p.nodes[A].established().len(),
        1,
        "member completed during the flood: {c:?}"
    );
    assert_halves(p.nodes[A].established()[0], p.nodes[B].established()[0]);
    let took = p.nodes[A].established()[0].established_at - start;
    assert!(took < Duration::from_millis(200), "completed in {took:?}");
    assert!(p.nodes[A].ep.counters().cookie_received >= 1);
    assert!(c.cookie_sent > 1000, "{c:?}");
    // DH work bounded by the budget (burst + rate × 3 s), not by the 6000 flood packets.
    assert!(c.dh_work <= 5 + 20 * 3 + 2, "{c:?}");
    assert_eq!(
        c.unknown_peer + 1,
        c.dh_work,
        "all DH work but A's was spent on the flood"
    );
    assert_eq!(c.received, sent_flood + 2);
    assert!(c.rate_limited > 0, "cookie replies are capped too: {c:?}");
}

#[test]
fn mac2_is_bound_to_source_address() {
    let cb = Config {
        load_rate: 1,
        load_burst: 1,
        ..fast_config()
    };
    let mut p = pair_with(Net::perfect(), fast_config(), cb, &[SECRET], &[SECRET]);
    let flood = flood_packets(&p, 2);
    let (pb, baddr) = (p.pb(), p.nodes[B].addr);
    // Exhaust B's budget so it is under load.
    for bytes in flood {
        p.deliver(&Packet {
            at: p.now,
            from: "127.9.9.9:9".parse().unwrap(),
            to: baddr,
            bytes,
        });
    }
    assert!(p.nodes[B].ep.is_under_load(p.now));
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1111).unwrap();
    p.drive_for(Duration::from_millis(100));
    assert_eq!(p.nodes[A].established().len(), 1);
    // The initiation that carried a valid mac2, replayed from another address, gets a cookie.
    let with_mac2 = p.last_initiation();
    let r = p.deliver_result(&Packet {
        from: "127.8.8.8:8".parse().unwrap(),
        ..with_mac2
    });
    assert_eq!(r, Some(Err(Rejected::CookieSent)));
}

#[test]
fn cookie_reply_for_unknown_index_or_forged_is_rejected() {
    let mut p = pair(Net::perfect());
    let (pb, baddr) = (p.pb(), p.nodes[B].addr);
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1111).unwrap();
    p.collect();
    let init = p.in_flight.pop().unwrap().bytes;
    let idx = u32::from_be_bytes(init[4..8].try_into().unwrap());
    let stranger = wire::encode_cookie_reply(idx.wrapping_add(1), &[0; 24], &[0; 32]);
    let forged = wire::encode_cookie_reply(idx, &[0; 24], &[0; 32]);
    let from = baddr;
    let to = p.nodes[A].addr;
    let r1 = p.deliver_result(&Packet {
        at: p.now,
        from,
        to,
        bytes: stranger.to_vec(),
    });
    let r2 = p.deliver_result(&Packet {
        at: p.now,
        from,
        to,
        bytes: forged.to_vec(),
    });
    assert_eq!(
        (r1, r2),
        (
            Some(Err(Rejected::StaleResponse)),
            Some(Err(Rejected::BadCookie))
        )
    );
}

#[test]
fn cookie_holding_source_is_rate_limited_per_ip() {
    // An insider that can receive cookies at its address: under load it gets DH work only at
    // the per-source rate.
    let cb = Config {
        load_rate: 1,
        load_burst: 1,
        per_source_rate: 1,
        per_source_burst: 3,
        ..fast_config()
    };
    let mut p = pair_with(Net::perfect(), fast_config(), cb, &[SECRET], &[SECRET]);
    let (pb, baddr) = (p.pb(), p.nodes[B].addr);
    let src: SocketAddr = "127.7.7.7:7777".parse().unwrap();
    let mut x = Endpoint::new(fast_config(), keypair(9), &[SECRET], p.now, UNIX_T0).unwrap();
    let mut none = TestCtx::default();
    for i in 0..50u32 {
        x.initiate(p.now, pb, baddr, 0x9000 + i).unwrap();
        while let Some((_, bytes)) = x.poll_transmit() {
            p.deliver(&Packet {
                at: p.now,
                from: src,
                to: baddr,
                bytes,
            });
            // deliver() moved B's replies into the network; hand them to X directly.
            for reply in std::mem::take(&mut p.in_flight) {
                assert_eq!(reply.to, src);
                let _ = x.handle(p.now, baddr, &reply.bytes, &mut none);
            }
        }
        x.cancel(&pb);
        p.advance(Duration::from_millis(20));
    }
    let c = p.nodes[B].ep.counters();
    assert!(x.counters().cookie_received >= 1);
    // 1 s elapsed: budget 1 (before load) + per-source burst 3 + ~1 refill.
    assert!(c.dh_work <= 1 + 3 + 1, "{c:?}");
    assert!(c.rate_limited >= 40, "{c:?}");
}

/// A pair whose B is under load for 60 s, with this per-static-key rate and burst.
fn pair_under_load(per_peer_rate: u32, per_peer_burst: u32) -> Pair {
    let cb = Config {
        per_peer_rate,
        per_peer_burst,
        ..fast_config()
    };
    let mut p = pair_with(Net::perfect(), fast_config(), cb, &[SECRET], &[SECRET]);
    let until = p.now + Duration::from_secs(60);
    p.nodes[B].ep.force_under_load(p.now, until, [4; 32]);
    p
}

#[test]
fn under_load_one_static_key_is_rate_limited_after_its_initiation_is_read() {
    // A member (or a thief of its key) re-handshakes 20 times in 1 s from a proven address,
    // each initiation fresh. Under load B reads each one (es, ss: the key is only known then)
    // but answers, allocates SPIs and installs SAs only at the per-key rate.
    let mut p = pair_under_load(1, 2);
    let (pb, baddr) = (p.pb(), p.nodes[B].addr);
    for i in 0..20u32 {
        p.nodes[A].ep.cancel(&pb);
        p.nodes[A]
            .ep
            .initiate(p.now, pb, baddr, 0x1111 + i)
            .unwrap();
        p.drive_for(Duration::from_millis(50));
    }
    let c = p.nodes[B].ep.counters().clone();
    assert!(p.nodes[B].ep.is_under_load(p.now));
    let sessions = p.nodes[B].established().len();
    // Burst 2 + 1/s × 1 s.
    assert!((2..=3).contains(&sessions), "{sessions} sessions: {c:?}");
    // Its source prefix starts with its fair burst and refills at 20/s: all
    // but at most one of the 20 (50 ms apart) are read.
    assert!((19..=20).contains(&c.dh_work), "{c:?}");
    assert_eq!(c.peer_rate_limited, c.dh_work - sessions as u64, "{c:?}");
    assert_eq!(p.nodes[A].established().len(), sessions);
}

#[test]
fn under_load_replays_do_not_spend_the_members_key_budget() {
    // The per-key check comes after the replay check: an attacker replaying a member's old
    // initiation (from the member's address, so its mac2 still proves the source) costs B the
    // reading DH work, but cannot lock the member out.
    let mut p = pair_under_load(0, 2);
    let (pb, baddr) = (p.pb(), p.nodes[B].addr);
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1111).unwrap();
    p.drive_for(Duration::from_millis(50));
    assert_eq!(p.nodes[B].established().len(), 1);
    let old = p.last_initiation();
    // After the response cache expired, replays cost DH work and are rejected as replays.
    p.advance(Duration::from_secs(21));
    for _ in 0..10 {
        let r = p.deliver_result(&Packet {
            at: p.now,
            ..old.clone()
        });
        assert_eq!(r, Some(Err(Rejected::Replayed)));
    }
    // The replays did spend the source's budget (they came from A's address): let it refill.
    p.advance(Duration::from_secs(1));
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1112).unwrap();
    p.drive_for(Duration::from_millis(50));
    let c = p.nodes[B].ep.counters();
    assert_eq!(p.nodes[B].established().len(), 2, "{c:?}");
    assert_eq!(c.peer_rate_limited, 0, "{c:?}");
}

#[test]
fn forget_cancels_and_clears_peer_state() {
    let mut p = pair(Net::perfect());
    let (pb, baddr) = (p.pb(), p.nodes[B].addr);
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1111).unwrap();
    p.drive_for(Duration::from_secs(1));
    assert_eq!(p.nodes[A].established().len(), 1);
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0x1112).unwrap();
    assert_eq!(p.nodes[A].ep.forget(&pb), Some(0x1112));
    assert!(!p.nodes[A].ep.is_initiating(&pb));
    assert!(p.nodes[A].ep.poll_timeout().is_none());
    // The in-flight initiation's response now matches nothing.
    p.drive_for(Duration::from_secs(1));
    assert_eq!(p.nodes[A].established().len(), 1);
    assert_eq!(p.nodes[A].ep.counters().stale_response, 1);
}

#[test]
fn endpoint_is_send_for_async_drivers() {
    fn assert_send<T: Send>() {}
    assert_send::<Endpoint>();
    assert_send::<Session>();
    assert_send::<Event>();
}

#[test]
fn counters_serialise_by_name() {
    let mut p = pair(Net::perfect());
    let from = p.nodes[A].addr;
    let to = p.nodes[B].addr;
    p.deliver(&Packet {
        at: p.now,
        from,
        to,
        bytes: vec![1, 2, 3],
    });
    let v = serde_json::to_value(p.nodes[B].ep.counters()).unwrap();
    assert_eq!(v["bad_len"], 1);
    assert_eq!(v["received"], 1);
}

#[test]
fn five_members_all_initiate_at_once_every_pair_gets_one_session() {
    for seed in 0..10 {
        let net = Net {
            loss: 0.1,
            dup: 0.1,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(100),
            rng: StdRng::seed_from_u64(500 + seed),
        };
        let mut c = cluster(5, net);
        let targets: Vec<(PublicKey, SocketAddr)> = c
            .nodes
            .iter()
            .map(|n| (*n.ep.public_key(), n.addr))
            .collect();
        for (i, node) in c.nodes.iter_mut().enumerate() {
            for (j, (pk, addr)) in targets.iter().enumerate() {
                if i != j {
                    node.ep
                        .initiate(c.now, *pk, *addr, 0x10000 * (i as u32 + 1) + j as u32)
                        .unwrap();
                }
            }
        }
        let t0 = c.now;
        c.drive_for(Duration::from_secs(10));
        for i in 0..5 {
            for j in (i + 1)..5 {
                let (pi, pj) = (targets[i].0, targets[j].0);
                let si: Vec<&Session> = c.nodes[i]
                    .established()
                    .into_iter()
                    .filter(|s| s.peer == pj)
                    .collect();
                let sj: Vec<&Session> = c.nodes[j]
                    .established()
                    .into_iter()
                    .filter(|s| s.peer == pi)
                    .collect();
                assert_eq!((si.len(), sj.len()), (1, 1), "seed {seed}: pair {i}-{j}");
                assert_halves(si[0], sj[0]);
                assert!(si[0].established_at - t0 < Duration::from_secs(10));
                let lower_is_initiator = if pi < pj {
                    Role::Initiator
                } else {
                    Role::Responder
                };
                assert_eq!(si[0].role, lower_is_initiator, "seed {seed}: pair {i}-{j}");
            }
        }
        for n in &c.nodes {
            assert_eq!(n.failed(), 0, "seed {seed}");
            assert_eq!(
                n.ctx.allocs, 0,
                "seed {seed}: every responder reused its initiation's SPI"
            );
        }
    }
}

#[test]
fn held_back_initiation_is_stale_after_a_completed_handshake() {
    // An attacker captures B's initiation to A and suppresses it. A then completes a handshake
    // with B as initiator. Replaying the captured initiation must not create a session on A
    // (it would replace the live one with keys B does not use).
    let mut p = pair(Net::perfect());
    let (pa, pb, aaddr, baddr) = (p.pa(), p.pb(), p.nodes[A].addr, p.nodes[B].addr);
    p.filter = Some(Box::new(|_: &Packet| Verdict::Drop));
    p.nodes[B].ep.initiate(p.now, pa, aaddr, 0xb001).unwrap();
    p.collect();
    let captured = p.capture.last().unwrap().clone();
    assert_eq!(p.nodes[B].ep.cancel(&pa), Some(0xb001));
    p.filter = None;
    p.advance(Duration::from_secs(1));
    p.nodes[A].ep.initiate(p.now, pb, baddr, 0xa001).unwrap();
    p.drive_for(Duration::from_secs(2));
    assert_eq!(p.nodes[A].established().len(), 1);
    assert_eq!(p.deliver_result(&captured), Some(Err(Rejected::Replayed)));
    assert_eq!(p.nodes[A].established().len(), 1);
    // B's fresh initiations are still welcome.
    p.nodes[B].ep.initiate(p.now, pa, aaddr, 0xb002).unwrap();
    p.drive_for(Duration::from_secs(2));
    assert_eq!(p.nodes[A].established().len(), 2);
    assert_halves(p.nodes[A].established()[1], p.nodes[B].established()[1]);
}
