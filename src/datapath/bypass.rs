//! Per-socket XFRM bypass for the control plane's sockets.
//!
//! A socket policy takes precedence over the global policy table: with an
//! ALLOW policy without templates in both directions, the gossip and
//! handshake sockets keep talking in clear even while meshsec's `level
//! required` policies drop all other plaintext between the two hosts, and
//! even when SAs are missing or broken.

use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_core::Emitable;
use netlink_packet_xfrm::{
    LifetimeConfig, Selector, UserPolicyInfo, AF_INET, AF_INET6, XFRM_POLICY_ALLOW, XFRM_POLICY_IN,
    XFRM_POLICY_OUT, XFRM_SHARE_ANY, XFRM_USER_POLICY_INFO_LEN,
};

use super::{DatapathError, Op};

/// `IP_XFRM_POLICY` from `<linux/in.h>`.
const IP_XFRM_POLICY: libc::c_int = 17;
/// `IPV6_XFRM_POLICY` from `<linux/in6.h>`.
const IPV6_XFRM_POLICY: libc::c_int = 35;

/// IP version of a socket or an underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddressFamily {
    /// IPv4 (`AF_INET`).
    V4,
    /// IPv6 (`AF_INET6`).
    V6,
}

impl AddressFamily {
    /// The family of an address.
    pub fn of(addr: std::net::IpAddr) -> AddressFamily {
        if addr.is_ipv4() {
            AddressFamily::V4
        } else {
            AddressFamily::V6
        }
    }
}

impl fmt::Display for AddressFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressFamily::V4 => "IPv4",
            AddressFamily::V6 => "IPv6",
        })
    }
}

/// The `struct xfrm_userpolicy_info` bytes for a bypass in `dir`.
pub(crate) fn bypass_policy_bytes(
    family: AddressFamily,
    dir: u8,
) -> [u8; XFRM_USER_POLICY_INFO_LEN] {
    let info = UserPolicyInfo {
        // The kernel validates the selector family even for socket policies.
        selector: Selector {
            family: match family {
                AddressFamily::V4 => AF_INET,
                AddressFamily::V6 => AF_INET6,
            },
            ..Default::default()
        },
        lifetime_cfg: LifetimeConfig::default(),
        direction: dir,
        action: XFRM_POLICY_ALLOW,
        share: XFRM_SHARE_ANY,
        ..Default::default()
    };
    let mut buf = [0u8; XFRM_USER_POLICY_INFO_LEN];
    info.emit(&mut buf);
    buf
}

/// Exempt one socket from all XFRM policies, inbound and outbound.
///
/// `family` is the socket's own family (`AF_INET` sockets take
/// `IP_XFRM_POLICY`, `AF_INET6` sockets `IPV6_XFRM_POLICY`). Both directions
/// are needed: without the inbound one, replies to the socket are dropped
/// (`XfrmInTmplMismatch`).
pub fn bypass_socket(fd: BorrowedFd<'_>, family: AddressFamily) -> Result<(), DatapathError> {
    let (level, opt) = match family {
        AddressFamily::V4 => (libc::IPPROTO_IP, IP_XFRM_POLICY),
        AddressFamily::V6 => (libc::IPPROTO_IPV6, IPV6_XFRM_POLICY),
    };
    for dir in [XFRM_POLICY_IN, XFRM_POLICY_OUT] {
        let buf = bypass_policy_bytes(family, dir);
        // SAFETY: buf outlives the call and its length is passed alongside.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                opt,
                buf.as_ptr().cast(),
                buf.len() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(DatapathError::Io {
                op: Op::SocketBypass,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bypass_bytes_layout() {
        let b = bypass_policy_bytes(AddressFamily::V6, XFRM_POLICY_OUT);
        // selector.family at offset 16+16+8 = 40 (after daddr, saddr, ports).
        assert_eq!(u16::from_ne_bytes([b[40], b[41]]), AF_INET6);
        // priority, index, then dir/action/flags/share after selector (56),
        // lifetime cfg (64) and cur (32): 152 priority, 156 index, 160 dir.
        assert_eq!(b[160], XFRM_POLICY_OUT);
        assert_eq!(b[161], XFRM_POLICY_ALLOW);
        // Byte and packet limits are infinite.
        assert_eq!(&b[56..64], &u64::MAX.to_ne_bytes());
    }
}
