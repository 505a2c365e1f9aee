//! `meshsec ca init|sign|show` and `meshsec pubkey` as an operator runs them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn meshsec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshsec"))
        .args(args)
        .output()
        .expect("run meshsec")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_certificate_is_issued_before_the_first_start_and_shown() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let out = meshsec(&["ca", "init", "--out", &d("ca.key")]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
    assert!(dir.path().join("ca.crt").exists());
    // Never overwritten without --force.
    let before = std::fs::read(dir.path().join("ca.key")).unwrap();
    let out = meshsec(&["ca", "init", "--out", &d("ca.key")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("meshsec: --out: ") && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), before);

    // pubkey creates the keys of a node that never started.
    let out = meshsec(&["pubkey", "--state-dir", &d("state")]);
    assert!(out.status.success(), "{out:?}");
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(mode(&dir.path().join("state/signing.key")), 0o600);
    let again = meshsec(&["pubkey", "--state-dir", &d("state"), "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(json["signing_key"], key, "the same key on the second call");

    let ca_key = d("ca.key");
    let sign = |extra: &[&str]| {
        let mut args = vec![
            "ca",
            "sign",
            "--ca-key",
            &ca_key,
            "--name",
            "web-1",
            "--node-pubkey",
            &key,
            "--valid-for",
            "30",
            "--out",
        ];
        let out_path = d("web-1.cert");
        args.push(&out_path);
        args.extend_from_slice(extra);
        meshsec(&args)
    };
    let out = sign(&["--addr", "10.0.1.0/24", "--addr", "fd00::/64"]);
    assert!(out.status.success(), "{out:?}");
    let out = sign(&["--addr", "10.0.1.0/24"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an existing certificate is not overwritten"
    );
    for (bad, flag) in [("10.0.1.1/24", "--addr: "), ("nonsense", "--addr: ")] {
        let out = sign(&["--addr", bad, "--force"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with(&format!("meshsec: {flag}")), "{err}");
    }

    let out = meshsec(&[
        "ca",
        "show",
        "--ca",
        &d("ca.crt"),
        "--json",
        &d("web-1.cert"),
    ]);
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["name"], "web-1");
    assert_eq!(json["node_key"], key);
    assert_eq!(
        json["ranges"],
        serde_json::json!(["10.0.1.0/24", "fd00::/64"])
    );
    assert_eq!(json["verified"], true);
    let days =
        (json["not_after"].as_u64().unwrap() - json["not_before"].as_u64().unwrap()) / 86_400;
    assert_eq!(days, 30);
    // Another CA does not verify it.
    std::fs::create_dir(dir.path().join("other")).unwrap();
    assert!(meshsec(&["ca", "init", "--out", &d("other/ca.key")])
        .status
        .success());
    let out = meshsec(&[
        "ca",
        "show",
        "--ca",
        &d("other/ca.crt"),
        "--json",
        &d("web-1.cert"),
    ]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["verified"], false);
    assert_eq!(json["refused"], "unknown_ca");
}
