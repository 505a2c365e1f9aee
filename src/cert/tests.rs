use super::*;

fn hexd(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn doc() -> serde_json::Value {
    serde_json::from_str(include_str!("../../proto/vectors/certs.json")).unwrap()
}

fn ca() -> SigningKey {
    SigningKey::from_seed([1; 32])
}

fn node() -> SigningKey {
    SigningKey::from_seed([2; 32])
}

const T0: u64 = 1_750_000_000;

fn issue(name: &str, ranges: &[&str]) -> Certificate {
    Certificate::issue(
        &ca(),
        name,
        node().public(),
        ranges.iter().map(|r| r.parse().unwrap()).collect(),
        T0 - 10,
        T0 + 86_400,
    )
    .unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn json_vectors() {
    // proto/vectors/certs.json is the executable spec of the encoding.
    let doc = doc();
    assert_eq!(doc["label"].as_str().unwrap().as_bytes(), CERT_LABEL);
    let vectors = doc["vectors"].as_array().unwrap();
    assert!(!vectors.is_empty());
    for v in vectors {
        let seed: [u8; 32] = hexd(v["ca_seed"].as_str().unwrap()).try_into().unwrap();
        let ca = SigningKey::from_seed(seed);
        assert_eq!(ca.public().0.to_vec(), hexd(v["ca_key"].as_str().unwrap()));
        assert_eq!(
            key_id_text(&key_id(&ca.public())),
            v["ca_key_id"].as_str().unwrap()
        );
        let node_key = SigningPublicKey(hexd(v["node_key"].as_str().unwrap()).try_into().unwrap());
        let ranges: Vec<Range> = v["ranges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().parse().unwrap())
            .collect();
        let c = Certificate::issue(
            &ca,
            v["name"].as_str().unwrap(),
            node_key,
            ranges,
            v["not_before"].as_u64().unwrap(),
            v["not_after"].as_u64().unwrap(),
        )
        .unwrap();
        assert_eq!(
            c.signed_bytes(),
            hexd(v["signed"].as_str().unwrap()),
            "{}",
            v["comment"]
        );
        assert_eq!(
            c.encode(),
            hexd(v["cert"].as_str().unwrap()),
            "{}",
            v["comment"]
        );
        assert_eq!(c.to_text(), v["text"].as_str().unwrap());
        assert_eq!(c.fingerprint(), v["fingerprint"].as_str().unwrap());
        // And back: the decoder reads exactly these fields.
        let d = Certificate::from_text(v["text"].as_str().unwrap()).unwrap();
        assert_eq!(d, c);
        assert_eq!(d.verify(&[ca.public()], d.not_before), Ok(()));
    }
}

#[test]
fn malformed_vectors_are_refused_by_the_decoder() {
    let doc = doc();
    let bad = doc["malformed"].as_array().unwrap();
    assert!(bad.len() >= 10);
    for v in bad {
        let want = match v["error"].as_str().unwrap() {
            "version" => DecodeError::Version,
            "truncated" => DecodeError::Truncated,
            "trailing" => DecodeError::Trailing,
            "name" => DecodeError::Name,
            "range" => DecodeError::Range,
            "validity" => DecodeError::Validity,
            other => panic!("unknown error {other}"),
        };
        assert_eq!(
            Certificate::decode(&hexd(v["cert"].as_str().unwrap())),
            Err(want),
            "{}",
            v["comment"]
        );
    }
}

#[test]
fn tampered_vectors_decode_but_do_not_verify() {
    let doc = doc();
    let ca = SigningKey::from_seed(
        hexd(doc["vectors"][0]["ca_seed"].as_str().unwrap())
            .try_into()
            .unwrap(),
    );
    for v in doc["tampered"].as_array().unwrap() {
        let c = Certificate::decode(&hexd(v["cert"].as_str().unwrap())).unwrap();
        assert_eq!(
            c.verify(&[ca.public()], 1_750_000_000),
            Err(Refusal::BadCertSignature),
            "{}",
            v["comment"]
        );
    }
}

#[test]
fn every_single_byte_change_is_refused() {
    let c = issue("b", &["10.1.0.0/16", "fd00::/64"]);
    let bytes = c.encode();
    for i in 0..bytes.len() {
        for flip in [0x01u8, 0x80] {
            let mut b = bytes.clone();
            b[i] ^= flip;
            let ok = Certificate::decode(&b)
                .map(|d| {
                    d.verify(&[ca().public()], T0).is_ok()
                        && d.check_record("b", &node().public(), &[]).is_ok()
                })
                .unwrap_or(false);
            assert!(!ok, "byte {i} ^ {flip:#x} still verifies");
        }
    }
}

#[test]
fn expiry_and_start_are_checked_against_now() {
    let c = issue("b", &["10.1.0.0/16"]);
    let cas = [ca().public()];
    assert_eq!(c.verify(&cas, T0), Ok(()));
    assert_eq!(c.verify(&cas, T0 - 10), Ok(()));
    assert_eq!(c.verify(&cas, T0 - 11), Err(Refusal::NotYetValid));
    assert_eq!(c.verify(&cas, T0 + 86_399), Ok(()));
    assert_eq!(c.verify(&cas, T0 + 86_400), Err(Refusal::Expired));
}

#[test]
fn another_ca_is_unknown_and_a_forged_key_id_does_not_verify() {
    let c = issue("b", &["10.1.0.0/16"]);
    let other = SigningKey::from_seed([9; 32]).public();
    assert_eq!(c.verify(&[other], T0), Err(Refusal::UnknownCa));
    // Several CAs (a rotation): any one that signed it will do.
    assert_eq!(c.verify(&[other, ca().public()], T0), Ok(()));
    // Signed by another CA under our CA's key id.
    let mut forged = Certificate::issue(
        &SigningKey::from_seed([9; 32]),
        "b",
        node().public(),
        vec!["10.1.0.0/16".parse().unwrap()],
        T0 - 10,
        T0 + 10,
    )
    .unwrap();
    forged.ca_key_id = key_id(&ca().public());
    assert_eq!(
        forged.verify(&[ca().public()], T0),
        Err(Refusal::BadCertSignature)
    );
}

#[test]
fn name_key_and_addresses_must_match() {
    let c = issue("b", &["10.1.0.0/16", "fd00::/64", "192.0.2.7"]);
    let k = node().public();
    assert_eq!(
        c.check_record("b", &k, &[ip("10.1.200.3"), ip("fd00::9"), ip("192.0.2.7")]),
        Ok(())
    );
    assert_eq!(c.check_record("b", &k, &[]), Ok(()));
    assert_eq!(
        c.check_record("c", &k, &[ip("10.1.0.1")]),
        Err(Refusal::NameMismatch)
    );
    assert_eq!(
        c.check_record(
            "b",
            &SigningKey::from_seed([3; 32]).public(),
            &[ip("10.1.0.1")]
        ),
        Err(Refusal::KeyMismatch)
    );
    for outside in ["10.2.0.1", "192.0.2.8", "fd00:0:0:1::1", "::ffff:10.1.0.1"] {
        assert_eq!(
            c.check_record("b", &k, &[ip("10.1.0.1"), ip(outside)]),
            Err(Refusal::AddressNotCovered),
            "{outside}"
        );
    }
}

#[test]
fn ranges_parse_strictly() {
    assert_eq!(
        "10.0.0.0/8".parse::<Range>().unwrap().to_string(),
        "10.0.0.0/8"
    );
    assert_eq!(
        "10.0.0.1".parse::<Range>().unwrap().to_string(),
        "10.0.0.1/32"
    );
    assert_eq!("::/0".parse::<Range>().unwrap().to_string(), "::/0");
    assert!("10.0.0.1/8"
        .parse::<Range>()
        .unwrap_err()
        .contains("10.0.0.0"));
    assert!("10.0.0.0/33".parse::<Range>().is_err());
    assert!("nonsense/8".parse::<Range>().is_err());
    assert!("0.0.0.0/0"
        .parse::<Range>()
        .unwrap()
        .contains(&ip("203.0.113.9")));
    assert!(!"0.0.0.0/0".parse::<Range>().unwrap().contains(&ip("::1")));
}

#[test]
fn oversized_or_garbage_text_is_refused() {
    assert_eq!(
        Certificate::from_text(&"A".repeat(MAX_CERT_TEXT + 4)),
        Err(DecodeError::TooLong)
    );
    assert_eq!(
        Certificate::from_text("not base64!"),
        Err(DecodeError::NotBase64)
    );
    assert_eq!(Certificate::decode(&[]), Err(DecodeError::Truncated));
    let c = Certificate::issue(
        &ca(),
        &"n".repeat(63),
        node().public(),
        (0..MAX_RANGES as u16)
            .map(|i| Range::new(IpAddr::from([0xfd00, i, 0, 0, 0, 0, 0, 0]), 32).unwrap())
            .collect(),
        0,
        1,
    )
    .unwrap();
    assert_eq!(c.encode().len(), MAX_CERT_LEN);
    assert_eq!(Certificate::from_text(&c.to_text()), Ok(c));
}

#[test]
fn trust_judges_blocklist_first_then_the_certificate() {
    let c = issue("b", &["10.1.0.0/16"]);
    let k = node().public();
    let addrs = [ip("10.1.0.1")];
    let text = c.to_text();
    // Without a CA nothing is required; the blocklist still applies.
    let open = Trust::default();
    assert_eq!(open.judge("b", &k, &addrs, None, T0), Ok(None));
    let trust = Trust {
        cas: vec![ca().public()],
        blocklist: Blocklist::default(),
    };
    assert_eq!(
        trust.judge("b", &k, &addrs, Some(&text), T0),
        Ok(Some(c.clone()))
    );
    assert_eq!(trust.judge("b", &k, &addrs, None, T0), Err(Refusal::NoCert));
    assert_eq!(
        trust.judge("b", &k, &addrs, Some("AAAA"), T0),
        Err(Refusal::MalformedCert)
    );
    assert_eq!(
        trust.judge("b", &k, &addrs, Some(&text), T0 + 86_400),
        Err(Refusal::Expired)
    );
    for blocked in [c.fingerprint(), k.fingerprint()] {
        let t = Trust {
            blocklist: Blocklist::parse(&format!("# evicted\n{blocked}  # b, stolen\n")).unwrap(),
            ..trust.clone()
        };
        assert_eq!(
            t.judge("b", &k, &addrs, Some(&text), T0),
            Err(Refusal::Blocklisted)
        );
        let open = Trust { cas: vec![], ..t };
        assert_eq!(
            open.judge("b", &k, &addrs, Some(&text), T0),
            Err(Refusal::Blocklisted)
        );
    }
}

#[test]
fn blocklist_file_is_strict_and_reloadable() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("blocklist");
    std::fs::write(&p, "").unwrap();
    assert!(Blocklist::load(&p).unwrap().0.is_empty());
    std::fs::write(&p, "AAAA:bbbb:0000:1111\n\n# comment\n").unwrap();
    let b = Blocklist::load(&p).unwrap();
    assert!(b.0.contains("aaaa:bbbb:0000:1111"));
    std::fs::write(&p, "aaaa:bbbb:0000:1111\nnot-a-fingerprint\n").unwrap();
    let e = Blocklist::load(&p).unwrap_err().to_string();
    assert!(
        e.starts_with("--blocklist: ") && e.contains("line 2"),
        "{e}"
    );
    assert!(Blocklist::load(&dir.path().join("absent")).is_err());
}

#[test]
fn ca_files_round_trip_and_refuse_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ca.key");
    let (crt, public) = ca_init(&key, false).unwrap();
    assert_eq!(crt, dir.path().join(CA_CERT_FILE));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(load_ca_key(&key).unwrap().public(), public);
    assert_eq!(load_ca_file(&crt).unwrap(), vec![public]);
    let e = ca_init(&key, false).unwrap_err().to_string();
    assert!(e.starts_with("--out: ") && e.contains("refusing"), "{e}");
    assert_eq!(load_ca_key(&key).unwrap().public(), public, "untouched");
    let (_, replaced) = ca_init(&key, true).unwrap();
    assert_ne!(replaced, public);
    // A certificate file round-trips; one with two lines is refused.
    let c = issue("b", &["10.1.0.0/16"]);
    let cf = dir.path().join("b.cert");
    std::fs::write(&cf, format!("# b\n{}\n", c.to_text())).unwrap();
    assert_eq!(load_cert_file("--cert", &cf).unwrap(), c);
    std::fs::write(&cf, format!("{0}\n{0}\n", c.to_text())).unwrap();
    assert!(load_cert_file("--cert", &cf)
        .unwrap_err()
        .to_string()
        .starts_with("--cert: "));
}

#[test]
fn own_certificate_errors_say_what_to_fix() {
    let c = issue("b", &["10.1.0.0/16"]);
    let cas = [ca().public()];
    let k = node().public();
    assert!(check_own(&c, &cas, "b", &k, &[ip("10.1.0.1")], T0).is_ok());
    let e = check_own(&c, &cas, "c", &k, &[ip("10.1.0.1")], T0).unwrap_err();
    assert!(e.contains("issued to \"b\""), "{e}");
    let e = check_own(&c, &cas, "b", &k, &[ip("10.9.0.1")], T0).unwrap_err();
    assert!(e.contains("10.1.0.0/16"), "{e}");
    let e = check_own(&c, &cas, "b", &k, &[], T0 + 86_400).unwrap_err();
    assert!(e.contains("expired"), "{e}");
}

#[test]
/// Found in review: the temporary file's predictable name was opened without
/// O_EXCL/O_NOFOLLOW, so a planted symlink received the CA seed.
fn ca_init_does_not_follow_a_planted_temp_symlink() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let leak = dir.path().join("attacker-owned");
    std::fs::write(&leak, "").unwrap();
    std::fs::set_permissions(&leak, std::fs::Permissions::from_mode(0o644)).unwrap();
    let tmp = dir
        .path()
        .join(format!(".ca.key.tmp{}", std::process::id()));
    std::os::unix::fs::symlink(&leak, &tmp).unwrap();
    let out = dir.path().join("ca.key");
    let r = ca_init(&out, false);
    let leaked = std::fs::read_to_string(&leak).unwrap();
    assert!(
        r.is_err() || leaked.is_empty(),
        "CA seed written through the symlink into a 0{:o} file: {}",
        std::fs::metadata(&leak).unwrap().permissions().mode() & 0o777,
        leaked.trim().len()
    );
}
