//! The real binary: the agent's log lines carry no ANSI colour codes when
//! stderr is not a terminal (what journald and log files get), and
//! `meshsec doctor` against a live agent (memory datapath, loopback only).
//! Needs root, like the agent (its gossip transport creates a network
//! namespace).

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::{assert_root, free_port, secret, BIN};

struct Agent {
    child: Child,
    log: Arc<Mutex<Vec<u8>>>,
    args: Vec<String>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn log_text(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    fn wait_log(&self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log_text().contains(want) {
            assert!(
                Instant::now() < deadline,
                "no {want:?} within 30 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An agent with stderr to a pipe read by a thread.
fn start(dir: &Path, name: &str, ip: &str, seed: Option<&str>) -> Agent {
    let control = dir.join(format!("{name}.sock"));
    let mut args: Vec<String> = vec![
        "--datapath".into(),
        "memory".into(),
        "--node-name".into(),
        name.into(),
        "--listen".into(),
        format!("{ip}:{}", free_port(ip)),
        "--handshake-port".into(),
        free_port(ip).to_string(),
        "--secret-file".into(),
        secret(dir).display().to_string(),
        "--state-dir".into(),
        dir.join(format!("{name}.state")).display().to_string(),
        "--control-socket".into(),
        control.display().to_string(),
    ];
    if let Some(s) = seed {
        args.extend(["--seed".into(), s.into()]);
    }
    let mut child = Command::new(BIN)
        .arg("agent")
        .args(&args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut pipe = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    Agent { child, log, args }
}

fn listen_of(a: &Agent) -> String {
    let i = a.args.iter().position(|x| x == "--listen").unwrap();
    a.args[i + 1].clone()
}

#[test]
fn membership_logs_have_no_colour_codes_on_a_pipe_and_doctor_reads_the_agent() {
    assert_root();
    let dir = tempfile::tempdir().unwrap();
    let a = start(dir.path(), "la", "127.0.0.7", None);
    a.wait_log("agent started");
    let b = start(dir.path(), "lb", "127.0.0.8", Some(&listen_of(&a)));
    a.wait_log("membership changed");
    b.wait_log("membership changed");

    // doctor, with the agent's own flags: its kernel check fails (memory
    // datapath protects nothing), so it exits 1, and it sees the agent and
    // its peer (once the failure detector has it alive).
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        let out = Command::new(BIN)
            .arg("doctor")
            .args(&a.args)
            .args(["--json", "--sample-secs", "1"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains(r#""detail":"alive"#) || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let check = |name: &str| -> Vec<serde_json::Value> {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["name"] == name)
            .cloned()
            .collect()
    };
    assert_eq!(check("kernel")[0]["ok"], false);
    assert_eq!(check("agent")[0]["ok"], true, "{v}");
    assert_eq!(check("config")[0]["ok"], true, "{v}");
    assert_eq!(check("permissions")[0]["ok"], true, "{v}");
    let gossip = check("gossip");
    assert!(
        gossip.iter().any(|c| c["peer"] == "lb" && c["ok"] == true),
        "{v}"
    );
    // The peer's clock is ours: measured from its sealed gossip, within the window.
    assert!(
        check("clock")
            .iter()
            .any(|c| c["peer"] == "lb" && c["ok"] == true),
        "{v}"
    );
    // The text form: one line per check, each starting with a mark.
    let out = Command::new(BIN)
        .arg("doctor")
        .args(&a.args)
        .args(["--sample-secs", "1"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), v["checks"].as_array().unwrap().len());
    assert!(
        text.lines()
            .all(|l| l.starts_with("✔ ") || l.starts_with("✘ ")),
        "{text}"
    );
    assert!(text.contains("✘ kernel: "));

    drop(b);
    drop(a);
}

#[test]
fn agent_log_lines_are_plain_text_when_stderr_is_not_a_terminal() {
    assert_root();
    let dir = tempfile::tempdir().unwrap();
    let a = start(dir.path(), "pa", "127.0.0.9", None);
    a.wait_log("agent started");
    let b = start(dir.path(), "pb", "127.0.0.10", Some(&listen_of(&a)));
    a.wait_log("membership changed");
    b.wait_log("membership changed");
    let (la, lb) = (a.log_text(), b.log_text());
    drop(b);
    drop(a);
    for log in [&la, &lb] {
        // A warning (memory datapath), an info line and a membership change,
        // each on one line, none with an escape byte.
        assert!(log.contains(" WARN ") && log.contains(" INFO "), "{log}");
        assert!(
            log.lines()
                .any(|l| l.contains("membership changed") && l.contains("peer=")),
            "{log}"
        );
        assert!(
            !log.contains('\u{1b}'),
            "ANSI escape in a log written to a pipe:\n{log:?}"
        );
    }
}

#[test]
fn doctor_usage_errors_are_one_line_naming_the_flag() {
    for bad in [["--sample-secs", "0"], ["--sample-secs", "x"]] {
        let out = Command::new(BIN).arg("doctor").args(bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("--sample-secs"), "{err}");
        assert!(out.stdout.is_empty());
    }
}
