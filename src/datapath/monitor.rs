//! Kernel XFRM events: SA expiry notifications and changes to the tables.
//!
//! The kernel announces on netlink multicast groups what happens to its XFRM
//! tables. meshsec listens to three:
//! - `XFRMNLGRP_EXPIRE`: an SA reached its soft limit (time to re-key) or
//!   its hard limit (the kernel deleted it);
//! - `XFRMNLGRP_SA` / `XFRMNLGRP_POLICY`: meshsec's SAs or policies were
//!   deleted, a table was flushed, or somebody replaced a policy in place
//!   on one of meshsec's selectors (`XFRM_MSG_UPDPOLICY` announces only the
//!   new policy, no deletion); the mesh re-reads the kernel soon after. Deletions of other daemons' objects are ignored, so a busy IKE
//!   daemon next to meshsec costs it no table dumps; so are meshsec's own
//!   (the kernel copies the requester's `nlmsg_pid` into the notification,
//!   and the datapath's socket puts its port id there: [`own_write`]).
//!
//! Parsing ([`parse_event`]) is pure and never panics on short or odd input;
//! [`XfrmMonitor`] only moves bytes. Multicast delivery is lossy: when the
//! socket's buffer overflows the kernel drops events and reports `ENOBUFS`,
//! which becomes [`KernelEvent::Overrun`] (the mesh then re-reads
//! everything, and checks SA counters against the limits itself).

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use netlink_packet_xfrm::{
    UserPolicyInfo, UserSaInfo, AF_INET, AF_INET6, IPPROTO_ESP, XFRMA_POLICY, XFRMA_SA,
    XFRMNLGRP_EXPIRE, XFRMNLGRP_POLICY, XFRMNLGRP_SA, XFRM_MODE_TRANSPORT, XFRM_MSG_DELPOLICY,
    XFRM_MSG_DELSA, XFRM_MSG_EXPIRE, XFRM_MSG_FLUSHPOLICY, XFRM_MSG_FLUSHSA, XFRM_MSG_UPDPOLICY,
    XFRM_POLICY_IN, XFRM_POLICY_OUT, XFRM_USER_POLICY_ID_LEN, XFRM_USER_POLICY_INFO_LEN,
    XFRM_USER_SA_ID_LEN, XFRM_USER_SA_INFO_LEN,
};
use netlink_sys::{protocols::NETLINK_XFRM, Socket};

use super::netlink::{attr, frames, u32_at, Frame};
use super::ownership::{
    is_owned_reqid, ND_BYPASS_PRIORITY, POLICY_PRIORITY, PROTECT_BLOCK_PRIORITY,
    PROTECT_EXEMPT_PRIORITY,
};
use super::{Direction, SaId};

/// Something the kernel announced that the mesh acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelEvent {
    /// A meshsec SA reached a lifetime limit: soft (`hard == false`: re-key
    /// now, the SA still works) or hard (the kernel has deleted it).
    Expire {
        /// The SA.
        sa: SaId,
        /// Hard limit (SA gone) rather than soft.
        hard: bool,
    },
    /// A meshsec SA or policy was deleted (possibly by meshsec itself), or a
    /// table was flushed.
    TablesChanged,
    /// Somebody replaced a policy in place (`ip xfrm policy update`, a
    /// daemon's `XFRM_MSG_UPDPOLICY`): the kernel announces only the new
    /// policy, so a meshsec policy on the same selector can be gone without
    /// any deletion notice. The mesh decides whether the selector is one of
    /// its own ([`crate::mesh::Mesh::handle_kernel_event`]).
    PolicyReplaced {
        /// Selector source address.
        src: std::net::IpAddr,
        /// Selector source prefix length.
        src_len: u8,
        /// Selector destination address.
        dst: std::net::IpAddr,
        /// Selector destination prefix length.
        dst_len: u8,
        /// Policy direction (only `in` and `out` are reported).
        direction: Direction,
    },
    /// Events were lost (receive buffer overflow).
    Overrun,
}

/// Decodes one multicast message; `None` for anything the mesh ignores
/// (other message types, SAs that are not meshsec's, short payloads).
pub fn parse_event(ty: u16, payload: &[u8]) -> Option<KernelEvent> {
    match ty {
        XFRM_MSG_EXPIRE => {
            // struct xfrm_user_expire: xfrm_usersa_info, then `hard` (u8).
            let hard = *payload.get(XFRM_USER_SA_INFO_LEN)?;
            let info = UserSaInfo::parse(payload.get(..XFRM_USER_SA_INFO_LEN)?).ok()?;
            if info.id.proto != IPPROTO_ESP
                || info.mode != XFRM_MODE_TRANSPORT
                || !is_owned_reqid(info.reqid)
            {
                return None;
            }
            let dst = match info.family {
                AF_INET => std::net::IpAddr::V4(info.id.daddr.to_ipv4()),
                AF_INET6 => std::net::IpAddr::V6(info.id.daddr.to_ipv6()),
                _ => return None,
            };
            Some(KernelEvent::Expire {
                sa: SaId {
                    dst,
                    spi: info.id.spi,
                },
                hard: hard != 0,
            })
        }
        // struct xfrm_usersa_id, then XFRMA_SA: the deleted SA's xfrm_usersa_info.
        XFRM_MSG_DELSA => match attr(payload, XFRM_USER_SA_ID_LEN, XFRMA_SA) {
            Some(info) if info.len() >= XFRM_USER_SA_INFO_LEN => {
                is_owned_reqid(u32_at(info, SA_INFO_REQID)?).then_some(KernelEvent::TablesChanged)
            }
            // Not the layout we know: when in doubt, re-read.
            _ => Some(KernelEvent::TablesChanged),
        },
        // struct xfrm_userpolicy_id, then XFRMA_POLICY: the deleted policy's xfrm_userpolicy_info.
        XFRM_MSG_DELPOLICY => match attr(payload, XFRM_USER_POLICY_ID_LEN, XFRMA_POLICY) {
            Some(info) if info.len() >= XFRM_USER_POLICY_INFO_LEN => {
                let priority = u32_at(info, POLICY_INFO_PRIORITY)?;
                [
                    POLICY_PRIORITY,
                    ND_BYPASS_PRIORITY,
                    PROTECT_EXEMPT_PRIORITY,
                    PROTECT_BLOCK_PRIORITY,
                ]
                .contains(&priority)
                .then_some(KernelEvent::TablesChanged)
            }
            _ => Some(KernelEvent::TablesChanged),
        },
        XFRM_MSG_FLUSHSA | XFRM_MSG_FLUSHPOLICY => Some(KernelEvent::TablesChanged),
        // struct xfrm_userpolicy_info, then attributes (the templates).
        XFRM_MSG_UPDPOLICY => {
            let info = UserPolicyInfo::parse(payload.get(..XFRM_USER_POLICY_INFO_LEN)?).ok()?;
            let direction = match info.direction {
                XFRM_POLICY_IN => Direction::In,
                XFRM_POLICY_OUT => Direction::Out,
                _ => return None,
            };
            let sel = &info.selector;
            let (src, dst) = match sel.family {
                AF_INET => (
                    std::net::IpAddr::V4(sel.saddr.to_ipv4()),
                    std::net::IpAddr::V4(sel.daddr.to_ipv4()),
                ),
                AF_INET6 => (
                    std::net::IpAddr::V6(sel.saddr.to_ipv6()),
                    std::net::IpAddr::V6(sel.daddr.to_ipv6()),
                ),
                _ => return None,
            };
            Some(KernelEvent::PolicyReplaced {
                src,
                src_len: sel.prefixlen_s,
                dst,
                dst_len: sel.prefixlen_d,
                direction,
            })
        }
        _ => None,
    }
}

/// Whether a notification reports a change the datapath's own socket
/// (netlink port `writer`) asked for: the kernel puts the requester's
/// `nlmsg_pid` in the notification of a deletion or flush; its own events
/// (expiry) carry 0, and so do requests that leave the field at 0 (iproute2).
pub fn own_write(pid: u32, writer: Option<u32>) -> bool {
    pid != 0 && Some(pid) == writer
}

/// Decodes one frame of the monitor socket, dropping the notifications of
/// the datapath's own writes (port `writer`).
fn event_of(frame: &Frame<'_>, writer: Option<u32>) -> Option<KernelEvent> {
    if own_write(frame.pid, writer) {
        return None;
    }
    parse_event(frame.ty, frame.payload)
}

/// Offset of `reqid` in `struct xfrm_usersa_info` (after sel, id, saddr,
/// lft, curlft, stats, seq).
const SA_INFO_REQID: usize = 208;
/// Offset of `priority` in `struct xfrm_userpolicy_info` (after sel, lft, curlft).
const POLICY_INFO_PRIORITY: usize = 152;

/// A netlink socket subscribed to the XFRM expire, SA and policy groups.
pub struct XfrmMonitor {
    sock: Socket,
    buf: Vec<u8>,
    /// The datapath socket's port id: notifications of its writes are dropped.
    writer: Option<u32>,
}

impl XfrmMonitor {
    /// Opens a non-blocking socket subscribed to the three groups. The
    /// notifications of changes made through the netlink port `writer`
    /// ([`crate::datapath::XfrmDatapath::portid`]) are dropped: the mesh
    /// knows what it changed.
    pub fn open(writer: Option<u32>) -> io::Result<XfrmMonitor> {
        let mut sock = Socket::new(NETLINK_XFRM)?;
        sock.bind_auto()?;
        for group in [XFRMNLGRP_EXPIRE, XFRMNLGRP_SA, XFRMNLGRP_POLICY] {
            sock.add_membership(group)?;
        }
        // A flush of a big table announces every object; a large buffer makes
        // overruns rare (and they are handled anyway).
        let _ = sock.set_rx_buf_sz(4 << 20);
        sock.set_non_blocking(true)?;
        Ok(XfrmMonitor {
            sock,
            buf: Vec::with_capacity(1 << 16),
            writer,
        })
    }

    /// Reads every queued datagram, appending what it decodes to `out`.
    /// Returns once the socket would block.
    pub fn read_events(&mut self, out: &mut Vec<KernelEvent>) -> io::Result<()> {
        loop {
            self.buf.clear();
            match self.sock.recv(&mut self.buf, 0) {
                Ok(_) => {
                    for frame in frames(&self.buf) {
                        if let Some(ev) = event_of(&frame, self.writer) {
                            out.push(ev);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => out.push(KernelEvent::Overrun),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsRawFd for XfrmMonitor {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{Aead, Direction, Lifetimes, Reqid, SaSpec};
    use netlink_packet_core::Emitable;

    /// A `struct xfrm_user_expire` as the kernel sends it, built from the
    /// same SA message meshsec installs.
    fn expire_payload(spi: u32, dst: std::net::IpAddr, reqid: Reqid, hard: bool) -> Vec<u8> {
        let sa = SaSpec {
            src: "192.0.2.1".parse().unwrap(),
            dst,
            spi,
            direction: Direction::Out,
            reqid,
            aead: Aead::Aes128Gcm,
            key: vec![7; 20].into(),
            replay_window: 0,
            lifetimes: Lifetimes::default(),
        };
        let msg =
            crate::datapath::xfrm::sa_message(&sa, crate::datapath::KernelFlavor { sa_dir: false });
        let mut info = vec![0u8; msg.user_sa_info.buffer_len()];
        msg.user_sa_info.emit(&mut info);
        assert_eq!(info.len(), XFRM_USER_SA_INFO_LEN);
        info.push(hard as u8);
        info.extend_from_slice(&[0; 7]);
        info
    }

    #[test]
    fn decodes_soft_and_hard_expire_of_owned_sas() {
        let dst = "192.0.2.2".parse().unwrap();
        let soft = expire_payload(0xc0ffee01, dst, Reqid::DEFAULT, false);
        assert_eq!(
            parse_event(XFRM_MSG_EXPIRE, &soft),
            Some(KernelEvent::Expire {
                sa: SaId {
                    dst,
                    spi: 0xc0ffee01
                },
                hard: false
            })
        );
        let v6 = "2001:db8::2".parse().unwrap();
        let hard = expire_payload(0x1234, v6, Reqid::DEFAULT, true);
        assert_eq!(
            parse_event(XFRM_MSG_EXPIRE, &hard),
            Some(KernelEvent::Expire {
                sa: SaId {
                    dst: v6,
                    spi: 0x1234
                },
                hard: true
            })
        );
    }

    #[test]
    fn ignores_foreign_short_and_other_messages() {
        let dst = "192.0.2.2".parse().unwrap();
        let mut foreign = expire_payload(5, dst, Reqid::DEFAULT, false);
        // reqid lives at offset 208 of xfrm_usersa_info (after sel, id, saddr, lft, curlft, stats, seq).
        foreign[208..212].copy_from_slice(&42u32.to_ne_bytes());
        assert_eq!(parse_event(XFRM_MSG_EXPIRE, &foreign), None);
        let owned = expire_payload(5, dst, Reqid::DEFAULT, false);
        for n in 0..owned.len().min(XFRM_USER_SA_INFO_LEN + 1) {
            assert_eq!(
                parse_event(XFRM_MSG_EXPIRE, &owned[..n]),
                None,
                "prefix of {n} bytes"
            );
        }
        assert_eq!(
            parse_event(XFRM_MSG_FLUSHSA, &[]),
            Some(KernelEvent::TablesChanged)
        );
        // Deletions in an unknown layout count, to be safe.
        assert_eq!(
            parse_event(XFRM_MSG_DELPOLICY, &[1, 2]),
            Some(KernelEvent::TablesChanged)
        );
        assert_eq!(
            parse_event(XFRM_MSG_DELSA, &[0; 30]),
            Some(KernelEvent::TablesChanged)
        );
        assert_eq!(parse_event(0x10 /* NEWSA */, &owned), None);
    }
}

#[cfg(test)]
mod deletion_tests {
    use super::*;
    use crate::datapath::{Direction, PolicySpec, Reqid};
    use netlink_packet_core::Emitable;

    /// A deletion notification as the kernel lays it out: the id header,
    /// then one attribute holding the deleted object's full info.
    fn notification(header: usize, kind: u16, info: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; header];
        p.extend_from_slice(&((4 + info.len()) as u16).to_ne_bytes());
        p.extend_from_slice(&kind.to_ne_bytes());
        p.extend_from_slice(info);
        p
    }

    fn sa_info(reqid: u32) -> Vec<u8> {
        let sa = crate::datapath::suite::sa(
            "192.0.2.1",
            "192.0.2.2",
            9,
            Direction::Out,
            crate::datapath::Aead::Aes128Gcm,
        );
        let msg =
            crate::datapath::xfrm::sa_message(&sa, crate::datapath::KernelFlavor { sa_dir: false });
        let mut info = vec![0u8; msg.user_sa_info.buffer_len()];
        msg.user_sa_info.emit(&mut info);
        info[SA_INFO_REQID..SA_INFO_REQID + 4].copy_from_slice(&reqid.to_ne_bytes());
        info
    }

    fn policy_info(priority: u32) -> Vec<u8> {
        let [p, _] = PolicySpec::pair(
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            Reqid::DEFAULT,
        );
        let msg = crate::datapath::xfrm::policy_message(&p);
        let mut info = vec![0u8; msg.user_policy_info.buffer_len()];
        msg.user_policy_info.emit(&mut info);
        assert_eq!(u32_at(&info, POLICY_INFO_PRIORITY), Some(POLICY_PRIORITY));
        info[POLICY_INFO_PRIORITY..POLICY_INFO_PRIORITY + 4]
            .copy_from_slice(&priority.to_ne_bytes());
        info
    }

    #[test]
    fn only_deletions_of_meshsec_objects_count() {
        let ours = Reqid::DEFAULT.get();
        let del_sa = |reqid| {
            parse_event(
                XFRM_MSG_DELSA,
                &notification(XFRM_USER_SA_ID_LEN, XFRMA_SA, &sa_info(reqid)),
            )
        };
        assert_eq!(del_sa(ours), Some(KernelEvent::TablesChanged));
        assert_eq!(del_sa(7), None, "another daemon's SA");
        let del_pol = |prio| {
            parse_event(
                XFRM_MSG_DELPOLICY,
                &notification(XFRM_USER_POLICY_ID_LEN, XFRMA_POLICY, &policy_info(prio)),
            )
        };
        assert_eq!(del_pol(POLICY_PRIORITY), Some(KernelEvent::TablesChanged));
        assert_eq!(
            del_pol(ND_BYPASS_PRIORITY),
            Some(KernelEvent::TablesChanged)
        );
        // A strict-mode range block removed by hand is put back at once.
        assert_eq!(
            del_pol(PROTECT_BLOCK_PRIORITY),
            Some(KernelEvent::TablesChanged)
        );
        assert_eq!(
            del_pol(PROTECT_EXEMPT_PRIORITY),
            Some(KernelEvent::TablesChanged)
        );
        assert_eq!(del_pol(0), None, "another daemon's policy");
        // The same deletion caused by the datapath's own socket is dropped;
        // by anyone else's port (or with no port: iproute2, the kernel), kept.
        let payload = notification(XFRM_USER_SA_ID_LEN, XFRMA_SA, &sa_info(ours));
        let frame = |pid| Frame {
            ty: XFRM_MSG_DELSA,
            flags: 0,
            seq: 1,
            pid,
            payload: &payload,
        };
        assert_eq!(event_of(&frame(4242), Some(4242)), None, "own delete");
        for (pid, writer) in [(0, Some(4242)), (7, Some(4242)), (0, None), (4242, None)] {
            assert_eq!(
                event_of(&frame(pid), writer),
                Some(KernelEvent::TablesChanged),
                "pid {pid}, writer {writer:?}"
            );
        }
        // Another attribute first (e.g. a mark) is skipped over.
        let mut p = notification(XFRM_USER_SA_ID_LEN, 21, &[0; 8]);
        p.extend_from_slice(&notification(0, XFRMA_SA, &sa_info(7)));
        assert_eq!(parse_event(XFRM_MSG_DELSA, &p), None);
        // Truncated anywhere: never a panic.
        let full = notification(XFRM_USER_SA_ID_LEN, XFRMA_SA, &sa_info(7));
        for n in 0..full.len() {
            let _ = parse_event(XFRM_MSG_DELSA, &full[..n]);
        }
    }

    /// `ip xfrm policy update` (or a daemon's UPDPOLICY) on a meshsec
    /// selector replaces meshsec's policy without any deletion notice; the
    /// notification carries only the new policy (here another daemon's
    /// priority). It is reported with its selector; other directions and
    /// short payloads are not, and nothing panics.
    #[test]
    fn an_in_place_policy_replacement_is_reported_with_its_selector() {
        let foreign = policy_info(0);
        assert_eq!(
            parse_event(XFRM_MSG_UPDPOLICY, &foreign),
            Some(KernelEvent::PolicyReplaced {
                src: "192.0.2.1".parse().unwrap(),
                src_len: 32,
                dst: "192.0.2.2".parse().unwrap(),
                dst_len: 32,
                direction: Direction::Out,
            })
        );
        // Templates follow as attributes: still the same event.
        let mut with_tmpl = foreign.clone();
        with_tmpl.extend_from_slice(&[8, 0, 5, 0, 0, 0, 0, 0]);
        assert!(parse_event(XFRM_MSG_UPDPOLICY, &with_tmpl).is_some());
        // A forward policy is nothing meshsec installs.
        let mut fwd = foreign.clone();
        fwd[160] = 2;
        assert_eq!(parse_event(XFRM_MSG_UPDPOLICY, &fwd), None);
        for n in 0..foreign.len() {
            assert_eq!(parse_event(XFRM_MSG_UPDPOLICY, &foreign[..n]), None);
        }
        // The agent's own update is dropped like its deletions.
        let frame = Frame {
            ty: XFRM_MSG_UPDPOLICY,
            flags: 0,
            seq: 1,
            pid: 4242,
            payload: &foreign,
        };
        assert_eq!(event_of(&frame, Some(4242)), None);
        assert!(event_of(&frame, Some(7)).is_some());
    }
}
