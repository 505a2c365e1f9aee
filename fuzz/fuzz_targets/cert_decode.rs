//! The certificate decoder (src/cert, proto/certs.md) over arbitrary bytes.
//!
//! Must never panic. Whatever decodes re-encodes to exactly the input (the
//! format has one encoding per certificate), and never verifies under a CA
//! key the input could not have been signed with; the text form and the
//! record judgement take the same bytes without panicking.
#![no_main]

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use meshsec::cert::{Certificate, Trust, MAX_CERT_LEN};
use meshsec::identity::SigningKey;

fuzz_target!(|data: &[u8]| {
    let ca = SigningKey::from_seed([0x11; 32]).public();
    if let Ok(c) = Certificate::decode(data) {
        assert!(data.len() <= MAX_CERT_LEN);
        assert_eq!(c.encode(), data, "one encoding per certificate");
        // The fuzzer cannot sign with the CA's seed.
        assert!(c.verify(&[ca], c.not_before).is_err());
        let _ = c.fingerprint();
    }
    let text = B64.encode(data);
    let trust = Trust { cas: vec![ca], ..Trust::default() };
    let key = SigningKey::from_seed([0x22; 32]).public();
    assert!(trust
        .judge("n", &key, &["10.0.0.1".parse().unwrap()], Some(&text), 1)
        .is_err());
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = Certificate::from_text(s);
    }
});
