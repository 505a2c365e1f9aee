//! Request/ack/dump plumbing over a `NETLINK_XFRM` socket.
//!
//! Requests are pipelined: up to [`PIPELINE`] messages go out in one datagram
//! (the kernel processes them one by one and answers each), then replies are
//! read until every request has its ACK/ERROR (or, for dumps, DONE/ERROR).
//! Framing is parsed here rather than by netlink-packet-core so that the
//! extended-ack message (`NLMSGERR_ATTR_MSG`, e.g. "Requested AEAD algorithm
//! not found") reaches the typed error.

use std::io;

use netlink_packet_core::Emitable;
use netlink_packet_xfrm::XfrmMessage;
use netlink_sys::{protocols::NETLINK_XFRM, Socket, SocketAddr};

pub(crate) const NLMSG_HDRLEN: usize = 16;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CAPPED: u16 = 0x100;
/// Set on dump parts when the table changed during the dump.
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;

/// Requests per datagram. Each answer costs an skb (~1 KiB of truesize) in
/// the receive buffer, so the pipeline depth stays well below what the
/// enlarged receive buffer holds.
pub(crate) const PIPELINE: usize = 128;

const RECV_BUF: usize = 1 << 16;

/// One netlink message from the kernel, header fields + payload.
#[derive(Debug, Clone)]
pub(crate) struct RawMsg {
    pub ty: u16,
    pub payload: Vec<u8>,
}

/// How one request ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Acknowledged (or dump finished); any data messages that came first.
    Done(Vec<RawMsg>),
    /// Refused with a positive errno and the extended-ack message.
    Error { errno: i32, message: Option<String> },
}

pub(crate) struct Request {
    pub msg: XfrmMessage,
    pub dump: bool,
}

pub(crate) struct NlSocket {
    sock: Socket,
    /// The socket's netlink port id: put in every request's `nlmsg_pid`, so
    /// the kernel's multicast notifications of our own changes carry it.
    portid: u32,
    seq: u32,
    rx: Vec<u8>,
    tx: Vec<u8>,
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Serialise one request with its netlink header into `out`; `portid` is
/// the sender's port (the kernel copies it into the notifications the
/// request causes).
pub(crate) fn encode(msg: &XfrmMessage, flags: u16, seq: u32, portid: u32, out: &mut Vec<u8>) {
    let payload_len = msg.buffer_len();
    let len = NLMSG_HDRLEN + payload_len;
    let start = out.len();
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&msg.message_type().to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&portid.to_ne_bytes());
    out.resize(start + len, 0);
    msg.emit(&mut out[start + NLMSG_HDRLEN..start + len]);
    out.resize(start + align4(len), 0);
}

pub(crate) fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    b.get(off..off + 2)
        .map(|s| u16::from_ne_bytes([s[0], s[1]]))
}

/// The value of the first attribute of type `kind` (flag bits masked off)
/// after a fixed header of `header` bytes; `None` if absent or if the
/// framing breaks before it.
pub(crate) fn attr(payload: &[u8], header: usize, kind: u16) -> Option<&[u8]> {
    let mut off = header;
    while off + 4 <= payload.len() {
        let (len, ty) = (
            usize::from(u16_at(payload, off)?),
            u16_at(payload, off + 2)? & 0x3fff,
        );
        if len < 4 || off + len > payload.len() {
            return None;
        }
        if ty == kind {
            return Some(&payload[off + 4..off + len]);
        }
        off += align4(len);
    }
    None
}

/// One netlink message of a datagram.
pub(crate) struct Frame<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    /// `nlmsg_pid`: for a notification, the port of the request that caused it.
    pub pid: u32,
    pub payload: &'a [u8],
}

/// Split a datagram into frames. Malformed framing ends the walk: what came
/// before is still delivered.
pub(crate) fn frames(buf: &[u8]) -> Vec<Frame<'_>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let (Some(len), Some(ty), Some(flags), Some(seq), Some(pid)) = (
            u32_at(buf, off),
            u16_at(buf, off + 4),
            u16_at(buf, off + 6),
            u32_at(buf, off + 8),
            u32_at(buf, off + 12),
        ) else {
            break;
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        out.push(Frame {
            ty,
            flags,
            seq,
            pid,
            payload: &buf[off + NLMSG_HDRLEN..off + len],
        });
        off += align4(len);
    }
    out
}

/// Decode an NLMSG_ERROR / NLMSG_DONE payload: (errno ≥ 0, ext-ack message).
pub(crate) fn parse_error(ty: u16, flags: u16, payload: &[u8]) -> (i32, Option<String>) {
    let code = payload
        .get(0..4)
        .map(|s| i32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
        .unwrap_or(-libc::EIO);
    let errno = code.checked_neg().unwrap_or(libc::EIO).max(0);
    if flags & NLM_F_ACK_TLVS == 0 {
        return (errno, None);
    }
    // ERROR: code + original header (+ original payload unless capped).
    // DONE: code only.
    let tlv_start = if ty == NLMSG_ERROR {
        let orig_len = u32_at(payload, 4).unwrap_or(0) as usize;
        if flags & NLM_F_CAPPED != 0 {
            4 + NLMSG_HDRLEN
        } else {
            4 + align4(orig_len.max(NLMSG_HDRLEN))
        }
    } else {
        4
    };
    let message = attr(payload, tlv_start, NLMSGERR_ATTR_MSG).map(|v| {
        let v = v.split(|b| *b == 0).next().unwrap_or(&[]);
        String::from_utf8_lossy(v).into_owned()
    });
    (errno, message)
}

impl NlSocket {
    pub(crate) fn open() -> io::Result<NlSocket> {
        let mut sock = Socket::new(NETLINK_XFRM)?;
        let portid = sock.bind_auto()?.port_number();
        sock.connect(&SocketAddr::new(0, 0))?;
        // Extended acks carry the kernel's reason in words; capped acks keep
        // each ACK small. Both are best-effort (older kernels lack them).
        let _ = sock.set_ext_ack(true);
        let _ = sock.set_cap_ack(true);
        // A pipeline of answers must fit in the receive buffer.
        let _ = sock.set_rx_buf_sz(4 << 20);
        Ok(NlSocket {
            sock,
            portid,
            seq: 0,
            rx: Vec::with_capacity(RECV_BUF),
            tx: Vec::new(),
        })
    }

    /// The socket's netlink port id (see [`NlSocket::portid`]'s field).
    pub(crate) fn portid(&self) -> u32 {
        self.portid
    }

    /// Send every request and collect one outcome per request, in order.
    /// An I/O error aborts the whole call.
    pub(crate) fn transact(&mut self, reqs: &[Request]) -> io::Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(reqs.len());
        for chunk in reqs.chunks(PIPELINE) {
            self.transact_chunk(chunk, &mut outcomes)?;
        }
        Ok(outcomes)
    }

    fn transact_chunk(&mut self, reqs: &[Request], outcomes: &mut Vec<Outcome>) -> io::Result<()> {
        // Dumps are multi-part and cannot share a datagram's reply stream
        // sensibly with other requests; send them alone.
        if reqs.len() > 1 && reqs.iter().any(|r| r.dump) {
            for r in reqs {
                self.transact_chunk(std::slice::from_ref(r), outcomes)?;
            }
            return Ok(());
        }
        let first_seq = self.seq.wrapping_add(1);
        self.tx.clear();
        // Only the last request asks for an ACK. The kernel handles a
        // datagram's messages in order, synchronously, and queues an ERROR
        // for every failing one whether or not it asked for an ACK; so once
        // the last ACK arrives, every earlier request without an ERROR has
        // succeeded. Half the replies, half the skbs.
        for (i, r) in reqs.iter().enumerate() {
            self.seq = self.seq.wrapping_add(1);
            let flags = if r.dump {
                NLM_F_REQUEST | NLM_F_DUMP
            } else if i + 1 == reqs.len() {
                NLM_F_REQUEST | NLM_F_ACK
            } else {
                NLM_F_REQUEST
            };
            encode(&r.msg, flags, self.seq, self.portid, &mut self.tx);
        }
        let sent = self.sock.send(&self.tx, 0);
        let len = self.tx.len();
        // The datagram carried SA keys: wipe it before the buffer is reused.
        zeroize::Zeroize::zeroize(&mut self.tx);
        if sent? != len {
            return Err(io::Error::other("short netlink send"));
        }
        let base = outcomes.len();
        let mut pending: Vec<Option<Outcome>> = (0..reqs.len()).map(|_| None).collect();
        let mut data: Vec<Vec<RawMsg>> = vec![Vec::new(); reqs.len()];
        let mut interrupted = vec![false; reqs.len()];
        let mut remaining = reqs.len();
        while remaining > 0 {
            self.rx.clear();
            let n = self.sock.recv(&mut self.rx, libc::MSG_TRUNC)?;
            if n > self.rx.capacity() {
                return Err(io::Error::other(format!(
                    "netlink reply of {n} bytes truncated"
                )));
            }
            for Frame {
                ty,
                flags,
                seq,
                payload,
                ..
            } in frames(&self.rx)
            {
                let idx = seq.wrapping_sub(first_seq) as usize;
                if idx >= reqs.len() || pending[idx].is_some() {
                    continue; // stale or unsolicited
                }
                match ty {
                    NLMSG_ERROR | NLMSG_DONE => {
                        let (errno, message) = parse_error(ty, flags, payload);
                        pending[idx] = Some(if errno == 0 && interrupted[idx] {
                            Outcome::Error {
                                errno: libc::EINTR,
                                message: Some("dump interrupted by a concurrent change".into()),
                            }
                        } else if errno == 0 {
                            Outcome::Done(std::mem::take(&mut data[idx]))
                        } else {
                            Outcome::Error { errno, message }
                        });
                        remaining -= 1;
                        if idx + 1 == reqs.len() {
                            // The final ACK: everything before it is settled.
                            for (j, slot) in pending.iter_mut().enumerate() {
                                if slot.is_none() {
                                    *slot = Some(Outcome::Done(std::mem::take(&mut data[j])));
                                    remaining -= 1;
                                }
                            }
                        }
                    }
                    _ if flags & NLM_F_DUMP_INTR != 0 => interrupted[idx] = true,
                    _ => data[idx].push(RawMsg {
                        ty,
                        payload: payload.to_vec(),
                    }),
                }
            }
        }
        outcomes.extend(pending.into_iter().map(|o| {
            o.unwrap_or(Outcome::Error {
                errno: libc::EIO,
                message: None,
            })
        }));
        debug_assert_eq!(outcomes.len(), base + reqs.len());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_capped_ext_ack() {
        // NLMSG_ERROR with -ENOSYS, capped original header, one MSG TLV.
        let mut p = Vec::new();
        p.extend_from_slice(&(-libc::ENOSYS).to_ne_bytes());
        p.extend_from_slice(&[0u8; 16]);
        let msg = b"Requested AEAD algorithm not found\0";
        p.extend_from_slice(&((4 + msg.len()) as u16).to_ne_bytes());
        p.extend_from_slice(&1u16.to_ne_bytes());
        p.extend_from_slice(msg);
        let (errno, m) = parse_error(NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, &p);
        assert_eq!(errno, libc::ENOSYS);
        assert_eq!(m.as_deref(), Some("Requested AEAD algorithm not found"));
        // A plain ACK.
        let (errno, m) = parse_error(NLMSG_ERROR, NLM_F_CAPPED, &[0u8; 20]);
        assert_eq!((errno, m), (0, None));
    }

    #[test]
    fn frames_stop_at_garbage() {
        let mut b = Vec::new();
        b.extend_from_slice(&20u32.to_ne_bytes());
        b.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&7u32.to_ne_bytes());
        b.extend_from_slice(&4242u32.to_ne_bytes());
        b.extend_from_slice(&0i32.to_ne_bytes());
        // Then a header claiming more bytes than there are.
        b.extend_from_slice(&999u32.to_ne_bytes());
        b.extend_from_slice(&[0u8; 12]);
        let f = frames(&b);
        assert_eq!(f.len(), 1);
        assert_eq!(
            (f[0].ty, f[0].seq, f[0].pid, f[0].payload.len()),
            (NLMSG_DONE, 7, 4242, 4)
        );
        assert!(frames(&[1, 2, 3]).is_empty());
    }
}
