//! The agent under a real `NOTIFY_SOCKET` (what systemd gives a `Type=notify`
//! unit): the real binary with `--datapath memory`, a Unix datagram socket
//! bound here standing in for the service manager. Needs root, like the
//! agent (its gossip transport creates a network namespace).

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{assert_root, free_port, secret, BIN};

struct Agent {
    child: Child,
    control: PathBuf,
    gossip: SocketAddr,
    handshake: SocketAddr,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts an agent on `ip` with the given service-manager environment.
fn start(
    dir: &Path,
    name: &str,
    ip: &str,
    seed: Option<SocketAddr>,
    env: &[(&str, String)],
) -> Agent {
    let gossip: SocketAddr = format!("{ip}:{}", free_port(ip)).parse().unwrap();
    let handshake: SocketAddr = format!("{ip}:{}", free_port(ip)).parse().unwrap();
    let control = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new(BIN);
    cmd.args(["agent", "--datapath", "memory", "--node-name", name])
        .arg("--listen")
        .arg(gossip.to_string())
        .arg("--handshake-port")
        .arg(handshake.port().to_string())
        .arg("--secret-file")
        .arg(secret(dir))
        .arg("--state-dir")
        .arg(dir.join(format!("{name}.state")))
        .arg("--control-socket")
        .arg(&control)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(s) = seed {
        cmd.arg("--seed").arg(s.to_string());
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    Agent {
        child: cmd.spawn().unwrap(),
        control,
        gossip,
        handshake,
    }
}

/// The next notification, or `None` once `deadline` passed.
fn recv(sock: &UnixDatagram, deadline: Instant) -> Option<String> {
    let left = deadline.checked_duration_since(Instant::now())?;
    sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            None
        }
        Err(e) => panic!("recv: {e}"),
    }
}

fn manager(dir: &Path) -> (UnixDatagram, String) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    (sock, path.to_str().unwrap().to_string())
}

/// Every socket the agent serves is bound at the moment it says READY=1.
fn assert_bound(a: &Agent) {
    UnixStream::connect(&a.control).expect("control socket accepts connections");
    for addr in [a.gossip, a.handshake] {
        let e = UdpSocket::bind(addr).expect_err("the agent's UDP port is bound");
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{addr}: {e}");
    }
}

fn wait_ready(sock: &UnixDatagram, a: &mut Agent) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let Some(msg) = recv(sock, deadline) else {
            panic!(
                "no READY=1 within 30 s (agent exit: {:?})",
                a.child.try_wait()
            )
        };
        if msg.lines().any(|l| l == "READY=1") {
            assert_bound(a);
            return msg;
        }
        // Nothing but status may come before ready.
        assert!(
            msg.lines().all(|l| l.starts_with("STATUS=")),
            "before READY=1: {msg:?}"
        );
    }
}

fn stop_and_expect_stopping(sock: &UnixDatagram, mut a: Agent) {
    // SAFETY: plain kill(2) to our own child.
    assert_eq!(unsafe { libc::kill(a.child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut stopping = false;
    while let Some(msg) = recv(sock, deadline) {
        if msg.lines().any(|l| l == "STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
    let st = a.child.wait().unwrap();
    assert_eq!(st.code(), Some(0), "agent exit status");
}

#[test]
fn ready_after_sockets_are_bound_then_watchdog_keepalives() {
    assert_root();
    let dir = tempfile::tempdir().unwrap();
    let (sock, path) = manager(dir.path());
    let mut a = start(
        dir.path(),
        "n1",
        "127.0.0.1",
        None,
        &[
            ("NOTIFY_SOCKET", path),
            ("WATCHDOG_USEC", "1000000".into()),
            ("WATCHDOG_PID", std::process::id().to_string()),
        ],
    );
    // WATCHDOG_PID names another process (this test), so no keep-alives yet:
    // the agent only pings for itself (sd_watchdog_enabled(3)).
    let msg = wait_ready(&sock, &mut a);
    assert!(
        msg.contains("STATUS=0/0 peers alive, 0/0 links established"),
        "{msg:?}"
    );
    let deadline = Instant::now() + Duration::from_millis(1500);
    while let Some(m) = recv(&sock, deadline) {
        assert!(
            !m.contains("WATCHDOG=1"),
            "keep-alive for another pid: {m:?}"
        );
    }
    stop_and_expect_stopping(&sock, a);

    // Now the watchdog is ours: keep-alives every half period (500 ms). (A
    // 1 s period leaves a loaded test machine room to be late by up to one
    // half period without the assertion below failing for the wrong reason.)
    let dir = tempfile::tempdir().unwrap();
    let (sock, path) = manager(dir.path());
    let mut a = start(
        dir.path(),
        "n1",
        "127.0.0.1",
        None,
        &[("NOTIFY_SOCKET", path), ("WATCHDOG_USEC", "1000000".into())],
    );
    wait_ready(&sock, &mut a);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(3);
    let mut pings = Vec::new();
    while let Some(m) = recv(&sock, deadline) {
        if m.lines().any(|l| l == "WATCHDOG=1") {
            pings.push(start.elapsed());
        }
    }
    assert!(
        pings.len() >= 4,
        "expected a keep-alive about every 500 ms for 3 s, got {pings:?}"
    );
    let max_gap = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(
        max_gap < Duration::from_millis(1000),
        "keep-alives {max_gap:?} apart, beyond the 1 s watchdog: {pings:?}"
    );
    stop_and_expect_stopping(&sock, a);
}

#[test]
fn status_follows_members() {
    assert_root();
    let dir = tempfile::tempdir().unwrap();
    let (sock, path) = manager(dir.path());
    let mut a = start(
        dir.path(),
        "s1",
        "127.0.0.3",
        None,
        &[("NOTIFY_SOCKET", path)],
    );
    wait_ready(&sock, &mut a);
    // Loopback data addresses make no links (not a usable peer address), so
    // the links part stays 0/0 here; the unit test in src/notify.rs counts them.
    let wait_for = |want: &str, seen: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(m) = recv(&sock, deadline) {
            assert!(!m.contains("WATCHDOG=1"), "no WATCHDOG_USEC, yet {m:?}");
            seen.push(m.clone());
            if m.contains(want) {
                return;
            }
        }
        panic!("no {want:?} within 30 s: {seen:?}");
    };
    let mut seen = Vec::new();
    let b = start(dir.path(), "s2", "127.0.0.4", Some(a.gossip), &[]);
    wait_for("STATUS=1/1 peers alive, 0/0 links established", &mut seen);
    drop(b); // SIGKILL: the peer goes silent and is declared dead.
    wait_for("STATUS=0/1 peers alive, 0/0 links established", &mut seen);
    // Sent on change only: no two consecutive identical status lines.
    for w in seen.windows(2) {
        assert_ne!(w[0], w[1], "status repeated: {seen:?}");
    }
    stop_and_expect_stopping(&sock, a);
}
