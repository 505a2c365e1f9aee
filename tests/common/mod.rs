//! Helpers shared by the integration tests that run the real binary.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The `meshsec` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_meshsec");

/// These tests run the agent, which creates a network namespace: root only.
pub fn assert_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test runs the agent, which creates a network namespace: run as root (CI is root)"
    );
}

/// A UDP port free on `ip` right now.
pub fn free_port(ip: &str) -> u16 {
    UdpSocket::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `dir/cluster.secret`, made by `meshsec init` the first time.
pub fn secret(dir: &Path) -> PathBuf {
    let path = dir.join("cluster.secret");
    if !path.exists() {
        let st = Command::new(BIN)
            .args(["init", "--out"])
            .arg(&path)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
    }
    path
}
