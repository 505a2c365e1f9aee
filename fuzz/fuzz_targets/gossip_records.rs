//! Signed gossip records (src/gossip/records.rs) over arbitrary observed key-values.
//!
//! Two halves per input:
//! 1. Hostile: a few rounds of arbitrary `Observed` records (arbitrary names, generations,
//!    strings for every signed value, `sig_key` and `sig`, arbitrary or missing chitchat
//!    versions; `sig_key`/`sig` sometimes well-formed base64 of the right length so the
//!    verifier is reached) go to `check` and to one `RecordTracker`. Must never panic, and
//!    nothing is `Valid` unless it was signed by one of our keys (the hostile half never signs).
//! 2. Round trip: a record built by `signed_key_values` with a real key verifies and reads back
//!    what was published; any single-byte change (that leaves valid UTF-8) of a signed value,
//!    of `sig_key` or of `sig` is refused, and a tracker that saw the genuine record keeps it
//!    rather than taking the tampered one.
#![no_main]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use meshsec::gossip::members::Observed;
use meshsec::gossip::records::{check, signed_key_values, Check, RecordTracker};
use meshsec::gossip::schema::{NodeInfo, KEY_SIGNATURE, KEY_SIGNING_KEY, SIGNED_KEYS};
use meshsec::identity::SigningKey;

/// Reads the input front to back; past the end everything reads as zero.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u64(&mut self) -> u64 {
        let mut v = [0u8; 8];
        for b in &mut v {
            *b = self.u8();
        }
        u64::from_le_bytes(v)
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn string(&mut self) -> String {
        let n = self.u8() as usize;
        String::from_utf8_lossy(self.take(n)).into_owned()
    }
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut v = [0u8; N];
        for b in &mut v {
            *b = self.u8();
        }
        v
    }
}

/// Several plausible generations, and arbitrary ones.
fn generation(b: &mut Bytes) -> u64 {
    match b.u8() % 4 {
        0 => 1,
        1 => 2,
        2 => u64::MAX,
        _ => b.u64(),
    }
}

fn key_of(i: u8) -> SigningKey {
    SigningKey::from_seed([i % 4 + 1; 32])
}

/// One hostile record: every key present or not, with an arbitrary string or, for the
/// signature fields, sometimes base64 of the right length.
fn hostile(b: &mut Bytes) -> Observed {
    let name = match b.u8() % 3 {
        0 => "b".to_string(),
        _ => b.string(),
    };
    let generation = generation(b);
    let mut key_values = BTreeMap::new();
    let mut versions = BTreeMap::new();
    let keys = SIGNED_KEYS
        .iter()
        .copied()
        .chain([KEY_SIGNING_KEY, KEY_SIGNATURE, "extra"]);
    for k in keys {
        let how = b.u8();
        if how & 1 == 0 {
            continue;
        }
        let value = match (k, how >> 1 & 3) {
            (KEY_SIGNING_KEY, 0) => B64.encode(key_of(b.u8()).public().as_bytes()),
            (KEY_SIGNING_KEY, 1) => B64.encode(b.array::<32>()),
            (KEY_SIGNATURE, 0 | 1) => B64.encode(b.array::<64>()),
            _ => b.string(),
        };
        key_values.insert(k.to_string(), value);
        match how >> 3 & 3 {
            0 => {}
            1 => {
                versions.insert(k.to_string(), u64::from(b.u8()));
            }
            _ => {
                versions.insert(k.to_string(), b.u64());
            }
        }
    }
    Observed {
        name,
        generation,
        gossip_addr: "192.0.2.1:9340".parse().unwrap(),
        key_values,
        versions,
        heartbeat: b.u64(),
        live: b.u8() & 1 == 1,
        dead: b.u8() & 1 == 1,
    }
}

/// What chitchat delivers for a published record: the key-values, versions in publication order.
fn observed(name: &str, generation: u64, kv: &[(String, String)]) -> Observed {
    let mut o = Observed {
        name: name.to_string(),
        generation,
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

fn node_info(b: &mut Bytes) -> NodeInfo {
    let flags = b.u8();
    let n_addrs = b.u8() % 20;
    let data_addrs = (0..n_addrs)
        .map(|_| {
            if b.u8() & 1 == 0 {
                IpAddr::from(b.array::<4>())
            } else {
                IpAddr::from(b.array::<16>())
            }
        })
        .collect();
    NodeInfo {
        public_key: (flags & 1 == 1).then(|| b.array::<32>()),
        data_addrs,
        handshake_port: (flags & 2 == 2).then(|| u16::from_le_bytes(b.array::<2>())),
        protocol: (flags & 4 == 4).then(|| u32::from_le_bytes(b.array::<4>())),
        left: flags & 8 == 8,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let now = Instant::now();

    // 1. Hostile records: no panic, nothing valid.
    let mut tracker = RecordTracker::default();
    let rounds = b.u8() % 4;
    for round in 0..rounds {
        let n = b.u8() % 5;
        let records: Vec<Observed> = (0..n).map(|_| hostile(&mut b)).collect();
        for o in &records {
            assert!(
                !matches!(check(o), Check::Valid(_)),
                "a record nobody signed verified: {o:?}"
            );
        }
        let r = tracker.observe(&records, now + Duration::from_secs(u64::from(round) * 7));
        assert!(r.valid.is_empty());
        assert!(r.counters.records_incomplete <= u64::from(n));
    }

    // 2. Round trip and single-byte tampering.
    let key = key_of(b.u8());
    let name = match b.u8() % 2 {
        0 => "b".to_string(),
        _ => b.string(),
    };
    let generation = generation(&mut b);
    let info = node_info(&mut b);
    let kv = signed_key_values(&info, &name, generation, &key);
    let genuine = observed(&name, generation, &kv);
    let published: BTreeMap<String, String> = kv.iter().cloned().collect();
    let Check::Valid(record) = check(&genuine) else {
        panic!("a genuine record does not verify: {:?}", check(&genuine))
    };
    assert_eq!(record.signing_key, key.public());
    assert_eq!(record.info, NodeInfo::from_key_values(&published));
    let mut tracker = RecordTracker::default();
    let r = tracker.observe(std::slice::from_ref(&genuine), now);
    assert_eq!(r.valid.get(&(name.clone(), generation)), Some(&record));

    // Which published value to change: one of the five signed ones, sig_key or sig.
    let targets: Vec<&str> = SIGNED_KEYS
        .iter()
        .copied()
        .chain([KEY_SIGNING_KEY, KEY_SIGNATURE])
        .collect();
    let tampers = b.u8() % 8 + 1;
    for _ in 0..tampers {
        let target = targets[b.u8() as usize % targets.len()];
        let mut bytes = genuine.key_values[target].clone().into_bytes();
        let pos = u16::from_le_bytes(b.array::<2>()) as usize;
        let new = b.u8();
        if bytes.is_empty() {
            // An empty value (absent field) can only be changed by inserting.
            bytes.push(new);
        } else {
            let pos = pos % bytes.len();
            if bytes[pos] == new {
                continue;
            }
            bytes[pos] = new;
        }
        let Ok(changed) = String::from_utf8(bytes) else {
            continue; // chitchat values are strings
        };
        let mut tampered = genuine.clone();
        tampered
            .key_values
            .insert(target.to_string(), changed.clone());
        let verdict = check(&tampered);
        assert!(
            !matches!(verdict, Check::Valid(_)),
            "changing {target} to {changed:?} still verifies"
        );
        let r = tracker.observe(std::slice::from_ref(&tampered), now);
        assert_eq!(
            r.valid.get(&(name.clone(), generation)),
            Some(&record),
            "the tampered record replaced the genuine one"
        );
    }
});
