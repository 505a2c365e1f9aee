//! The certificate decoder (src/cert, proto/certs.md) over arbitrary bytes.
//!
//! Two halves per input:
//! 1. Hostile: the input as a certificate (bytes, and base64 text to the
//!    record judgement). Must never panic; whatever decodes re-encodes to
//!    exactly the input (one encoding per certificate) and never verifies
//!    under a CA key the fuzzer cannot sign with.
//! 2. Round trip: a certificate issued by a real CA from fields the input
//!    chooses (name, ranges, validity) verifies and decodes to itself; one
//!    byte changed where the input says is refused (it no longer decodes,
//!    or no longer verifies for the same name and key).
#![no_main]

use std::net::IpAddr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use meshsec::cert::{Certificate, Range, Trust, MAX_CERT_LEN, MAX_RANGES};
use meshsec::identity::SigningKey;

fuzz_target!(|data: &[u8]| {
    let ca_key = SigningKey::from_seed([0x11; 32]);
    let ca = ca_key.public();
    if let Ok(c) = Certificate::decode(data) {
        assert!(data.len() <= MAX_CERT_LEN);
        assert_eq!(c.encode(), data, "one encoding per certificate");
        assert!(c.verify(&[ca], c.not_before).is_err());
        let _ = c.fingerprint();
    }
    let text = B64.encode(data);
    let trust = Trust {
        cas: vec![ca],
        ..Trust::default()
    };
    let node = SigningKey::from_seed([0x22; 32]).public();
    assert!(trust
        .judge("n", &node, &["10.0.0.1".parse().unwrap()], Some(&text), 1)
        .is_err());
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = Certificate::from_text(s);
    }

    // Round trip.
    let at = |i: usize| data.get(i).copied().unwrap_or(0);
    let name: String = data
        .iter()
        .skip(8)
        .take(usize::from(at(0) % 63) + 1)
        .map(|b| (b'a' + b % 26) as char)
        .collect();
    let name = if name.is_empty() {
        "n".to_string()
    } else {
        name
    };
    let ranges: Vec<Range> = (0..usize::from(at(1)) % MAX_RANGES + 1)
        .map(|i| {
            let b = at(2 + i);
            if b & 1 == 0 {
                let prefix = b % 33;
                let addr = IpAddr::from([10, b, at(3 + i), 0]);
                Range::new(addr, prefix).unwrap_or(Range::new(addr, 32).unwrap())
            } else {
                let addr = IpAddr::from([0xfd00, u16::from(b), 0, 0, 0, 0, 0, 0]);
                Range::new(addr, 128).unwrap()
            }
        })
        .collect();
    let not_before = u64::from(at(4)) << 24;
    let not_after = not_before + u64::from(at(5)) * 86_400 + 1;
    let c = Certificate::issue(&ca_key, &name, node, ranges, not_before, not_after).unwrap();
    let bytes = c.encode();
    assert!(bytes.len() <= MAX_CERT_LEN);
    assert_eq!(Certificate::decode(&bytes).as_ref(), Ok(&c));
    assert_eq!(c.verify(&[ca], not_before), Ok(()));
    let mut tampered = bytes.clone();
    let i = usize::from(at(6)) * 7 % tampered.len();
    tampered[i] ^= at(7) | 1;
    if let Ok(t) = Certificate::decode(&tampered) {
        let still =
            t.verify(&[ca], not_before).is_ok() && t.check_record(&name, &node, &[]).is_ok();
        assert!(
            !still,
            "byte {i} changed and the certificate still vouches for {name}"
        );
    }
});
