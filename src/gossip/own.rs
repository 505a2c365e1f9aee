//! This node's own record, kept as published. chitchat applies a peer's
//! delta for any node id, this node's own included, so a member holding the
//! cluster secret can write values over ours at newer versions: they would
//! travel on as ours, and (not matching our signature) make our record
//! invalid everywhere, long after that member is evicted. Each view tick
//! compares our state with what we published and writes back what differs,
//! at versions above the forged ones, signature last (see
//! [`super::records::signed_key_values`] for why the order matters).

use chitchat::NodeState;

use super::schema::{KEY_SIGNATURE, KEY_SIGNING_KEY};

/// What [`restore`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    /// Published keys whose value differed (or was missing or deleted).
    pub rewritten: Vec<String>,
    /// Keys we never published, deleted.
    pub removed: Vec<String>,
}

impl Restored {
    /// Whether anything had to be put back.
    pub fn is_empty(&self) -> bool {
        self.rewritten.is_empty() && self.removed.is_empty()
    }
}

/// Puts `published` back into our own `state` where it differs, removes
/// keys we never published, and re-writes the signature after the values so
/// that receivers see a complete record again.
pub fn restore(state: &mut NodeState, published: &[(String, String)]) -> Restored {
    let mut out = Restored::default();
    for (k, v) in published {
        if state.get(k) != Some(v.as_str()) {
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
}
