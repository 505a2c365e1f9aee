//! This node's own record, kept as published. chitchat applies a peer's
//! delta for any node id, this node's own included, so a member holding the
//! cluster secret can write values over ours at newer versions: they would
//! travel on as ours, and (not matching our signature) make our record
//! invalid everywhere, long after that member is evicted. Each view tick
//! compares our state with what we published and writes back what differs,
//! at versions above the forged ones, signature last (see
//! [`super::records::signed_key_values`] for why the order matters).

use chitchat::{DeletionStatus, NodeState};

use super::schema::{KEY_SIGNATURE, KEY_SIGNING_KEY};

/// What [`restore`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    /// Published keys whose value differed (or was missing or deleted).
    pub rewritten: Vec<String>,
    /// Keys we never published, deleted.
    pub removed: Vec<String>,
    /// Nothing could be written back: a forged delta pushed our state's
    /// version so close to `u64::MAX` that the writes would overflow it
    /// (chitchat panics there). Only a restart (new generation, new id)
    /// gets the node a record again.
    pub exhausted: bool,
}

impl Restored {
    /// Whether anything had to be put back.
    pub fn is_empty(&self) -> bool {
        self.rewritten.is_empty() && self.removed.is_empty()
    }
}

/// Whether `writes` more versions fit in `state` (each `set` or `delete`
/// takes the next version; chitchat overflows, and panics, past `u64::MAX`).
pub fn has_room(state: &NodeState, writes: usize) -> bool {
    state.max_version().checked_add(writes as u64).is_some()
}

/// Puts `published` back into our own `state` where it differs, removes
/// keys we never published, and re-writes the signature after the values so
/// that receivers see a complete record again.
pub fn restore(state: &mut NodeState, published: &[(String, String)]) -> Restored {
    let mut out = Restored::default();
    for (k, v) in published {
        // A value marked for deletion after a TTL still reads as set, until
        // the GC removes it everywhere at once: as different as a new value.
        let as_published = state
            .get_versioned(k)
            .is_some_and(|vv| vv.value == *v && matches!(vv.status, DeletionStatus::Set));
        if !as_published {
            out.rewritten.push(k.clone());
        }
    }
    out.removed = state
        .key_values()
        .map(|(k, _)| k)
        .filter(|k| !published.iter().any(|(p, _)| p == k))
        .map(str::to_string)
        .collect();
    if out.is_empty() {
        return out;
    }
    // At most: every removal, every value, and a delete and a set each for
    // the signing key and the signature.
    if !has_room(state, out.removed.len() + published.len() + 2) {
        out.exhausted = true;
        return out;
    }
    for k in &out.removed {
        state.delete(k);
    }
    for (k, v) in published {
        if k == KEY_SIGNING_KEY || k == KEY_SIGNATURE {
            continue;
        }
        state.set(k, v);
    }
    // The signing key and the signature last, at versions above every value
    // (deleting first forces a new version when the value is unchanged).
    for (k, v) in published
        .iter()
        .filter(|(k, _)| k == KEY_SIGNING_KEY || k == KEY_SIGNATURE)
    {
        state.delete(k);
        state.set(k, v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published() -> Vec<(String, String)> {
        [
            ("pubkey", "K"),
            ("addrs", "192.0.2.2"),
            (KEY_SIGNING_KEY, "S"),
            (KEY_SIGNATURE, "SIG"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn version(s: &NodeState, k: &str) -> u64 {
        s.get_versioned(k).unwrap().version
    }

    #[test]
    fn forged_values_are_written_back_signature_last_and_only_when_needed() {
        let mut s = NodeState::for_test();
        for (k, v) in published() {
            s.set(k, v);
        }
        assert!(restore(&mut s, &published()).is_empty());
        let max = s.max_version();
        assert!(restore(&mut s, &published()).is_empty());
        assert_eq!(
            s.max_version(),
            max,
            "nothing rewritten when nothing differs"
        );
        // A peer's delta for our own id: a value over ours, and a key of its own.
        s.set("addrs", "203.0.113.9");
        s.set("extra", "x");
        let r = restore(&mut s, &published());
        assert_eq!(r.rewritten, vec!["addrs".to_string()]);
        assert_eq!(r.removed, vec!["extra".to_string()]);
        for (k, v) in published() {
            assert_eq!(s.get(&k), Some(v.as_str()), "{k}");
        }
        assert_eq!(s.get("extra"), None);
        assert!(version(&s, "addrs") < version(&s, KEY_SIGNING_KEY));
        assert!(version(&s, KEY_SIGNING_KEY) < version(&s, KEY_SIGNATURE));
        assert!(restore(&mut s, &published()).is_empty());
        // A deleted value counts as different too.
        s.delete("pubkey");
        assert_eq!(
            restore(&mut s, &published()).rewritten,
            vec!["pubkey".to_string()]
        );
        assert_eq!(s.get("pubkey"), Some("K"));
    }

    #[test]
    fn a_value_forged_as_deleted_after_a_ttl_is_put_back() {
        let mut s = NodeState::for_test();
        for (k, v) in published() {
            s.set(k, v);
        }
        // Same value, but marked to vanish (everywhere) after the grace period.
        s.set_with_ttl("addrs", "192.0.2.2");
        assert_eq!(
            restore(&mut s, &published()).rewritten,
            vec!["addrs".to_string()]
        );
        assert!(matches!(
            s.get_versioned("addrs").unwrap().status,
            DeletionStatus::Set
        ));
        assert!(restore(&mut s, &published()).is_empty());
    }

    #[test]
    fn a_forged_version_near_the_top_is_reported_not_a_panic() {
        let mut s = NodeState::for_test();
        for (k, v) in published() {
            s.set(k, v);
        }
        // A peer's delta for our id at version u64::MAX.
        s.set_max_version(u64::MAX - 1);
        s.set("addrs", "203.0.113.9");
        assert_eq!(s.max_version(), u64::MAX);
        let r = restore(&mut s, &published());
        assert!(r.exhausted, "{r:?}");
        assert_eq!(r.rewritten, vec!["addrs".to_string()]);
        assert_eq!(s.get("addrs"), Some("203.0.113.9"), "nothing written");
        assert!(!has_room(&s, 1));
        assert!(has_room(&s, 0));
    }
}
