//! Pinning: the first signing identity seen for a node name is that name's
//! identity from then on (trust on first use, persisted in the state
//! directory). A validly signed record under a pinned name but another
//! signing key is an impostor: it never counts (the view reads it as if
//! nothing was published) and it is shown as a conflict until the operator
//! runs `meshsec forget NAME`, after which the next identity seen is pinned.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::records::SignedRecord;
use crate::identity::SigningPublicKey;

/// File in the state directory holding the pins.
pub const PINS_FILE: &str = "pins.json";

/// Names pinned at most. A member holding the cluster secret can mint names
/// without end; past the cap a new name is refused (listed as a conflict,
/// counted) rather than pinned, until `meshsec forget` frees a pin.
pub const MAX_PINS: usize = 16_384;

/// The identity conflicts of the last view, and how many refusals so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflicts {
    /// Records refused in the last view.
    pub current: Vec<IdentityConflict>,
    /// Refusals so far (each name, key and generation counted once).
    pub total: u64,
}

/// A validly signed record refused because its name is pinned to another key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IdentityConflict {
    /// The node name.
    pub name: String,
    /// Fingerprint of the pinned signing key.
    pub pinned: String,
    /// Fingerprint of the key the refused record was signed with.
    pub offered: String,
    /// The refused record's generation.
    pub generation: u64,
}

/// Why the pins file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("--state-dir: {path}: {reason}")]
pub struct PinsError {
    /// The pins file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

/// Name → pinned signing key.
#[derive(Debug)]
pub struct Pins {
    pins: BTreeMap<String, SigningPublicKey>,
    path: Option<PathBuf>,
    max: usize,
}

impl Default for Pins {
    fn default() -> Self {
        Pins {
            pins: BTreeMap::new(),
            path: None,
            max: MAX_PINS,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct PinsFile {
    /// Name → hex of the 32-byte Ed25519 public key.
    pins: BTreeMap<String, String>,
}

impl Pins {
    /// Pins kept only in memory (tests, `--datapath memory` stays the same).
    pub fn in_memory() -> Pins {
        Pins::default()
    }

    /// Loads `state_dir/pins.json` (absent: no pins yet); changes are saved there.
    pub fn load(state_dir: &Path) -> Result<Pins, PinsError> {
        let path = state_dir.join(PINS_FILE);
        let err = |reason: String| PinsError {
            path: path.clone(),
            reason,
        };
        let pins = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let file: PinsFile =
                    serde_json::from_str(&text).map_err(|e| err(format!("unreadable: {e}")))?;
                let mut pins = BTreeMap::new();
                for (name, hex) in file.pins {
                    let key = decode_hex32(&hex)
                        .ok_or_else(|| err(format!("pin of {name:?}: not 64 hex digits")))?;
                    pins.insert(name, SigningPublicKey(key));
                }
                pins
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(err(e.to_string())),
        };
        Ok(Pins {
            pins,
            path: Some(path),
            max: MAX_PINS,
        })
    }

    /// The key pinned for `name`.
    pub fn get(&self, name: &str) -> Option<&SigningPublicKey> {
        self.pins.get(name)
    }

    /// Drops the pin of `name` (the next identity seen for it is pinned).
    /// Returns whether there was one.
    pub fn forget(&mut self, name: &str) -> bool {
        let had = self.pins.remove(name).is_some();
        if had {
            self.save();
        }
        had
    }

    /// Pins the names not pinned yet whose records all carry one signing
    /// key, and removes from `valid` every record whose name is pinned to
    /// another key, returning those conflicts. A new name seen with several
    /// identities at once is pinned to none of them (generations are the
    /// publisher's choice, so no order among them can be trusted): all its
    /// records are refused and listed until one identity remains.
    pub fn apply(
        &mut self,
        valid: &mut HashMap<(String, u64), SignedRecord>,
    ) -> Vec<IdentityConflict> {
        let mut seen: BTreeMap<&str, std::collections::BTreeSet<SigningPublicKey>> =
            BTreeMap::new();
        for ((name, _), r) in valid.iter() {
            if !self.pins.contains_key(name) {
                seen.entry(name.as_str()).or_default().insert(r.signing_key);
            }
        }
        let ambiguous: std::collections::BTreeSet<String> = seen
            .iter()
            .filter(|(_, keys)| keys.len() > 1)
            .map(|(n, _)| n.to_string())
            .collect();
        let new: Vec<(String, SigningPublicKey)> = seen
            .into_iter()
            .filter(|(_, keys)| keys.len() == 1)
            .filter_map(|(n, keys)| keys.into_iter().next().map(|k| (n.to_string(), k)))
            .collect();
        let mut unpinned = std::collections::BTreeSet::new();
        if !new.is_empty() {
            let mut added = 0;
            for (name, key) in new {
                if self.pins.len() >= self.max {
                    unpinned.insert(name);
                    continue;
                }
                tracing::info!(peer = %name, signing_key = %key.fingerprint(), "identity pinned");
                self.pins.insert(name, key);
                added += 1;
            }
            if added > 0 {
                self.save();
            }
        }
        let mut conflicts = Vec::new();
        valid.retain(|(name, generation), r| {
            let refused = if ambiguous.contains(name) {
                Some("none (several identities at once)")
            } else if unpinned.contains(name) {
                Some("none (pin table full: meshsec forget NAME frees one)")
            } else {
                None
            };
            if let Some(pinned) = refused {
                conflicts.push(IdentityConflict {
                    name: name.clone(),
                    pinned: pinned.into(),
                    offered: r.signing_key.fingerprint(),
                    generation: *generation,
                });
                return false;
            }
            match self.pins.get(name) {
                Some(pinned) if *pinned != r.signing_key => {
                    conflicts.push(IdentityConflict {
                        name: name.clone(),
                        pinned: pinned.fingerprint(),
                        offered: r.signing_key.fingerprint(),
                        generation: *generation,
                    });
                    false
                }
                _ => true,
            }
        });
        conflicts.sort();
        conflicts
    }

    fn save(&self) {
        let Some(path) = &self.path else {
            return;
        };
        let file = PinsFile {
            pins: self
                .pins
                .iter()
                .map(|(n, k)| (n.clone(), encode_hex(k.as_bytes())))
                .collect(),
        };
        let text = match serde_json::to_string_pretty(&file) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode the identity pins");
                return;
            }
        };
        let tmp = path.with_extension("json.tmp");
        let result = crate::identity::write_owner_only(path, &tmp, (text + "\n").as_bytes());
        if let Err(e) = result {
            // Pins still hold in memory; only a restart would forget them.
            tracing::warn!(path = %path.display(), error = %e, "cannot save the identity pins");
        }
    }
}

fn encode_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gossip::schema::NodeInfo;

    fn rec(key: u8) -> SignedRecord {
        SignedRecord {
            info: NodeInfo {
                public_key: Some([key; 32]),
                data_addrs: vec!["192.0.2.2".parse().unwrap()],
                handshake_port: Some(9341),
                protocol: Some(1),
                left: false,
            },
            signing_key: SigningPublicKey([key; 32]),
        }
    }

    #[test]
    fn first_identity_is_pinned_an_impostor_refused_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let mut pins = Pins::load(dir.path()).unwrap();
        let mut valid: HashMap<(String, u64), SignedRecord> = [(("b".into(), 1), rec(2))].into();
        assert!(pins.apply(&mut valid).is_empty());
        // An impostor under b's name, newer generation, its own key.
        let mut valid: HashMap<(String, u64), SignedRecord> =
            [(("b".into(), 1), rec(2)), (("b".into(), 9), rec(9))].into();
        let conflicts = pins.apply(&mut valid);
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].generation, 9);
        assert!(valid.contains_key(&("b".into(), 1)) && valid.len() == 1);
        // Pins survive a restart.
        let mut again = Pins::load(dir.path()).unwrap();
        let mut valid: HashMap<(String, u64), SignedRecord> = [(("b".into(), 9), rec(9))].into();
        assert_eq!(again.apply(&mut valid).len(), 1);
        assert!(valid.is_empty());
        // The operator accepts the new identity.
        assert!(again.forget("b"));
        let mut valid: HashMap<(String, u64), SignedRecord> = [(("b".into(), 9), rec(9))].into();
        assert!(again.apply(&mut valid).is_empty());
        assert_eq!(again.get("b"), Some(&SigningPublicKey([9; 32])));
    }

    /// Review attack 4: a new name seen with two identities at once pins
    /// neither (an attacker's generation 0 must not win); once one remains,
    /// it is pinned.
    #[test]
    fn a_new_name_seen_with_two_identities_at_once_pins_neither() {
        let mut pins = Pins::in_memory();
        let mut valid: HashMap<(String, u64), SignedRecord> =
            [(("c".into(), 5), rec(5)), (("c".into(), 0), rec(3))].into();
        let conflicts = pins.apply(&mut valid);
        assert_eq!(pins.get("c"), None);
        assert_eq!(conflicts.len(), 2);
        assert!(valid.is_empty(), "neither counts");
        let mut valid: HashMap<(String, u64), SignedRecord> = [(("c".into(), 5), rec(5))].into();
        assert!(pins.apply(&mut valid).is_empty());
        assert_eq!(pins.get("c"), Some(&SigningPublicKey([5; 32])));
    }

    #[test]
    fn a_broken_pins_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(PINS_FILE), "{\"pins\":{\"b\":\"zz\"}}").unwrap();
        let e = Pins::load(dir.path()).unwrap_err();
        assert!(
            e.to_string().contains("pins.json") && e.to_string().contains("\"b\""),
            "{e}"
        );
    }

    #[test]
    fn past_the_cap_new_names_are_refused_not_pinned() {
        let mut pins = Pins {
            max: 2,
            ..Pins::in_memory()
        };
        let mut valid: HashMap<(String, u64), SignedRecord> =
            (1..=3u8).map(|i| ((format!("n{i}"), 1), rec(i))).collect();
        let conflicts = pins.apply(&mut valid);
        assert_eq!(valid.len(), 2);
        assert_eq!(conflicts.len(), 1);
        assert!(conflicts[0].pinned.contains("pin table full"));
        // Forgetting one frees room for the refused name.
        let kept: Vec<String> = valid.keys().map(|(n, _)| n.clone()).collect();
        assert!(pins.forget(&kept[0]));
        let mut valid: HashMap<(String, u64), SignedRecord> = [(conflicts[0].name.clone(), 1)]
            .into_iter()
            .map(|k| (k, rec(9)))
            .collect();
        assert!(pins.apply(&mut valid).is_empty());
        assert_eq!(valid.len(), 1);
    }
}
