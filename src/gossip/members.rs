//! The membership view: what `meshsec members` shows, computed as a pure
//! function of what chitchat knows plus when each node was last heard.
//!
//! Chitchat keys nodes by (name, generation, address); a restarted node is a
//! new generation while the old one lingers as dead until garbage collection.
//! The view shows each *name* once: its newest generation.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::schema::NodeInfo;
use crate::handshake::PublicKey;

/// A node's liveness as the operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Heartbeats arrive.
    Alive,
    /// Still considered live, but not heard from for a while (or just discovered).
    Suspect,
    /// The failure detector gave up on it.
    Dead,
    /// It announced a graceful leave.
    Left,
}

impl std::fmt::Display for MemberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Dead => "dead",
            MemberState::Left => "left",
        })
    }
}

/// One member as gossip knows it, typed (the control API's listing row adds
/// the display forms and the mesh's links: `control::MemberRow`).
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// Node name (unique in the cluster).
    pub name: String,
    /// Address used for gossip.
    pub gossip_addr: SocketAddr,
    /// Published data-plane addresses.
    pub data_addrs: Vec<IpAddr>,
    /// Liveness.
    pub state: MemberState,
    /// Static public key, or `None` if it published none (yet).
    pub public_key: Option<PublicKey>,
    /// Generation (start time of that agent, ms since the epoch).
    pub generation: u64,
    /// Handshake UDP port.
    pub handshake_port: Option<u16>,
    /// Protocol version it speaks.
    pub protocol: Option<u32>,
    /// Milliseconds since its heartbeat last advanced (0 for this node).
    pub last_heard_ms: u64,
    /// Whether this row is the local node.
    pub is_self: bool,
}

/// What the agent read out of chitchat about one node (one generation).
#[derive(Debug, Clone)]
pub struct Observed {
    /// Node name.
    pub name: String,
    /// Generation.
    pub generation: u64,
    /// Gossip address.
    pub gossip_addr: SocketAddr,
    /// The node's key-values.
    pub key_values: BTreeMap<String, String>,
    /// Its current heartbeat.
    pub heartbeat: u64,
    /// Chitchat considers it live.
    pub live: bool,
    /// Chitchat considers it dead.
    pub dead: bool,
}

/// The longest node name, in bytes (a DNS label's limit).
pub const MAX_NAME_LEN: usize = 63;

/// The one rule for node names: 1-63 characters of ASCII letters, digits,
/// '-', '_' or '.'. `--node-name` must follow it, so a real agent never
/// publishes anything else; a name from gossip that breaks it (terminal
/// escapes, control characters, unbounded length) is never shown or linked.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// How many distinct node names in `observed` break [`valid_name`]: the
/// members [`view`] refuses (counted in `meshsec status`).
pub fn refused_names(observed: &[Observed]) -> usize {
    observed
        .iter()
        .filter(|o| !valid_name(&o.name))
        .map(|o| o.name.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// Remembers when each node's heartbeat last advanced, so "last heard" and
/// "suspect" need no clock inside chitchat.
#[derive(Debug, Default)]
pub struct HeardTracker {
    last: HashMap<(String, u64), (u64, Instant)>,
}

impl HeardTracker {
    /// Records this round's heartbeats and returns, per (name, generation),
    /// the instant the heartbeat last advanced.
    pub fn observe(
        &mut self,
        observed: &[Observed],
        now: Instant,
    ) -> HashMap<(String, u64), Instant> {
        let mut out = HashMap::new();
        let mut next = HashMap::new();
        for o in observed {
            let key = (o.name.clone(), o.generation);
            let at = match self.last.get(&key) {
                Some(&(hb, at)) if hb == o.heartbeat => at,
                _ => now,
            };
            next.insert(key.clone(), (o.heartbeat, at));
            out.insert(key, at);
        }
        // Forgetting what chitchat forgot keeps this bounded by the cluster size.
        self.last = next;
        out
    }
}

/// Computes the view: one row per node name (newest generation), sorted by
/// name. Nodes whose name breaks [`valid_name`] are left out
/// ([`refused_names`] counts them).
pub fn view(
    observed: &[Observed],
    heard: &HashMap<(String, u64), Instant>,
    self_name: &str,
    now: Instant,
    suspect_after: Duration,
) -> Vec<Member> {
    // A restarted node's new generation can be known before its key-values
    // arrive; until it has published its key, the previous generation (whose
    // links carry traffic) stays the one shown.
    let rank = |o: &Observed| {
        (
            o.key_values.contains_key(super::schema::KEY_PUBKEY),
            o.generation,
        )
    };
    let mut newest: BTreeMap<&str, &Observed> = BTreeMap::new();
    for o in observed.iter().filter(|o| valid_name(&o.name)) {
        match newest.get(o.name.as_str()) {
            Some(prev) if rank(prev) >= rank(o) => {}
            _ => {
                newest.insert(&o.name, o);
            }
        }
    }
    newest
        .into_values()
        .map(|o| {
            let info = NodeInfo::from_key_values(&o.key_values);
            let is_self = o.name == self_name;
            let since = heard
                .get(&(o.name.clone(), o.generation))
                .map(|at| now.saturating_duration_since(*at))
                .unwrap_or_default();
            let state = if info.left {
                MemberState::Left
            } else if is_self {
                MemberState::Alive
            } else if o.dead && since > suspect_after {
                // Chitchat also reports nodes it has just discovered as dead
                // until their first heartbeat; only silence makes them dead.
                MemberState::Dead
            } else if o.live && since <= suspect_after {
                MemberState::Alive
            } else {
                MemberState::Suspect
            };
            Member {
                name: o.name.clone(),
                gossip_addr: o.gossip_addr,
                data_addrs: info.data_addrs.clone(),
                state,
                public_key: info.public_key,
                generation: o.generation,
                handshake_port: info.handshake_port,
                protocol: info.protocol,
                last_heard_ms: if is_self { 0 } else { since.as_millis() as u64 },
                is_self,
            }
        })
        .collect()
}

/// A change between two views, one log line each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Node name.
    pub name: String,
    /// Previous state (`None`: newly seen).
    pub from: Option<MemberState>,
    /// New state (`None`: forgotten).
    pub to: Option<MemberState>,
    /// Generation after the change.
    pub generation: u64,
    /// True when the node restarted (its generation grew).
    pub restarted: bool,
}

/// Changes in state, generation or presence between two views.
pub fn diff(old: &[Member], new: &[Member]) -> Vec<Change> {
    let old_by: HashMap<&str, &Member> = old.iter().map(|m| (m.name.as_str(), m)).collect();
    let new_by: HashMap<&str, &Member> = new.iter().map(|m| (m.name.as_str(), m)).collect();
    let mut changes = Vec::new();
    for m in new {
        match old_by.get(m.name.as_str()) {
            None => changes.push(Change {
                name: m.name.clone(),
                from: None,
                to: Some(m.state),
                generation: m.generation,
                restarted: false,
            }),
            Some(prev) if prev.state != m.state || prev.generation != m.generation => {
                changes.push(Change {
                    name: m.name.clone(),
                    from: Some(prev.state),
                    to: Some(m.state),
                    generation: m.generation,
                    restarted: m.generation > prev.generation,
                })
            }
            Some(_) => {}
        }
    }
    for m in old {
        if !new_by.contains_key(m.name.as_str()) {
            changes.push(Change {
                name: m.name.clone(),
                from: Some(m.state),
                to: None,
                generation: m.generation,
                restarted: false,
            });
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gossip::schema::NodeInfo;

    fn obs(name: &str, gen: u64, hb: u64, live: bool, dead: bool, left: bool) -> Observed {
        let info = NodeInfo {
            public_key: Some([gen as u8; 32]),
            data_addrs: vec!["192.0.2.1".parse().unwrap()],
            handshake_port: Some(9341),
            protocol: Some(1),
            left,
        };
        Observed {
            name: name.into(),
            generation: gen,
            gossip_addr: "192.0.2.1:9340".parse().unwrap(),
            key_values: info.to_key_values().into_iter().collect(),
            heartbeat: hb,
            live,
            dead,
        }
    }

    #[test]
    fn restarted_node_is_listed_once_with_newest_generation() {
        let now = Instant::now();
        let o = vec![
            obs("b", 1, 10, false, true, false),
            obs("b", 2, 3, true, false, false),
            obs("a", 5, 1, true, false, false),
        ];
        let mut t = HeardTracker::default();
        let heard = t.observe(&o, now);
        let v = view(&o, &heard, "a", now, Duration::from_secs(4));
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].name, "b");
        assert_eq!(v[1].generation, 2);
        assert_eq!(v[1].state, MemberState::Alive);
        assert!(v[0].is_self);
    }

    #[test]
    fn new_generation_without_key_values_does_not_hide_the_old_one() {
        let now = Instant::now();
        let mut fresh = obs("b", 2, 1, true, false, false);
        fresh.key_values.clear();
        let o = vec![obs("b", 1, 10, true, false, false), fresh];
        let heard = HeardTracker::default().observe(&o, now);
        let v = view(&o, &heard, "a", now, Duration::from_secs(4));
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].generation, 1);
        assert!(v[0].public_key.is_some());
    }

    #[test]
    fn silent_live_node_becomes_suspect_then_dead() {
        let t0 = Instant::now();
        let mut t = HeardTracker::default();
        let o = vec![obs("b", 1, 10, true, false, false)];
        let heard = t.observe(&o, t0);
        assert_eq!(
            view(&o, &heard, "a", t0, Duration::from_secs(4))[0].state,
            MemberState::Alive
        );
        // Same heartbeat 5 s later: last heard does not move.
        let t1 = t0 + Duration::from_secs(5);
        let heard = t.observe(&o, t1);
        let v = view(&o, &heard, "a", t1, Duration::from_secs(4));
        assert_eq!(v[0].state, MemberState::Suspect);
        assert_eq!(v[0].last_heard_ms, 5000);
        // Freshly discovered nodes are reported dead by chitchat: not dead to us yet.
        let fresh = vec![obs("c", 1, 1, false, true, false)];
        let heard_fresh = HeardTracker::default().observe(&fresh, t1);
        assert_eq!(
            view(&fresh, &heard_fresh, "a", t1, Duration::from_secs(4))[0].state,
            MemberState::Suspect
        );
        let o_dead = vec![obs("b", 1, 10, false, true, false)];
        let heard = t.observe(&o_dead, t1);
        assert_eq!(
            view(&o_dead, &heard, "a", t1, Duration::from_secs(4))[0].state,
            MemberState::Dead
        );
        // A heartbeat that advances resets last heard.
        let o2 = vec![obs("b", 1, 11, true, false, false)];
        let heard = t.observe(&o2, t1);
        assert_eq!(
            view(&o2, &heard, "a", t1, Duration::from_secs(4))[0].last_heard_ms,
            0
        );
    }

    #[test]
    fn names_breaking_the_rule_are_refused_and_counted() {
        let now = Instant::now();
        let long = "x".repeat(MAX_NAME_LEN + 1);
        let o = vec![
            obs("b", 1, 10, true, false, false),
            obs("evil\u{1b}]0;pwned\u{7}", 1, 10, true, false, false),
            obs("evil\u{1b}]0;pwned\u{7}", 2, 10, true, false, false),
            obs("sp ace", 1, 10, true, false, false),
            obs("", 1, 10, true, false, false),
            obs(&long, 1, 10, true, false, false),
            obs(&"y".repeat(MAX_NAME_LEN), 1, 10, true, false, false),
        ];
        let heard = HeardTracker::default().observe(&o, now);
        let v = view(&o, &heard, "a", now, Duration::from_secs(4));
        let names: Vec<&str> = v.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, vec!["b", "y".repeat(MAX_NAME_LEN).as_str()]);
        assert_eq!(refused_names(&o), 4);
        assert!(valid_name("host-1.example_a"));
        assert!(!valid_name("h\u{e9}te"));
    }

    #[test]
    fn left_wins_over_liveness() {
        let now = Instant::now();
        let o = vec![obs("b", 1, 10, true, false, true)];
        let heard = HeardTracker::default().observe(&o, now);
        assert_eq!(
            view(&o, &heard, "a", now, Duration::from_secs(4))[0].state,
            MemberState::Left
        );
    }

    #[test]
    fn diff_reports_joins_state_changes_restarts_and_forgets() {
        let now = Instant::now();
        let heard = HashMap::new();
        let v1 = view(
            &[obs("b", 1, 1, true, false, false)],
            &heard,
            "a",
            now,
            Duration::from_secs(99),
        );
        let v2 = view(
            &[
                obs("b", 1, 1, false, true, false),
                obs("c", 1, 1, true, false, false),
            ],
            &heard,
            "a",
            now,
            Duration::from_secs(99),
        );
        let d = diff(&v1, &v2);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].to, Some(MemberState::Suspect));
        assert_eq!(d[1].from, None);
        let v3 = view(
            &[obs("b", 2, 1, true, false, false)],
            &heard,
            "a",
            now,
            Duration::from_secs(99),
        );
        let d = diff(&v2, &v3);
        assert!(d
            .iter()
            .any(|c| c.name == "b" && c.restarted && c.to == Some(MemberState::Alive)));
        assert!(d.iter().any(|c| c.name == "c" && c.to.is_none()));
        assert!(diff(&v3, &v3).is_empty());
    }
}
