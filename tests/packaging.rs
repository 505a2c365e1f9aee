//! The files the Debian package ships agree with the agent: the default
//! config loads through the real config loader (as shipped, and with every
//! key uncommented), documents every key the loader knows, and names the
//! same paths as the systemd unit; the changelog is at the crate's version.

use std::path::Path;

use meshsec::config::{
    parse_file, AgentConfig, AgentFlags, DEFAULT_CONTROL_SOCKET, DEFAULT_SECRET_FILE,
    DEFAULT_STATE_DIR,
};

const SHIPPED: &str = include_str!("../packaging/meshsec.toml");
const UNIT: &str = include_str!("../packaging/debian/meshsec.service");
const CHANGELOG: &str = include_str!("../packaging/debian/changelog");

/// `#key = value` lines, uncommented.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if is_setting(rest) => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_setting(line: &str) -> bool {
    let Some((key, _)) = line.split_once(" = ") else {
        return false;
    };
    !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
}

fn keys(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix('#'))
        .filter(|l| is_setting(l))
        .map(|l| l.split_once(" = ").unwrap().0.to_string())
        .collect()
}

fn resolve(text: &str, dir: &Path) -> AgentConfig {
    let path = dir.join("meshsec.toml");
    std::fs::write(&path, text).unwrap();
    let flags = AgentFlags {
        config: Some(path),
        // The shipped file leaves both unset; a host needs one of them.
        advertise: Some("192.0.2.1".into()),
        node_name: Some("host1".into()),
        ..AgentFlags::default()
    };
    AgentConfig::resolve(&flags).unwrap_or_else(|e| panic!("meshsec: {e}"))
}

#[test]
fn shipped_config_loads_and_sets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = resolve(SHIPPED, dir.path());
    assert_eq!(cfg.secret_files, vec![Path::new(DEFAULT_SECRET_FILE)]);
    assert_eq!(cfg.state_dir, Path::new(DEFAULT_STATE_DIR));
    assert_eq!(cfg.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
    assert!(cfg.seeds.is_empty());
}

#[test]
fn every_key_in_the_shipped_config_parses_and_shows_its_default() {
    let dir = tempfile::tempdir().unwrap();
    let text = uncommented(SHIPPED);
    assert_ne!(text, SHIPPED, "no commented settings found");
    let file = parse_file(&text).unwrap_or_else(|e| panic!("meshsec: {e}"));
    // The documented defaults are the loader's defaults.
    let cfg = resolve(&text, dir.path());
    let default = resolve("", dir.path());
    assert_eq!(cfg.listen, default.listen);
    assert_eq!(cfg.secret_files, default.secret_files);
    assert_eq!(cfg.state_dir, default.state_dir);
    assert_eq!(cfg.control_socket, default.control_socket);
    assert_eq!(cfg.log_format, default.log_format);
    assert_eq!(cfg.handshake_port, default.handshake_port);
    assert_eq!(cfg.esp_algorithm, default.esp_algorithm);
    assert_eq!(cfg.rekey.interval, default.rekey.interval);
    assert_eq!(cfg.peer_grace, default.peer_grace);
    assert_eq!(cfg.dead_node_grace, default.dead_node_grace);
    assert_eq!(cfg.gossip_interval, default.gossip_interval);
    assert_eq!(cfg.leave_on_stop, default.leave_on_stop);
    assert_eq!(cfg.datapath, default.datapath);
    // The examples are used as written.
    assert_eq!(cfg.seeds, vec!["203.0.113.10:9340".parse().unwrap()]);
    assert!(file.rekey_after_bytes.is_some() && file.rekey_after_packets.is_some());
    assert_eq!(cfg.metrics_listen, Some("127.0.0.1:9342".parse().unwrap()));
    assert_eq!(default.metrics_listen, None);
}

#[test]
fn the_shipped_config_documents_every_key() {
    // The loader lists what it accepts when it meets a key it does not know.
    let err = parse_file("no_such_key = 1").unwrap_err().to_string();
    let (_, expected) = err
        .split_once("expected one of ")
        .unwrap_or_else(|| panic!("{err}"));
    let documented = keys(SHIPPED);
    for key in expected
        .split(", ")
        .map(|k| k.trim_matches(|c: char| c == '`' || !c.is_ascii_graphic()))
        .map(|k| k.split('`').next().unwrap_or(k))
        .filter(|k| !k.is_empty())
    {
        assert!(
            documented.iter().any(|d| d == key),
            "config key \"{key}\" is missing from packaging/meshsec.toml"
        );
    }
    let mut unique = documented.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), documented.len(), "a key is listed twice");
}

#[test]
fn the_unit_uses_the_agents_default_paths() {
    let line = |key: &str| {
        UNIT.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("{key}= missing from the unit"))
    };
    assert_eq!(line("Type"), "notify");
    assert_eq!(
        line("ExecStart"),
        "/usr/bin/meshsec agent --config /etc/meshsec/meshsec.toml"
    );
    assert_eq!(line("ConditionPathExists"), DEFAULT_SECRET_FILE);
    assert_eq!(
        Path::new("/var/lib").join(line("StateDirectory")),
        Path::new(DEFAULT_STATE_DIR)
    );
    assert_eq!(
        Some(Path::new("/run").join(line("RuntimeDirectory")).as_path()),
        Path::new(DEFAULT_CONTROL_SOCKET).parent()
    );
    assert_eq!(
        Some(
            Path::new("/etc")
                .join(line("ConfigurationDirectory"))
                .as_path()
        ),
        Path::new(DEFAULT_SECRET_FILE).parent()
    );
    assert!(line("WatchdogSec").ends_with('s'));
    assert_eq!(line("ExecReload"), "/bin/kill -HUP $MAINPID");
}

#[test]
fn the_changelog_is_at_the_crate_version() {
    let first = CHANGELOG.lines().next().unwrap();
    assert!(
        first.starts_with(&format!("meshsec ({}) ", env!("CARGO_PKG_VERSION"))),
        "packaging/debian/changelog starts with {first:?}; add an entry for {}",
        env!("CARGO_PKG_VERSION")
    );
}
