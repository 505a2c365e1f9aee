//! Signed gossip records (proto/records.md): everything a node publishes,
//! bound to its chitchat name and generation, signed by its Ed25519 key.
//!
//! [`signed_key_values`] builds what a node publishes; [`check`] judges one
//! observed record; [`RecordTracker`] judges every record each round, keeps
//! the last valid record of each (name, generation), counts bad signatures
//! once per distinct content and logs them at a limited rate. The view
//! ([`super::members::view`]) uses only the valid records it returns.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::warn;

use super::members::Observed;
use super::schema::{NodeInfo, KEY_SIGNATURE, KEY_SIGNING_KEY, SIGNED_KEYS};
use crate::identity::{decode_public, encode_public, SigningKey, SigningPublicKey};
use crate::throttle::LogThrottle;

/// Domain label that starts every signed record (24 bytes, no terminator).
pub const RECORD_LABEL: &[u8; 24] = b"meshsec v1 gossip record";

/// A record whose signature verified: what the node published, and the key
/// that signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRecord {
    /// The published values, parsed.
    pub info: NodeInfo,
    /// The Ed25519 key whose signature covers them.
    pub signing_key: SigningPublicKey,
}

/// Why a record is not (yet) complete: normal while chitchat delivers its
/// key-values one by one; not a forgery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incomplete {
    /// No signature or signing key has arrived (or the node publishes none).
    Unsigned,
    /// A signed value (or the signing key) carries a newer chitchat version
    /// than the signature: the node's re-signature is still on its way.
    NewerThanSignature,
}

/// Why a complete record is refused: forged, tampered or malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRecord {
    /// The signature is newer than every value, yet a signed key is absent.
    MissingValue,
    /// `sig_key` is not base64 of 32 bytes.
    MalformedKey,
    /// `sig` is not base64 of 64 bytes.
    MalformedSignature,
    /// The signature does not verify over the published values.
    Mismatch,
}

impl BadRecord {
    /// Stable name, for logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            BadRecord::MissingValue => "missing_value",
            BadRecord::MalformedKey => "malformed_key",
            BadRecord::MalformedSignature => "malformed_signature",
            BadRecord::Mismatch => "mismatch",
        }
    }
}

/// The verdict on one observed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The signature verifies over every published value.
    Valid(SignedRecord),
    /// Half-arrived (or unsigned): does not count, is not a forgery.
    Incomplete(Incomplete),
    /// Does not count, and is counted as a bad signature.
    Bad(BadRecord),
}

/// Record counters for `meshsec status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordCounters {
    /// Complete records whose signature did not verify (forged, tampered or
    /// malformed), counted once per (name, generation) and distinct content.
    pub records_bad_signature: u64,
    /// Records incomplete right now (a gauge, not a total): signature not
    /// yet arrived, or a value newer than its signature.
    pub records_incomplete: u64,
    /// Times this node found its own record overwritten in its own gossip
    /// state (a peer's delta for our id: only a member holding the cluster
    /// secret can send one) and put it back.
    #[serde(default)]
    pub own_record_restored: u64,
}

/// The bytes a record's signature covers (proto/records.md): the label, the
/// name, the generation, the signing key, then the five signed values
/// exactly as published, each length-prefixed (u32 big-endian).
pub fn record_bytes(
    name: &str,
    generation: u64,
    signing_key: &SigningPublicKey,
    values: &[&str; 5],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        RECORD_LABEL.len()
            + 4
            + name.len()
            + 8
            + 32
            + values.iter().map(|v| 4 + v.len()).sum::<usize>(),
    );
    let lv = |out: &mut Vec<u8>, b: &[u8]| {
        // Values from chitchat fit one UDP datagram, far below u32::MAX.
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    };
    out.extend_from_slice(RECORD_LABEL);
    lv(&mut out, name.as_bytes());
    out.extend_from_slice(&generation.to_be_bytes());
    out.extend_from_slice(signing_key.as_bytes());
    for v in values {
        lv(&mut out, v.as_bytes());
    }
    out
}

/// What a node publishes: `info`'s key-values (all five signed keys, an
/// absent field as the empty string), then `sig_key`, then `sig` last, so
/// that a receiver holding the signature holds every value it signed.
pub fn signed_key_values(
    info: &NodeInfo,
    name: &str,
    generation: u64,
    key: &SigningKey,
) -> Vec<(String, String)> {
    let published: BTreeMap<String, String> = info.to_key_values().into_iter().collect();
    let values: [&str; 5] = SIGNED_KEYS.map(|k| published.get(k).map_or("", String::as_str));
    let public = key.public();
    let signature = key.sign(&record_bytes(name, generation, &public, &values));
    let mut kv: Vec<(String, String)> = SIGNED_KEYS
        .iter()
        .zip(values)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    kv.push((
        KEY_SIGNING_KEY.to_string(),
        encode_public(public.as_bytes()),
    ));
    kv.push((KEY_SIGNATURE.to_string(), B64.encode(signature)));
    kv
}

/// Judges one observed record (pure).
pub fn check(o: &Observed) -> Check {
    let kv = &o.key_values;
    let (Some(sig), Some(sig_key)) = (kv.get(KEY_SIGNATURE), kv.get(KEY_SIGNING_KEY)) else {
        return Check::Incomplete(Incomplete::Unsigned);
    };
    // Chitchat delivers a node's key-values in version order and the signer
    // writes the signature last: a value newer than the signature means the
    // new signature has not arrived yet.
    if newer_than_signature(o) {
        return Check::Incomplete(Incomplete::NewerThanSignature);
    }
    let mut values = [""; 5];
    for (slot, k) in values.iter_mut().zip(SIGNED_KEYS) {
        match kv.get(k) {
            Some(v) => *slot = v,
            None => return Check::Bad(BadRecord::MissingValue),
        }
    }
    let Some(signing_key) = decode_public(sig_key).map(SigningPublicKey) else {
        return Check::Bad(BadRecord::MalformedKey);
    };
    let signature: Option<[u8; 64]> = B64
        .decode(sig)
        .ok()
        .and_then(|b| b.as_slice().try_into().ok());
    let Some(signature) = signature else {
        return Check::Bad(BadRecord::MalformedSignature);
    };
    let message = record_bytes(&o.name, o.generation, &signing_key, &values);
    if !signing_key.verify(&message, &signature) {
        return Check::Bad(BadRecord::Mismatch);
    }
    Check::Valid(SignedRecord {
        info: NodeInfo::from_key_values(kv),
        signing_key,
    })
}

/// Whether a signed value is newer than the signature.
fn newer_than_signature(o: &Observed) -> bool {
    let sig_version = o.versions.get(KEY_SIGNATURE).copied();
    SIGNED_KEYS
        .iter()
        .chain([&KEY_SIGNING_KEY])
        .any(|k| o.versions.get(*k).copied() > sig_version)
}

/// The valid records of one round, by (name, generation), and the counters.
#[derive(Debug, Default)]
pub struct Records {
    /// The newest valid record of each (name, generation) that has one.
    pub valid: HashMap<(String, u64), SignedRecord>,
    /// Counters after this round.
    pub counters: RecordCounters,
}

/// Judges every record each round; remembers, per (name, generation), the
/// last record that verified (so a half-arrived re-signature, or a value
/// overwritten by someone else, falls back to it instead of to nothing) and
/// the last bad content counted (so a bad record is counted once, not once
/// per round).
#[derive(Debug)]
pub struct RecordTracker {
    valid: HashMap<(String, u64), SignedRecord>,
    /// [`content_digest`] of the record in `valid`, per (name, generation):
    /// the same content under the same name and generation verified before,
    /// so a round does not verify it again (every record's Ed25519 check every
    /// 250 ms cost a quarter of a core per node at 1,000 hosts).
    verified: HashMap<(String, u64), [u8; 32]>,
    /// Records checked in full (signature verified or refused), for tests.
    full_checks: u64,
    counted_bad: HashMap<(String, u64), [u8; 32]>,
    bad_signature: u64,
    throttle: LogThrottle,
}

impl Default for RecordTracker {
    fn default() -> Self {
        RecordTracker {
            valid: HashMap::new(),
            verified: HashMap::new(),
            full_checks: 0,
            counted_bad: HashMap::new(),
            bad_signature: 0,
            throttle: LogThrottle::new(Duration::from_secs(10)),
        }
    }
}

impl RecordTracker {
    /// Judges this round's records.
    pub fn observe(&mut self, observed: &[Observed], now: Instant) -> Records {
        let mut valid = HashMap::new();
        let mut verified = HashMap::new();
        let mut counted_bad = HashMap::new();
        let mut incomplete = 0;
        for o in observed {
            let key = (o.name.clone(), o.generation);
            let digest = content_digest(o);
            let known = match (self.verified.get(&key), self.valid.get(&key)) {
                (Some(d), Some(r)) if *d == digest && !newer_than_signature(o) => {
                    Some(Check::Valid(r.clone()))
                }
                _ => None,
            };
            let judged = known.unwrap_or_else(|| {
                self.full_checks += 1;
                check(o)
            });
            match judged {
                Check::Valid(r) => {
                    valid.insert(key.clone(), r);
                    verified.insert(key.clone(), digest);
                }
                Check::Incomplete(_) => incomplete += 1,
                Check::Bad(reason) => {
                    if self.counted_bad.get(&key) != Some(&digest) {
                        self.bad_signature += 1;
                        if let Some(suppressed) = self.throttle.check(now, "record_bad_signature") {
                            warn!(peer = %o.name, generation = o.generation, reason = reason.as_str(), suppressed, "gossip record refused: its signature does not verify");
                        }
                    }
                    counted_bad.insert(key.clone(), digest);
                }
            }
            if let (false, Some(prev)) = (valid.contains_key(&key), self.valid.get(&key)) {
                valid.insert(key.clone(), prev.clone());
                if let Some(d) = self.verified.get(&key) {
                    verified.insert(key.clone(), *d);
                }
            }
            if let (false, Some(d)) = (counted_bad.contains_key(&key), self.counted_bad.get(&key)) {
                counted_bad.insert(key, *d);
            }
        }
        // Forgetting what chitchat forgot keeps this bounded by the cluster size.
        self.valid = valid.clone();
        self.verified = verified;
        self.counted_bad = counted_bad;
        Records {
            valid,
            counters: RecordCounters {
                records_bad_signature: self.bad_signature,
                records_incomplete: incomplete,
                own_record_restored: 0,
            },
        }
    }
}

/// SHA-256 of what a record publishes (signed values, key and signature).
fn content_digest(o: &Observed) -> [u8; 32] {
    let mut h = Sha256::new();
    for k in SIGNED_KEYS.iter().chain([&KEY_SIGNING_KEY, &KEY_SIGNATURE]) {
        let v = o.key_values.get(*k);
        h.update([u8::from(v.is_some())]);
        let v = v.map_or(&[][..], |v| v.as_bytes());
        h.update((v.len() as u64).to_be_bytes());
        h.update(v);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gossip::members::tests::{observed_from, signed_obs};

    fn hexd(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn json_vectors() {
        // proto/vectors/records.json is the executable spec of the encoding.
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../../proto/vectors/records.json")).unwrap();
        let vectors = doc["vectors"].as_array().unwrap();
        assert!(!vectors.is_empty());
        for v in vectors {
            let seed: [u8; 32] = hexd(v["seed"].as_str().unwrap()).try_into().unwrap();
            let key = SigningKey::from_seed(seed);
            assert_eq!(
                key.public().0.to_vec(),
                hexd(v["signing_key"].as_str().unwrap())
            );
            let name = v["name"].as_str().unwrap();
            let generation = v["generation"].as_u64().unwrap();
            let kv_doc = v["key_values"].as_object().unwrap();
            let values: [&str; 5] = SIGNED_KEYS.map(|k| kv_doc[k].as_str().unwrap());
            let message = record_bytes(name, generation, &key.public(), &values);
            assert_eq!(
                message,
                hexd(v["record"].as_str().unwrap()),
                "{}",
                v["comment"]
            );
            let sig = key.sign(&message);
            assert_eq!(sig.to_vec(), hexd(v["signature"].as_str().unwrap()));
            // What the node publishes is exactly the vector's key-values.
            let info = NodeInfo::from_key_values(
                &kv_doc
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect(),
            );
            let published: BTreeMap<String, String> =
                signed_key_values(&info, name, generation, &key)
                    .into_iter()
                    .collect();
            let want: BTreeMap<String, String> = kv_doc
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            assert_eq!(published, want);
        }
    }

    #[test]
    fn valid_record_round_trips() {
        let o = signed_obs("b", 7, &SigningKey::from_seed([2; 32]), [9; 32], false);
        let Check::Valid(r) = check(&o) else {
            panic!("{:?}", check(&o))
        };
        assert_eq!(r.signing_key, SigningKey::from_seed([2; 32]).public());
        assert_eq!(r.info, NodeInfo::from_key_values(&o.key_values));
        assert_eq!(r.info.public_key, Some([9; 32]));
        assert!(!r.info.left);
    }

    #[test]
    fn record_bound_to_name_and_generation() {
        let key = SigningKey::from_seed([2; 32]);
        let mut o = signed_obs("b", 7, &key, [9; 32], false);
        o.name = "c".into();
        assert_eq!(check(&o), Check::Bad(BadRecord::Mismatch));
        let mut o = signed_obs("b", 7, &key, [9; 32], false);
        o.generation = 8;
        assert_eq!(check(&o), Check::Bad(BadRecord::Mismatch));
    }

    #[test]
    fn half_arrived_record_is_incomplete_not_bad() {
        let key = SigningKey::from_seed([2; 32]);
        let full: Vec<(String, String)> = signed_key_values(&signed_obs_info(false), "b", 7, &key);
        // Every prefix of the publication order short of the signature is
        // incomplete, never bad.
        let mut tracker = RecordTracker::default();
        for n in 0..full.len() {
            let o = observed_from("b", 7, &full[..n]);
            assert_eq!(check(&o), Check::Incomplete(Incomplete::Unsigned), "{n}");
            let r = tracker.observe(&[o], Instant::now());
            assert_eq!(r.counters.records_bad_signature, 0);
            assert_eq!(r.counters.records_incomplete, 1);
        }
        // Re-signing on leave: `status` arrives before the new `sig`.
        let left = signed_key_values(&signed_obs_info(true), "b", 7, &key);
        let mut both = full.clone();
        both.push(left[4].clone()); // status=left, newer than the old sig
        let o = observed_from("b", 7, &both);
        assert_eq!(check(&o), Check::Incomplete(Incomplete::NewerThanSignature));
        let r = tracker.observe(&[o], Instant::now());
        assert_eq!(r.counters.records_bad_signature, 0);
        both.push(left[6].clone());
        let o = observed_from("b", 7, &both);
        let Check::Valid(r) = check(&o) else {
            panic!("{:?}", check(&o))
        };
        assert!(r.info.left);
    }

    #[test]
    fn bad_signature_is_counted_once_per_content() {
        let key = SigningKey::from_seed([2; 32]);
        let mut o = signed_obs("b", 7, &key, [9; 32], false);
        let now = Instant::now();
        let mut tracker = RecordTracker::default();
        assert_eq!(tracker.observe(&[o.clone()], now).valid.len(), 1);
        o.key_values
            .insert(KEY_SIGNATURE.into(), B64.encode([1u8; 64]));
        for _ in 0..3 {
            let r = tracker.observe(&[o.clone()], now);
            assert_eq!(r.counters.records_bad_signature, 1);
            // The last valid record of that generation still stands.
            assert_eq!(r.valid.len(), 1);
        }
        o.key_values.insert(KEY_SIGNATURE.into(), "!!".into());
        assert_eq!(check(&o), Check::Bad(BadRecord::MalformedSignature));
        let r = tracker.observe(&[o.clone()], now);
        assert_eq!(r.counters.records_bad_signature, 2);
        // A fresh tracker has no valid record to fall back to.
        assert!(RecordTracker::default().observe(&[o], now).valid.is_empty());
    }

    #[test]
    fn a_record_is_verified_once_per_content() {
        let key = SigningKey::from_seed([2; 32]);
        let o = signed_obs("b", 7, &key, [9; 32], false);
        let now = Instant::now();
        let mut tracker = RecordTracker::default();
        for _ in 0..5 {
            assert_eq!(
                tracker.observe(std::slice::from_ref(&o), now).valid.len(),
                1
            );
        }
        assert_eq!(
            tracker.full_checks, 1,
            "unchanged content is not verified again"
        );
        // New content under the same name and generation is checked in full:
        // a forged signature is refused (the last valid record stands) ...
        let mut forged = o.clone();
        forged
            .key_values
            .insert(KEY_SIGNATURE.into(), B64.encode([1u8; 64]));
        let r = tracker.observe(&[forged], now);
        assert_eq!((r.valid.len(), r.counters.records_bad_signature), (1, 1));
        assert_eq!(tracker.full_checks, 2);
        // ... and the same content under another generation is another record.
        let mut other = o.clone();
        other.generation = 8;
        assert_eq!(check(&other), Check::Bad(BadRecord::Mismatch));
        let r = tracker.observe(&[o.clone(), other], now);
        assert_eq!(r.counters.records_bad_signature, 2);
        assert_eq!(tracker.full_checks, 3, "only the new content was checked");
        // Back to the verified content: no new verification.
        tracker.observe(&[o], now);
        assert_eq!(tracker.full_checks, 3);
    }

    fn signed_obs_info(left: bool) -> NodeInfo {
        NodeInfo::from_key_values(
            &signed_obs("x", 1, &SigningKey::from_seed([2; 32]), [9; 32], left).key_values,
        )
    }
}
