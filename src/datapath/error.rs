//! Typed datapath errors: every error names the operation and, for kernel
//! refusals, the errno and the kernel's extended-ack message.

use std::fmt;

/// The XFRM operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Opening/binding the `NETLINK_XFRM` socket.
    Open,
    /// Start-up probe.
    Probe,
    /// `XFRM_MSG_ALLOCSPI`.
    AllocSpi,
    /// `XFRM_MSG_NEWSA`.
    NewSa,
    /// `XFRM_MSG_UPDSA`.
    UpdSa,
    /// `XFRM_MSG_DELSA`.
    DelSa,
    /// `XFRM_MSG_GETSA` (single SA).
    GetSa,
    /// `XFRM_MSG_GETSA` dump.
    DumpSa,
    /// `XFRM_MSG_NEWPOLICY`.
    NewPolicy,
    /// `XFRM_MSG_DELPOLICY`.
    DelPolicy,
    /// `XFRM_MSG_GETPOLICY` (single policy).
    GetPolicy,
    /// `XFRM_MSG_GETPOLICY` dump.
    DumpPolicy,
    /// `setsockopt(IP_XFRM_POLICY / IPV6_XFRM_POLICY)`.
    SocketBypass,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Open => "open NETLINK_XFRM socket",
            Op::Probe => "datapath probe",
            Op::AllocSpi => "XFRM_MSG_ALLOCSPI",
            Op::NewSa => "XFRM_MSG_NEWSA",
            Op::UpdSa => "XFRM_MSG_UPDSA",
            Op::DelSa => "XFRM_MSG_DELSA",
            Op::GetSa => "XFRM_MSG_GETSA",
            Op::DumpSa => "XFRM_MSG_GETSA dump",
            Op::NewPolicy => "XFRM_MSG_NEWPOLICY",
            Op::DelPolicy => "XFRM_MSG_DELPOLICY",
            Op::GetPolicy => "XFRM_MSG_GETPOLICY",
            Op::DumpPolicy => "XFRM_MSG_GETPOLICY dump",
            Op::SocketBypass => "setsockopt XFRM_POLICY bypass",
        })
    }
}

/// Coarse classification callers branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The object already exists (`EEXIST`).
    AlreadyExists,
    /// The object does not exist (`ESRCH` for SAs, `ENOENT` for policies).
    NotFound,
    /// The object exists but is not meshsec's; meshsec leaves it alone.
    NotOwned,
    /// The kernel lacks something meshsec needs (see the message for the fix).
    Unsupported,
    /// Missing privilege (`EPERM`): the agent needs CAP_NET_ADMIN.
    Permission,
    /// The request was malformed (caught before the kernel saw it).
    Invalid,
    /// Anything else.
    Other,
}

/// A datapath failure.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The kernel refused a request.
    #[error("{op} on {target}: {} (errno {errno}){}", errno_name(*.errno), ext(.message))]
    Kernel {
        /// Which request.
        op: Op,
        /// What it was about (SA id, policy selector, ...).
        target: String,
        /// Positive errno.
        errno: i32,
        /// The kernel's extended-ack message, if it sent one.
        message: Option<String>,
    },
    /// A delete named an object that belongs to somebody else.
    #[error("{op} on {target}: not owned by meshsec ({why}); left untouched")]
    NotOwned {
        /// Which request.
        op: Op,
        /// What it was about.
        target: String,
        /// Which ownership check failed.
        why: String,
    },
    /// The kernel lacks a feature; `fix` says how to get it.
    #[error("{what}: {fix}")]
    Unsupported {
        /// What is missing.
        what: String,
        /// How to fix it (module or config option).
        fix: String,
    },
    /// The request was rejected before reaching the kernel.
    #[error("{op}: invalid request: {reason}")]
    Invalid {
        /// Which request.
        op: Op,
        /// Why.
        reason: String,
    },
    /// Socket-level I/O failed.
    #[error("{op}: {source}")]
    Io {
        /// Which request.
        op: Op,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel's answer could not be decoded.
    #[error("{op}: undecodable reply: {reason}")]
    Decode {
        /// Which request.
        op: Op,
        /// Why.
        reason: String,
    },
}

fn ext(m: &Option<String>) -> String {
    match m {
        Some(m) if !m.is_empty() => format!(": {m}"),
        _ => String::new(),
    }
}

impl DatapathError {
    /// Coarse classification.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DatapathError::Kernel { errno, .. } => match *errno {
                libc::EEXIST => ErrorKind::AlreadyExists,
                libc::ESRCH | libc::ENOENT => ErrorKind::NotFound,
                libc::EPERM | libc::EACCES => ErrorKind::Permission,
                libc::ENOSYS | libc::EPROTONOSUPPORT | libc::EAFNOSUPPORT => ErrorKind::Unsupported,
                _ => ErrorKind::Other,
            },
            DatapathError::NotOwned { .. } => ErrorKind::NotOwned,
            DatapathError::Unsupported { .. } => ErrorKind::Unsupported,
            DatapathError::Invalid { .. } => ErrorKind::Invalid,
            DatapathError::Io { source, .. } => match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => ErrorKind::Permission,
                Some(libc::EPROTONOSUPPORT) | Some(libc::EAFNOSUPPORT) => ErrorKind::Unsupported,
                _ => ErrorKind::Other,
            },
            DatapathError::Decode { .. } => ErrorKind::Other,
        }
    }

    /// The kernel errno, if this is a kernel refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            DatapathError::Kernel { errno, .. } => Some(*errno),
            DatapathError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// The kernel's extended-ack message, if any.
    pub fn kernel_message(&self) -> Option<&str> {
        match self {
            DatapathError::Kernel { message, .. } => message.as_deref(),
            _ => None,
        }
    }
}

/// Symbolic errno name for the errors XFRM actually returns.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::ENOSYS => "ENOSYS",
        libc::ENOBUFS => "ENOBUFS",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        _ => "errno",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_error_names_op_and_errno() {
        let e = DatapathError::Kernel {
            op: Op::NewSa,
            target: "esp spi 0x00001000 dst 10.0.0.2".into(),
            errno: libc::ENOSYS,
            message: Some("Requested AEAD algorithm not found".into()),
        };
        let s = e.to_string();
        assert!(s.contains("XFRM_MSG_NEWSA"), "{s}");
        assert!(s.contains("ENOSYS (errno 38)"), "{s}");
        assert!(s.contains("Requested AEAD algorithm not found"), "{s}");
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let e = DatapathError::Kernel {
            op: Op::DelSa,
            target: String::new(),
            errno: libc::ESRCH,
            message: None,
        };
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }
}
