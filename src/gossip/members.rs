//! The membership view: what `meshsec members` shows, computed as a pure
//! function of what chitchat knows plus when each node was last heard.
//!
//! Chitchat keys nodes by (name, generation, address); a restarted node is a
//! new generation while the old one lingers as dead until garbage collection.
//! The view shows each *name* once: its newest generation whose record is
//! validly signed (proto/records.md; [`super::records`] judges the records).
//! A record that does not verify never counts: it gives the mesh no key, no
//! addresses, no handshake port, and cannot make a member `left`.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::records::SignedRecord;
use crate::handshake::PublicKey;
use crate::identity::SigningPublicKey;

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
    /// Static public key, or `None` if it published none (yet) or its
    /// record is not validly signed.
    pub public_key: Option<PublicKey>,
    /// The Ed25519 key that signed the record shown, or `None` if no record
    /// of this generation verified (yet).
    pub signing_key: Option<SigningPublicKey>,
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
    /// Chitchat's version of each of those key-values (a record whose
    /// values are newer than its signature is still arriving).
    pub versions: BTreeMap<String, u64>,
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

/// Computes the view: one row per node name (newest validly signed
/// generation), sorted by name. `records` holds the valid records
/// ([`super::records::RecordTracker::observe`]); every other record reads
/// as if nothing was published. Nodes whose name breaks [`valid_name`] are
/// left out ([`refused_names`] counts them).
pub fn view(
    observed: &[Observed],
    heard: &HashMap<(String, u64), Instant>,
    records: &HashMap<(String, u64), SignedRecord>,
    self_name: &str,
    now: Instant,
    suspect_after: Duration,
) -> Vec<Member> {
    let record = |o: &Observed| records.get(&(o.name.clone(), o.generation));
    // A restarted node's new generation can be known before its signed
    // record arrives; until then, the previous generation (whose links carry
    // traffic) stays the one shown.
    let rank = |o: &Observed| {
        (
            record(o).is_some_and(|r| r.info.public_key.is_some()),
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
            let signed = record(o);
            let info = signed.map(|r| r.info.clone()).unwrap_or_default();
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
                signing_key: signed.map(|r| r.signing_key),
                generation: o.generation,
                handshake_port: info.handshake_port,
                protocol: info.protocol,
                last_heard_ms: if is_self { 0 } else { since.as_millis() as u64 },
                is_self,
            }
        })
        .collect()
}

/// Whether two views differ in nothing but last-heard times: the mesh and
/// the service status need no new view then (the listing reads the newest
/// one on demand).
pub fn same_but_heard(a: &[Member], b: &[Member]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same_member_but_heard(x, y))
}

fn same_member_but_heard(a: &Member, b: &Member) -> bool {
    // Destructured, so a new field must be placed on one side or the other.
    let Member {
        name,
        gossip_addr,
        data_addrs,
        state,
        public_key,
        signing_key,
        generation,
        handshake_port,
        protocol,
        last_heard_ms: _,
        is_self,
    } = a;
    *name == b.name
        && *gossip_addr == b.gossip_addr
        && *data_addrs == b.data_addrs
        && *state == b.state
        && *public_key == b.public_key
        && *signing_key == b.signing_key
        && *generation == b.generation
        && *handshake_port == b.handshake_port
        && *protocol == b.protocol
        && *is_self == b.is_self
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

impl Change {
    /// The previous state as shown in logs and `members --watch` ("new" when newly seen).
    pub fn from_text(&self) -> String {
        self.from.map_or_else(|| "new".into(), |s| s.to_string())
    }

    /// The new state as shown in logs and `members --watch` ("forgotten" when gone).
    pub fn to_text(&self) -> String {
        self.to
            .map_or_else(|| "forgotten".into(), |s| s.to_string())
    }
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
pub(crate) mod tests {
    use super::*;
    use crate::gossip::records::{signed_key_values, RecordTracker};
    use crate::gossip::schema::{NodeInfo, KEY_DATA_ADDRS, KEY_STATUS};
    use crate::identity::SigningKey;

    /// An observed record holding `kv`, chitchat versions in that order.
    pub(crate) fn observed_from(name: &str, gen: u64, kv: &[(String, String)]) -> Observed {
        let mut o = Observed {
            name: name.into(),
            generation: gen,
            gossip_addr: "192.0.2.1:9340".parse().unwrap(),
            key_values: BTreeMap::new(),
            versions: BTreeMap::new(),
            heartbeat: 1,
            live: true,
            dead: false,
        };
        for (n, (k, v)) in kv.iter().enumerate() {
            o.key_values.insert(k.clone(), v.clone());
            o.versions.insert(k.clone(), n as u64 + 1);
        }
        o
    }

    /// A validly signed record of `name`/`gen` with Noise key `noise`.
    pub(crate) fn signed_obs(
        name: &str,
        gen: u64,
        key: &SigningKey,
        noise: [u8; 32],
        left: bool,
    ) -> Observed {
        let info = NodeInfo {
            public_key: Some(noise),
            data_addrs: vec!["192.0.2.1".parse().unwrap()],
            handshake_port: Some(9341),
            protocol: Some(1),
            left,
        };
        observed_from(name, gen, &signed_key_values(&info, name, gen, key))
    }

    /// A node's signing key in these tests, one per name.
    fn key_of(name: &str) -> SigningKey {
        use sha2::Digest;
        SigningKey::from_seed(sha2::Sha256::digest(name.as_bytes()).into())
    }

    /// Sets `key` to `value` as a newer chitchat version (what anyone holding
    /// the cluster secret can do to any node's state).
    fn overwrite(o: &mut Observed, key: &str, value: &str) {
        let top = o.versions.values().copied().max().unwrap_or(0);
        o.key_values.insert(key.into(), value.into());
        o.versions.insert(key.into(), top + 1);
    }

    /// The view as node "a" sees it, with these valid records, nothing heard.
    fn view_of(
        o: &[Observed],
        records: &HashMap<(String, u64), crate::gossip::records::SignedRecord>,
        now: Instant,
    ) -> Vec<Member> {
        super::view(
            o,
            &HashMap::new(),
            records,
            "a",
            now,
            Duration::from_secs(4),
        )
    }

    /// A member whose record does not count: no key, addresses or port.
    fn gives_the_mesh_nothing(m: &Member) {
        assert_eq!(m.public_key, None);
        assert!(m.data_addrs.is_empty());
        assert_eq!(m.handshake_port, None);
        assert_eq!(m.signing_key, None);
        assert_ne!(m.state, MemberState::Left);
    }

    fn view(
        o: &[Observed],
        heard: &HashMap<(String, u64), Instant>,
        me: &str,
        now: Instant,
        suspect_after: Duration,
    ) -> Vec<Member> {
        let records = RecordTracker::default().observe(o, now).valid;
        super::view(o, heard, &records, me, now, suspect_after)
    }

    fn obs(name: &str, gen: u64, hb: u64, live: bool, dead: bool, left: bool) -> Observed {
        Observed {
            heartbeat: hb,
            live,
            dead,
            ..signed_obs(name, gen, &key_of(name), [gen as u8; 32], left)
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
    fn valid_signed_record_round_trips_into_the_view() {
        let now = Instant::now();
        let o = vec![obs("b", 3, 1, true, false, false)];
        let v = view(&o, &HashMap::new(), "a", now, Duration::from_secs(4));
        assert_eq!(v[0].public_key, Some([3; 32]));
        assert_eq!(v[0].signing_key, Some(key_of("b").public()));
        assert_eq!(
            v[0].data_addrs,
            vec!["192.0.2.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(v[0].handshake_port, Some(9341));
        assert_eq!(v[0].protocol, Some(1));
    }

    #[test]
    fn forged_record_under_a_members_name_is_not_used() {
        let now = Instant::now();
        let real = obs("b", 1, 10, true, false, false);
        let forger = SigningKey::from_seed([0x66; 32]);
        let forged_info = NodeInfo {
            public_key: Some([0x66; 32]),
            data_addrs: vec!["198.51.100.66".parse().unwrap()],
            handshake_port: Some(6666),
            protocol: Some(1),
            left: false,
        };
        // Higher generation, another Noise key and addresses, claiming b's
        // signing key: signed by the forger's key, or replaying b's signature.
        let mut signed_by_forger = signed_key_values(&forged_info, "b", 2, &forger);
        signed_by_forger[5].1 = crate::identity::encode_public(key_of("b").public().as_bytes());
        let mut replayed = signed_key_values(&forged_info, "b", 2, &forger);
        replayed[5].1 = real.key_values[crate::gossip::schema::KEY_SIGNING_KEY].clone();
        replayed[6].1 = real.key_values[crate::gossip::schema::KEY_SIGNATURE].clone();
        for forged in [signed_by_forger, replayed] {
            let o = vec![real.clone(), observed_from("b", 2, &forged)];
            let mut tracker = RecordTracker::default();
            let records = tracker.observe(&o, now);
            assert_eq!(records.counters.records_bad_signature, 1);
            let v = view_of(&o, &records.valid, now);
            assert_eq!(v.len(), 1);
            assert_eq!(v[0].generation, 1);
            assert_eq!(v[0].public_key, Some([1; 32]));
            assert_eq!(
                v[0].data_addrs,
                vec!["192.0.2.1".parse::<IpAddr>().unwrap()]
            );
            assert_eq!(v[0].handshake_port, Some(9341));
            // Alone, the forged generation gives the mesh nothing.
            let alone = vec![observed_from("b", 2, &forged)];
            gives_the_mesh_nothing(
                &view(&alone, &HashMap::new(), "a", now, Duration::from_secs(4))[0],
            );
        }
    }

    /// Finding 1 (impersonation by name): an impostor holding the secret
    /// signs a record under b's name with its own identity and a higher
    /// generation. Signed records alone accept it (a valid signature, a
    /// newer generation: a restart); with b's identity pinned it is refused
    /// and the view keeps the real b.
    #[test]
    fn an_impostor_under_a_pinned_name_is_refused() {
        let now = Instant::now();
        let real = obs("b", 1, 10, true, false, false);
        let impostor_info = NodeInfo {
            public_key: Some([0x66; 32]),
            data_addrs: vec!["198.51.100.66".parse().unwrap()],
            handshake_port: Some(6666),
            protocol: Some(1),
            left: false,
        };
        let impostor =
            signed_key_values(&impostor_info, "b", 2, &SigningKey::from_seed([0x66; 32]));
        let mut pins = crate::gossip::pins::Pins::in_memory();
        // b is seen (and pinned) first.
        let first = vec![real.clone()];
        let mut valid = RecordTracker::default().observe(&first, now).valid;
        assert!(pins.apply(&mut valid).is_empty());
        // Then the impostor's validly signed, newer record arrives.
        let o = vec![real.clone(), observed_from("b", 2, &impostor)];
        let mut valid = RecordTracker::default().observe(&o, now).valid;
        assert_eq!(valid.len(), 2, "both signatures verify");
        let unpinned = view_of(&o, &valid, now);
        assert_eq!(
            unpinned[0].public_key,
            Some([0x66; 32]),
            "without pins the impostor wins"
        );
        let conflicts = pins.apply(&mut valid);
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].generation, 2);
        let v = view_of(&o, &valid, now);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].generation, 1);
        assert_eq!(v[0].public_key, Some([1; 32]));
        // The impostor alone (the real b gone from gossip) gives the mesh nothing.
        let alone = vec![observed_from("b", 2, &impostor)];
        let mut valid = RecordTracker::default().observe(&alone, now).valid;
        assert_eq!(pins.apply(&mut valid).len(), 1);
        gives_the_mesh_nothing(&view_of(&alone, &valid, now)[0]);
    }

    #[test]
    fn forged_left_does_not_make_a_member_left() {
        let now = Instant::now();
        let real = obs("b", 1, 10, true, false, false);
        let forger = SigningKey::from_seed([0x66; 32]);
        // status=left written over b's record, with b's old signature, with
        // a garbage one, or with a signature by another key.
        let mut just_status = real.clone();
        overwrite(&mut just_status, KEY_STATUS, "left");
        let mut old_sig = just_status.clone();
        let sig = old_sig.key_values[crate::gossip::schema::KEY_SIGNATURE].clone();
        overwrite(&mut old_sig, crate::gossip::schema::KEY_SIGNATURE, &sig);
        let mut garbage = just_status.clone();
        overwrite(&mut garbage, crate::gossip::schema::KEY_SIGNATURE, "AAAA");
        let mut other_key = just_status.clone();
        let left_info = NodeInfo::from_key_values(&just_status.key_values);
        let by_forger = signed_key_values(&left_info, "b", 1, &forger);
        overwrite(
            &mut other_key,
            crate::gossip::schema::KEY_SIGNATURE,
            &by_forger[6].1,
        );
        for forged in [just_status, old_sig, garbage, other_key] {
            // Whether or not this node saw b's valid record first.
            let mut tracker = RecordTracker::default();
            tracker.observe(std::slice::from_ref(&real), now);
            for records in [
                tracker.observe(std::slice::from_ref(&forged), now),
                RecordTracker::default().observe(std::slice::from_ref(&forged), now),
            ] {
                let v = view_of(std::slice::from_ref(&forged), &records.valid, now);
                assert_ne!(v[0].state, MemberState::Left);
            }
        }
        // Signed by b itself, it counts.
        let left = obs("b", 1, 10, true, false, true);
        let v = view(&[left], &HashMap::new(), "a", now, Duration::from_secs(4));
        assert_eq!(v[0].state, MemberState::Left);
    }

    #[test]
    fn tampered_value_makes_the_record_not_count() {
        let now = Instant::now();
        let mut o = obs("b", 1, 10, true, false, false);
        // Changed after signing, in place (no newer version than the signature).
        o.key_values
            .insert(KEY_DATA_ADDRS.into(), "198.51.100.66".into());
        let records = RecordTracker::default().observe(std::slice::from_ref(&o), now);
        assert_eq!(records.counters.records_bad_signature, 1);
        let v = view_of(&[o], &records.valid, now);
        gives_the_mesh_nothing(&v[0]);
    }

    #[test]
    fn half_arrived_new_generation_is_incomplete_and_keeps_the_old_one() {
        let now = Instant::now();
        let key = key_of("b");
        let info = NodeInfo::from_key_values(&obs("b", 2, 1, true, false, false).key_values);
        let published = signed_key_values(&info, "b", 2, &key);
        // Everything but the signature has arrived.
        let half = observed_from("b", 2, &published[..published.len() - 1]);
        let o = vec![obs("b", 1, 10, true, false, false), half];
        let records = RecordTracker::default().observe(&o, now);
        assert_eq!(records.counters.records_incomplete, 1);
        assert_eq!(records.counters.records_bad_signature, 0);
        let v = view_of(&o, &records.valid, now);
        assert_eq!(v[0].generation, 1);
        assert_eq!(v[0].public_key, Some([1; 32]));
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

    #[test]
    fn views_differing_in_last_heard_only_are_the_same_to_the_mesh() {
        let m = Member {
            name: "a".into(),
            gossip_addr: "192.0.2.1:9340".parse().unwrap(),
            data_addrs: vec!["192.0.2.1".parse().unwrap()],
            state: MemberState::Alive,
            public_key: Some([1; 32]),
            signing_key: None,
            generation: 1,
            handshake_port: Some(9341),
            protocol: Some(1),
            last_heard_ms: 100,
            is_self: false,
        };
        let heard = Member {
            last_heard_ms: 350,
            ..m.clone()
        };
        assert!(same_but_heard(std::slice::from_ref(&m), &[heard]));
        let changed = [
            Member {
                state: MemberState::Suspect,
                ..m.clone()
            },
            Member {
                generation: 2,
                ..m.clone()
            },
            Member {
                data_addrs: vec![],
                ..m.clone()
            },
            Member {
                public_key: Some([2; 32]),
                ..m.clone()
            },
        ];
        for c in changed {
            assert!(
                !same_but_heard(std::slice::from_ref(&m), std::slice::from_ref(&c)),
                "{c:?}"
            );
        }
        assert!(!same_but_heard(
            std::slice::from_ref(&m),
            &[m.clone(), m.clone()]
        ));
        assert!(!same_but_heard(std::slice::from_ref(&m), &[]));
    }
}
