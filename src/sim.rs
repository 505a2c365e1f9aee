//! Sans-IO simulation harness for tests (in the spirit of quinn-proto's tests/util.rs `Pair`).
//!
//! A [`Sim`] owns any number of [`SimNode`]s on one virtual network with a virtual clock.
//! [`Sim::drive_for`] jumps the clock to the earliest of the next in-flight datagram and the
//! nodes' [`SimNode::poll_timeout`], delivers or fires it, and moves whatever the nodes want
//! to send into the network. The network loses, duplicates and delays datagrams (a uniform
//! delay, which also reorders them), an optional test filter can pass, drop or hold back each
//! one, and every datagram sent is captured as sent (for replay tests).
//!
//! Addresses are only labels here: nothing is sent on any socket.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A sans-IO protocol participant the harness can drive.
pub(crate) trait SimNode {
    /// True if datagrams to `addr` are delivered to this node.
    fn owns(&self, addr: SocketAddr) -> bool;
    /// A datagram arrived (from, to = one of ours).
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, to: SocketAddr, bytes: &[u8]);
    /// The next datagram this node wants sent: (from, to, bytes).
    fn poll_transmit(&mut self, now: Instant) -> Option<(SocketAddr, SocketAddr, Vec<u8>)>;
    /// When the node next wants handle_timeout; None = no timer.
    fn poll_timeout(&self) -> Option<Instant>;
    /// Timers due at `now` fire.
    fn handle_timeout(&mut self, now: Instant);
}

/// One datagram: in flight (`at` = arrival time) or captured (`at` = send time).
#[derive(Clone, Debug)]
pub(crate) struct Packet {
    pub at: Instant,
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

/// Network behaviour. Delays are uniform in [min_delay, max_delay], which also reorders.
pub(crate) struct Net {
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Probability that a datagram (not lost) arrives twice, each copy with its own delay.
    pub dup: f64,
    pub min_delay: Duration,
    pub max_delay: Duration,
    pub rng: StdRng,
}

impl Net {
    /// No loss, no duplication, a fixed 10 ms delay.
    pub fn perfect() -> Self {
        Net {
            loss: 0.0,
            dup: 0.0,
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(10),
            rng: StdRng::seed_from_u64(0),
        }
    }

    /// `loss` and `dup` probabilities, delays uniform in `delay`, seeded.
    pub fn lossy(loss: f64, dup: f64, delay: (Duration, Duration), seed: u64) -> Self {
        Net {
            loss,
            dup,
            min_delay: delay.0,
            max_delay: delay.1,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn delay(&mut self) -> Duration {
        if self.max_delay <= self.min_delay {
            return self.min_delay;
        }
        let span = (self.max_delay - self.min_delay).as_micros() as u64;
        self.min_delay + Duration::from_micros(self.rng.gen_range(0..=span))
    }
}

/// What a test filter does with a datagram about to enter the network.
pub(crate) enum Verdict {
    Pass,
    Drop,
    /// Extra delay on top of the network's.
    Delay(Duration),
}

/// A test filter, called on every datagram sent (after it is captured).
pub(crate) type Filter = Box<dyn FnMut(&Packet) -> Verdict>;

/// How many times in a row a node may stay due at one instant after `handle_timeout`.
const MAX_SPINS: u32 = 1000;

/// Nodes on one virtual network, with a virtual clock.
pub(crate) struct Sim<N: SimNode> {
    pub now: Instant,
    pub nodes: Vec<N>,
    pub net: Net,
    pub in_flight: Vec<Packet>,
    /// Every datagram any node sent, as sent (before filter and network).
    pub capture: Vec<Packet>,
    pub filter: Option<Filter>,
    /// (instant, node, count): a node still due after `handle_timeout` at that instant.
    spin: (Instant, usize, u32),
}

impl<N: SimNode> Sim<N> {
    /// The clock starts at `Instant::now()` (set `now` to start elsewhere).
    pub fn new(nodes: Vec<N>, net: Net) -> Self {
        let now = Instant::now();
        Sim {
            now,
            nodes,
            net,
            in_flight: vec![],
            capture: vec![],
            filter: None,
            spin: (now, 0, 0),
        }
    }

    /// Index of the node that owns `addr`.
    pub fn owner(&self, addr: SocketAddr) -> Option<usize> {
        self.nodes.iter().position(|n| n.owns(addr))
    }

    /// Sends `p` into the network as if a node had: capture, filter, loss, duplication, delay
    /// (from `self.now`; `p.at` is ignored).
    pub fn send(&mut self, p: Packet) {
        let p = Packet { at: self.now, ..p };
        self.capture.push(p.clone());
        let mut extra = Duration::ZERO;
        if let Some(f) = self.filter.as_mut() {
            match f(&p) {
                Verdict::Pass => {}
                Verdict::Drop => return,
                Verdict::Delay(d) => extra = d,
            }
        }
        if self.net.rng.gen_bool(self.net.loss) {
            return;
        }
        let copies = if self.net.rng.gen_bool(self.net.dup) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = self.now + self.net.delay() + extra;
            self.in_flight.push(Packet { at, ..p.clone() });
        }
    }

    /// Moves everything the nodes want to send into the network.
    pub fn collect(&mut self) {
        for i in 0..self.nodes.len() {
            while let Some((from, to, bytes)) = self.nodes[i].poll_transmit(self.now) {
                self.send(Packet {
                    at: self.now,
                    from,
                    to,
                    bytes,
                });
            }
        }
    }

    /// Delivers one datagram now to the node that owns `p.to` (false: nobody does), then
    /// collects what the nodes send.
    pub fn deliver(&mut self, p: &Packet) -> bool {
        let Some(i) = self.owner(p.to) else {
            return false;
        };
        self.nodes[i].handle_datagram(self.now, p.from, p.to, &p.bytes);
        self.collect();
        true
    }

    /// Runs the virtual clock until nothing is pending or `limit` has elapsed; the clock then
    /// stands at the end of `limit`.
    pub fn drive_for(&mut self, limit: Duration) {
        let end = self.now + limit;
        self.collect();
        loop {
            let next_pkt = self.in_flight.iter().map(|p| p.at).min();
            let next_timer = self.nodes.iter().filter_map(|n| n.poll_timeout()).min();
            let Some(next) = [next_pkt, next_timer].into_iter().flatten().min() else {
                break;
            };
            if next > end {
                break;
            }
            self.now = self.now.max(next);
            if next_pkt == Some(next) {
                let i = self.in_flight.iter().position(|p| p.at == next).unwrap();
                let p = self.in_flight.swap_remove(i);
                self.deliver(&p);
            } else {
                self.fire_timers();
                self.collect();
            }
        }
        self.now = self.now.max(end);
    }

    /// Calls `handle_timeout(now)` on every node whose timer is due, and panics if one stays
    /// due at the same instant too many times in a row (a real driver would spin).
    fn fire_timers(&mut self) {
        let now = self.now;
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if node.poll_timeout().is_none_or(|t| t > now) {
                continue;
            }
            node.handle_timeout(now);
            let Some(t) = node.poll_timeout().filter(|t| *t <= now) else {
                continue;
            };
            let (at, who, count) = &mut self.spin;
            if (*at, *who) == (now, i) {
                *count += 1;
            } else {
                (*at, *who, *count) = (now, i, 1);
            }
            assert!(
                *count <= MAX_SPINS,
                "spin: node {i}'s poll_timeout() is still {t:?} <= now = {now:?} after \
                 handle_timeout(now) {count} times in a row; a real driver would never sleep"
            );
        }
    }

    /// Moves the clock forward without running anything.
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// Sends a numbered ping to `peer` every `interval` (while `pings_left`), answers every ping
    /// with a pong, and records what it saw.
    struct PingNode {
        addr: SocketAddr,
        peer: SocketAddr,
        interval: Duration,
        next_ping: Option<Instant>,
        pings_left: u32,
        seq: u32,
        outbox: VecDeque<(SocketAddr, Vec<u8>)>,
        fired_at: Vec<Instant>,
        pings_seen: Vec<u32>,
        pongs: u32,
    }

    impl PingNode {
        fn new(addr: &str, peer: &str, start: Instant, pings: u32) -> Self {
            PingNode {
                addr: addr.parse().unwrap(),
                peer: peer.parse().unwrap(),
                interval: Duration::from_millis(250),
                next_ping: (pings > 0).then_some(start + Duration::from_millis(250)),
                pings_left: pings,
                seq: 0,
                outbox: VecDeque::new(),
                fired_at: vec![],
                pings_seen: vec![],
                pongs: 0,
            }
        }
    }

    impl SimNode for PingNode {
        fn owns(&self, addr: SocketAddr) -> bool {
            addr == self.addr
        }
        fn handle_datagram(&mut self, _: Instant, from: SocketAddr, _: SocketAddr, b: &[u8]) {
            match b {
                [b'p', b'i', n @ ..] => {
                    self.pings_seen
                        .push(u32::from_be_bytes(n.try_into().unwrap()));
                    self.outbox.push_back((from, b"po".to_vec()));
                }
                b"po" => self.pongs += 1,
                _ => panic!("unexpected {b:?}"),
            }
        }
        fn poll_transmit(&mut self, _: Instant) -> Option<(SocketAddr, SocketAddr, Vec<u8>)> {
            self.outbox.pop_front().map(|(to, b)| (self.addr, to, b))
        }
        fn poll_timeout(&self) -> Option<Instant> {
            self.next_ping
        }
        fn handle_timeout(&mut self, now: Instant) {
            assert!(self.next_ping.is_some_and(|t| t <= now), "fired early");
            self.fired_at.push(now);
            self.seq += 1;
            let mut ping = b"pi".to_vec();
            ping.extend_from_slice(&self.seq.to_be_bytes());
            self.outbox.push_back((self.peer, ping));
            self.pings_left -= 1;
            self.next_ping = (self.pings_left > 0).then(|| now + self.interval);
        }
    }

    const A: &str = "127.0.0.1:1";
    const B: &str = "127.0.0.2:2";

    fn sim(pings: u32, net: Net) -> Sim<PingNode> {
        let mut s = Sim::new(vec![], net);
        s.nodes = vec![
            PingNode::new(A, B, s.now, pings),
            PingNode::new(B, A, s.now, 0),
        ];
        s
    }

    #[test]
    fn timers_fire_at_the_asked_instant_and_perfect_net_delivers_all() {
        let mut s = sim(4, Net::perfect());
        let t0 = s.now;
        s.drive_for(Duration::from_secs(5));
        let want: Vec<Instant> = (1..=4)
            .map(|k| t0 + Duration::from_millis(250 * k))
            .collect();
        assert_eq!(s.nodes[0].fired_at, want);
        assert_eq!(s.nodes[1].pings_seen, vec![1, 2, 3, 4]);
        assert_eq!(s.nodes[0].pongs, 4);
        assert_eq!(s.capture.len(), 8);
        // The first pong is sent one 10 ms hop after the first ping.
        assert_eq!(s.capture[1].at - s.capture[0].at, Duration::from_millis(10));
        assert_eq!(
            s.now,
            t0 + Duration::from_secs(5),
            "the clock ends at the limit"
        );
        assert!(s.in_flight.is_empty());
    }

    #[test]
    fn drive_for_stops_at_its_limit() {
        let mut s = sim(4, Net::perfect());
        let t0 = s.now;
        s.drive_for(Duration::from_millis(600));
        assert_eq!(s.nodes[0].fired_at.len(), 2);
        s.drive_for(Duration::from_millis(400));
        assert_eq!(s.nodes[0].fired_at.len(), 4);
        assert_eq!(s.nodes[0].fired_at[3], t0 + Duration::from_secs(1));
    }

    #[test]
    fn an_overdue_timer_fires_at_the_current_instant() {
        let mut s = sim(2, Net::perfect());
        let t0 = s.now;
        s.advance(Duration::from_secs(1));
        assert!(s.nodes[0].fired_at.is_empty(), "advance runs nothing");
        s.drive_for(Duration::ZERO);
        assert_eq!(s.nodes[0].fired_at, vec![t0 + Duration::from_secs(1)]);
        assert_eq!(s.capture[0].at, t0 + Duration::from_secs(1));
    }

    #[test]
    fn loss_duplication_and_reordering_happen() {
        let delay = (Duration::from_millis(1), Duration::from_millis(2000));
        let mut s = sim(200, Net::lossy(0.3, 0.3, delay, 1));
        s.drive_for(Duration::from_secs(100));
        let seen = &s.nodes[1].pings_seen;
        let mut unique = seen.clone();
        unique.sort();
        unique.dedup();
        assert!(unique.len() < 190, "lost: {}", unique.len());
        assert!(unique.len() > 100, "{}", unique.len());
        assert!(seen.len() > unique.len(), "duplicated");
        assert!(seen.windows(2).any(|w| w[0] > w[1]), "reordered");
        assert_eq!(s.capture.len(), 200 + seen.len(), "every send captured");
    }

    #[test]
    fn filter_drops_and_delays() {
        let mut s = sim(3, Net::perfect());
        let t0 = s.now;
        s.filter = Some(Box::new(|p: &Packet| match p.bytes.as_slice() {
            [b'p', b'i', .., 2] => Verdict::Drop,
            b"po" => Verdict::Delay(Duration::from_millis(100)),
            _ => Verdict::Pass,
        }));
        s.drive_for(Duration::from_millis(300));
        assert_eq!(s.nodes[0].pongs, 0, "held back");
        s.drive_for(Duration::from_secs(2));
        assert_eq!(s.nodes[1].pings_seen, vec![1, 3]);
        assert_eq!(s.nodes[0].pongs, 2);
        assert_eq!(s.capture.len(), 5, "the dropped ping is still captured");
        let pong = &s.capture[1];
        assert_eq!(pong.at, t0 + Duration::from_millis(260));
    }

    #[test]
    fn deliver_to_an_unknown_address_is_refused() {
        let mut s = sim(0, Net::perfect());
        let p = Packet {
            at: s.now,
            from: A.parse().unwrap(),
            to: "127.0.0.9:9".parse().unwrap(),
            bytes: b"po".to_vec(),
        };
        assert!(!s.deliver(&p));
        assert!(s.deliver(&Packet {
            to: A.parse().unwrap(),
            ..p
        }));
        assert_eq!(s.nodes[0].pongs, 1);
    }

    /// Asks for a wake-up at a fixed instant and never moves it.
    struct Stuck(Instant);

    impl SimNode for Stuck {
        fn owns(&self, _: SocketAddr) -> bool {
            false
        }
        fn handle_datagram(&mut self, _: Instant, _: SocketAddr, _: SocketAddr, _: &[u8]) {}
        fn poll_transmit(&mut self, _: Instant) -> Option<(SocketAddr, SocketAddr, Vec<u8>)> {
            None
        }
        fn poll_timeout(&self) -> Option<Instant> {
            Some(self.0)
        }
        fn handle_timeout(&mut self, _: Instant) {}
    }

    #[test]
    #[should_panic(expected = "spin: node 0's poll_timeout()")]
    fn a_timer_that_never_advances_is_a_spin() {
        let mut s = Sim::new(vec![], Net::perfect());
        s.nodes.push(Stuck(s.now + Duration::from_millis(5)));
        s.drive_for(Duration::from_secs(1));
    }
}
