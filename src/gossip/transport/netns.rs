//! The private network namespace holding the plaintext side of the sealed transport: a thread
//! that `unshare`s a namespace of its own, brings its `lo` up and creates sockets there on
//! request.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::TransportError;

/// The calling thread's network namespace's UDP receive-buffer drops (IPv4).
pub(super) fn udp_rcvbuf_errors() -> io::Result<u64> {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return Err(io::Error::other("no Udp lines in snmp"));
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| io::Error::other("no RcvbufErrors in snmp"))
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread living in a network namespace of its own, creating sockets there on request. The
/// namespace lasts as long as the thread or any socket created in it.
pub(super) struct PrivateNetns {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl PrivateNetns {
    pub(super) async fn spawn(thread_name: String) -> Result<Self, TransportError> {
        let (jobs, job_rx) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let entered = enter_private_netns();
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if !ok {
                    return;
                }
                // Ends when the transport drops its sender.
                while let Ok(job) = job_rx.recv() {
                    job();
                }
            })
            .map_err(TransportError::Namespace)?;
        ready_rx
            .await
            .map_err(|_| TransportError::NamespaceGone)?
            .map_err(TransportError::Namespace)?;
        Ok(PrivateNetns { jobs })
    }

    /// Runs `f` on the namespace's thread.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, TransportError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| TransportError::NamespaceGone)?;
        rx.await.map_err(|_| TransportError::NamespaceGone)
    }
}

/// Moves the calling thread (only) into a new network namespace and brings its loopback up.
fn enter_private_netns() -> io::Result<()> {
    // SAFETY: plain syscall; CLONE_NEWNET affects only the calling thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    bring_loopback_up()
}

fn bring_loopback_up() -> io::Result<()> {
    // SAFETY: plain syscall; the fd is owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an ifreq we own, with a NUL-terminated name.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut ifr) < 0 {
            return Err(io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &ifr) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
