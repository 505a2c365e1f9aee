//! The datapath: the kernel's XFRM tables (SAs and policies) behind one trait.
//!
//! meshsec never moves packets itself. It installs, per peer, one inbound and
//! one outbound transport-mode ESP SA plus an `out` and an `in` policy with
//! host selectors and `level required`; the kernel then encrypts, and drops
//! plaintext between the two hosts (fail closed). The control plane's own
//! sockets escape those policies through [`bypass_socket`].
//!
//! Two implementations share the [`Datapath`] trait and one test suite:
//! - [`XfrmDatapath`]: XFRM netlink (netlink-packet-xfrm messages over a
//!   netlink-sys `NETLINK_XFRM` socket), the real thing;
//! - [`MemoryDatapath`]: an in-memory model with the kernel's semantics (SPI
//!   uniqueness, duplicate-add and delete-missing errors with the kernel's
//!   errnos), for unit tests and simulation, never as proof.
//!
//! Everything meshsec installs is recognisable by the ownership scheme in
//! [`ownership`] (reqid prefix + policy priority); dumps, deletes and flushes
//! only ever look at, and act on, meshsec-owned objects. See docs/xfrm.md.

use std::fmt;
use std::net::IpAddr;

use zeroize::Zeroizing;

mod bypass;
mod diff;
mod error;
mod memory;
mod monitor;
mod netlink;
pub mod offload;
pub mod ownership;
pub mod protect;
mod xfrm;

#[cfg(test)]
mod suite;

pub use crate::aead::{Aead, ICV_BITS};
pub use bypass::{bypass_socket, AddressFamily};
pub use diff::{diff, Change, KernelState};
pub use error::{DatapathError, ErrorKind, Op};
pub use memory::{MemoryDatapath, WriteCalls};
pub use monitor::{own_write, parse_event, KernelEvent, XfrmMonitor};
pub use ownership::{Reqid, POLICY_PRIORITY};
pub use protect::{range_policies, Prefix, RangePolicy, RangeRule};
pub use xfrm::{KernelFlavor, XfrmDatapath};

/// Minimum inbound anti-replay window (packets). ESP over a busy path reorders;
/// a small window turns reordering into drops.
pub const MIN_INBOUND_REPLAY_WINDOW: u32 = 1024;

/// Traffic direction of an SA or a policy, from this host's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Peer to us.
    In,
    /// Us to peer.
    Out,
}

/// Soft and hard lifetimes of an SA. `0` means "no limit" for every field.
/// The soft limit makes the kernel send an EXPIRE event (rekey time); the
/// hard limit deletes the SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Lifetimes {
    /// Soft limit on bytes.
    pub soft_bytes: u64,
    /// Hard limit on bytes.
    pub hard_bytes: u64,
    /// Soft limit on packets.
    pub soft_packets: u64,
    /// Hard limit on packets.
    pub hard_packets: u64,
    /// Soft limit on seconds since the SA was added.
    pub soft_seconds: u64,
    /// Hard limit on seconds since the SA was added.
    pub hard_seconds: u64,
}

/// Identity of an SA in the kernel: destination address + SPI (protocol is
/// always ESP for meshsec).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SaId {
    /// Destination address of the SA (the receiver).
    pub dst: IpAddr,
    /// Security parameter index, host byte order.
    pub spi: u32,
}

impl fmt::Display for SaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "esp spi 0x{:08x} dst {}", self.spi, self.dst)
    }
}

/// Everything needed to install one transport-mode ESP SA.
#[derive(Clone, PartialEq, Eq)]
pub struct SaSpec {
    /// Sender's address.
    pub src: IpAddr,
    /// Receiver's address.
    pub dst: IpAddr,
    /// SPI (chosen by the receiver through [`Datapath::alloc_spi`]).
    pub spi: u32,
    /// In (peer → us) or out (us → peer).
    pub direction: Direction,
    /// Ownership tag and link to the policies' template.
    pub reqid: Reqid,
    /// The AEAD transform.
    pub aead: Aead,
    /// Key material, `aead.key_len()` bytes (salt included).
    pub key: SaKey,
    /// Inbound anti-replay window in packets (≥ [`MIN_INBOUND_REPLAY_WINDOW`]).
    /// Ignored for outbound SAs, whose window is the kernel minimum.
    pub replay_window: u32,
    /// Soft/hard lifetimes.
    pub lifetimes: Lifetimes,
}

impl SaSpec {
    /// The kernel identity of this SA.
    pub fn id(&self) -> SaId {
        SaId {
            dst: self.dst,
            spi: self.spi,
        }
    }
}

// Keys never reach logs.
impl fmt::Debug for SaSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaSpec")
            .field("src", &self.src)
            .field("dst", &self.dst)
            .field("spi", &format_args!("0x{:08x}", self.spi))
            .field("direction", &self.direction)
            .field("reqid", &self.reqid)
            .field("aead", &self.aead)
            .field("key", &self.key)
            .field("replay_window", &self.replay_window)
            .field("lifetimes", &self.lifetimes)
            .finish()
    }
}

/// SA key material (key ‖ salt, the kernel's layout): zeroed on drop,
/// redacted in Debug, so no copy of a session key outlives its SA spec.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SaKey(Zeroizing<Vec<u8>>);

impl SaKey {
    /// The raw bytes, for the netlink message (and simulation checks).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<&[u8]> for SaKey {
    fn from(bytes: &[u8]) -> SaKey {
        SaKey(Zeroizing::new(bytes.to_vec()))
    }
}

impl From<Vec<u8>> for SaKey {
    fn from(bytes: Vec<u8>) -> SaKey {
        SaKey(Zeroizing::new(bytes))
    }
}

// Keys never reach logs, also when a key is formatted on its own.
impl fmt::Debug for SaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes redacted>", self.0.len())
    }
}

/// Kernel counters of one SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct SaCounters {
    /// Bytes processed (decrypted for inbound, encrypted for outbound).
    pub bytes: u64,
    /// Packets processed.
    pub packets: u64,
    /// Packets dropped as replays (`stats.replay`).
    pub replay: u32,
    /// Packets that failed ICV/integrity checks (`stats.integrity_failed`).
    pub integrity_failed: u32,
}

/// A meshsec-owned SA as found in the kernel (no key material: the kernel
/// returns keys in dumps, but they are dropped on parse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaState {
    /// Sender's address.
    pub src: IpAddr,
    /// Receiver's address.
    pub dst: IpAddr,
    /// SPI, host byte order.
    pub spi: u32,
    /// Ownership tag.
    pub reqid: Reqid,
    /// Direction: the kernel's `XFRMA_SA_DIR` if it reports one, otherwise
    /// inferred from the replay window (outbound SAs carry the minimum).
    /// `None` for a larval SA (allocated SPI not yet filled).
    pub direction: Option<Direction>,
    /// The AEAD, `None` for a larval SA or an unknown transform.
    pub aead: Option<Aead>,
    /// Anti-replay window in packets (ESN state).
    pub replay_window: u32,
    /// True while the SA is only an SPI reservation from `ALLOCSPI`.
    pub larval: bool,
    /// Configured lifetimes.
    pub lifetimes: Lifetimes,
    /// Traffic and error counters.
    pub counters: SaCounters,
}

impl SaState {
    /// The kernel identity of this SA.
    pub fn id(&self) -> SaId {
        SaId {
            dst: self.dst,
            spi: self.spi,
        }
    }
}

/// Traffic with one peer, summed over its SAs (old and new during a rekey).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerCounters {
    /// Bytes received from the peer (inbound SAs).
    pub bytes_in: u64,
    /// Bytes sent to the peer (outbound SAs).
    pub bytes_out: u64,
    /// Packets received from the peer.
    pub packets_in: u64,
    /// Packets sent to the peer.
    pub packets_out: u64,
    /// Replayed packets dropped on inbound SAs.
    pub replay: u64,
    /// Packets failing integrity checks on inbound SAs.
    pub integrity_failed: u64,
    /// Inbound SPIs (complete SAs only).
    pub spis_in: Vec<u32>,
    /// Outbound SPIs.
    pub spis_out: Vec<u32>,
}

/// Sum a dump's SAs for one peer: inbound SAs come from `peer`, outbound go
/// to it. Larval SAs are skipped.
pub fn peer_counters(sas: &[SaState], peer: IpAddr) -> PeerCounters {
    let mut c = PeerCounters::default();
    for s in sas.iter().filter(|s| !s.larval) {
        match s.direction {
            Some(Direction::In) if s.src == peer => {
                c.bytes_in += s.counters.bytes;
                c.packets_in += s.counters.packets;
                c.replay += u64::from(s.counters.replay);
                c.integrity_failed += u64::from(s.counters.integrity_failed);
                c.spis_in.push(s.spi);
            }
            Some(Direction::Out) if s.dst == peer => {
                c.bytes_out += s.counters.bytes;
                c.packets_out += s.counters.packets;
                c.spis_out.push(s.spi);
            }
            _ => {}
        }
    }
    c
}

/// Identity of a policy: host selector + direction. For `Out`, `src` is the
/// local address and `dst` the peer; for `In` the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyId {
    /// Selector source address (/32 or /128).
    pub src: IpAddr,
    /// Selector destination address (/32 or /128).
    pub dst: IpAddr,
    /// Policy direction.
    pub direction: Direction,
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = match self.direction {
            Direction::In => "in",
            Direction::Out => "out",
        };
        write!(f, "policy {} -> {} dir {dir}", self.src, self.dst)
    }
}

/// A policy meshsec installs: host selectors, all protocols, action allow,
/// one required ESP transport template carrying `reqid`, priority
/// [`POLICY_PRIORITY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicySpec {
    /// Selector and direction.
    pub id: PolicyId,
    /// Template reqid (also the ownership tag).
    pub reqid: Reqid,
}

impl PolicySpec {
    /// The pair of policies protecting traffic between `local` and `peer`.
    pub fn pair(local: IpAddr, peer: IpAddr, reqid: Reqid) -> [PolicySpec; 2] {
        [
            PolicySpec {
                id: PolicyId {
                    src: local,
                    dst: peer,
                    direction: Direction::Out,
                },
                reqid,
            },
            PolicySpec {
                id: PolicyId {
                    src: peer,
                    dst: local,
                    direction: Direction::In,
                },
                reqid,
            },
        ]
    }
}

/// A meshsec-owned policy as found in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyState {
    /// What it is.
    pub spec: PolicySpec,
    /// Kernel-assigned policy index.
    pub index: u32,
}

/// An XFRM policy meshsec did not install, as `meshsec doctor` reads it to
/// find policies that would win over meshsec's (lower priority number) for a
/// pair meshsec protects. Only the `in` and `out` directions: host traffic
/// never meets `fwd` policies, and per-socket policies are not global.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignPolicy {
    /// Kernel policy index.
    pub index: u32,
    /// `In` or `Out`.
    pub direction: Direction,
    /// Priority: lower wins.
    pub priority: u32,
    /// Selector source prefix.
    pub src: IpAddr,
    /// Its length in bits.
    pub src_len: u8,
    /// Selector destination prefix.
    pub dst: IpAddr,
    /// Its length in bits.
    pub dst_len: u8,
    /// IP protocol the selector is limited to (0: all).
    pub proto: u8,
    /// Action block (drop) rather than allow.
    pub block: bool,
    /// Number of templates (0 with allow: traffic passes in clear).
    pub templates: usize,
    /// Carries a mark or an interface id: applies only to traffic so marked.
    pub marked: bool,
}

impl ForeignPolicy {
    /// Whether its selector's addresses take in traffic from `src` to `dst`
    /// (protocol and port limits aside: such a policy shadows part of it).
    pub fn covers(&self, src: IpAddr, dst: IpAddr) -> bool {
        prefix_covers(self.src, self.src_len, src) && prefix_covers(self.dst, self.dst_len, dst)
    }

    /// The selector as `ip xfrm policy` prints it, for messages.
    pub fn describe(&self) -> String {
        let dir = match self.direction {
            Direction::In => "in",
            Direction::Out => "out",
        };
        let action = match (self.block, self.templates) {
            (true, _) => "block".to_string(),
            (false, 0) => "allow, no template (clear text)".to_string(),
            (false, n) => format!("allow, {n} template(s)"),
        };
        let proto = if self.proto == 0 {
            String::new()
        } else {
            format!(" proto {}", self.proto)
        };
        format!(
            "src {}/{} dst {}/{}{proto} dir {dir} priority {} index {} ({action}{})",
            self.src,
            self.src_len,
            self.dst,
            self.dst_len,
            self.priority,
            self.index,
            if self.marked {
                ", marked traffic only"
            } else {
                ""
            }
        )
    }
}

/// Whether `net/len` contains `addr` (same family only).
pub fn prefix_covers(net: IpAddr, len: u8, addr: IpAddr) -> bool {
    fn masked(bytes: &[u8], len: u8) -> Vec<u8> {
        bytes
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let bits = (len as usize).saturating_sub(i * 8).min(8);
                if bits == 0 {
                    0
                } else {
                    b & (0xffu8 << (8 - bits))
                }
            })
            .collect()
    }
    match (net, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) if len <= 32 => {
            masked(&n.octets(), len) == masked(&a.octets(), len)
        }
        (IpAddr::V6(n), IpAddr::V6(a)) if len <= 128 => {
            masked(&n.octets(), len) == masked(&a.octets(), len)
        }
        _ => false,
    }
}

/// What [`Datapath::flush_owned`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlushReport {
    /// SAs deleted.
    pub sas: usize,
    /// Policies deleted.
    pub policies: usize,
}

/// What [`Datapath::probe`] found besides "it works".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeReport {
    /// ESP GSO offload per family (empty for the in-memory datapath).
    pub esp_offload: offload::OffloadReport,
}

/// The kernel's XFRM tables as meshsec sees them.
///
/// Methods are synchronous: netlink to the local kernel answers in
/// microseconds. Every method that removes something refuses to act on an
/// object that is not meshsec-owned ([`ErrorKind::NotOwned`]).
pub trait Datapath: Send {
    /// Before anything is installed: check XFRM user support, ESP for each
    /// family and the chosen AEAD, by adding and deleting throwaway SAs on
    /// documentation-prefix addresses. Returns one error naming what is
    /// missing and how to fix it. Then makes sure ESP GSO offload is loaded
    /// for each family ([`offload`]); that part never fails, the report says
    /// what it found.
    fn probe(
        &mut self,
        aead: Aead,
        families: &[AddressFamily],
    ) -> Result<ProbeReport, DatapathError>;

    /// Reserve a fresh inbound SPI for `src → dst` (`XFRM_MSG_ALLOCSPI`).
    /// The kernel holds a larval SA with that SPI (for `xfrm_acq_expires`,
    /// 30 s by default) until [`Datapath::update_sa`] fills it.
    fn alloc_spi(&mut self, src: IpAddr, dst: IpAddr, reqid: Reqid) -> Result<u32, DatapathError>;

    /// Add a new SA (`XFRM_MSG_NEWSA`). Fails with `AlreadyExists` if the
    /// (dst, SPI) pair is taken.
    fn install_sa(&mut self, sa: &SaSpec) -> Result<(), DatapathError>;

    /// Fill the larval SA created by `alloc_spi` (`XFRM_MSG_UPDSA`). On an SA
    /// that is already complete the kernel only updates its lifetimes; keys
    /// never change under an SPI. Fails with `NotFound` if no SA exists.
    fn update_sa(&mut self, sa: &SaSpec) -> Result<(), DatapathError>;

    /// Delete a meshsec-owned SA. `NotFound` if missing.
    fn delete_sa(&mut self, id: SaId) -> Result<(), DatapathError>;

    /// Add a policy. `AlreadyExists` if a policy (anyone's) has the same
    /// selector and direction.
    fn install_policy(&mut self, policy: &PolicySpec) -> Result<(), DatapathError>;

    /// Delete a meshsec-owned policy. `NotFound` if missing.
    fn delete_policy(&mut self, id: PolicyId) -> Result<(), DatapathError>;

    /// Add one of strict mode's range policies (an IPv6 one brings the ND
    /// bypasses). `AlreadyExists` if a policy (anyone's) has its selector
    /// and direction.
    fn install_range_policy(&mut self, policy: &RangePolicy) -> Result<(), DatapathError>;

    /// Delete one of strict mode's range policies. `NotFound` if meshsec
    /// holds no such policy (somebody else's on that selector is never
    /// touched).
    fn delete_range_policy(&mut self, policy: &RangePolicy) -> Result<(), DatapathError>;

    /// All of strict mode's range policies in the kernel.
    fn dump_range_policies(&mut self) -> Result<Vec<RangePolicy>, DatapathError>;

    /// The host-pair policies and the range policies, from one look at the
    /// table where the implementation can (the reconciler's observe step).
    fn dump_all_policies(&mut self) -> Result<(Vec<PolicyState>, Vec<RangePolicy>), DatapathError> {
        Ok((self.dump_policies()?, self.dump_range_policies()?))
    }

    /// All meshsec-owned SAs with counters.
    fn dump_sas(&mut self) -> Result<Vec<SaState>, DatapathError>;

    /// The current state (counters included) of just these SAs, one
    /// `XFRM_MSG_GETSA` each, pipelined in one round trip: one entry per id,
    /// `None` for an SA that is not there or not meshsec's. What the mesh
    /// reads at steady state instead of dumping the table.
    fn get_sas(&mut self, ids: &[SaId]) -> Result<Vec<Option<SaState>>, DatapathError>;

    /// All meshsec-owned policies.
    fn dump_policies(&mut self) -> Result<Vec<PolicyState>, DatapathError>;

    /// Make sure the four IPv6 neighbour-discovery bypass policies exist
    /// (ICMPv6 types 135/136, in and out, any address; see docs/xfrm.md).
    /// Without them a host-to-host IPv6 policy whose SAs are missing also
    /// blocks neighbour solicitations/advertisements between the two hosts,
    /// and then even the bypassed control-plane sockets cannot reach the
    /// peer. `install_policy` and `apply` call this for every IPv6 policy;
    /// it is idempotent and cheap after the first call.
    fn ensure_nd_bypass(&mut self) -> Result<(), DatapathError>;

    /// How many of meshsec's neighbour-discovery bypass policies exist (0-4).
    fn nd_bypass_count(&mut self) -> Result<usize, DatapathError>;

    /// Remove meshsec's neighbour-discovery bypass policies; returns how many.
    fn remove_nd_bypass(&mut self) -> Result<usize, DatapathError>;

    /// A confirmation probe for the inbound SA `sa` arrived on the handshake
    /// port. The kernel counted it already (it came through ESP), so this
    /// does nothing there; the in-memory datapath, which carries no packets,
    /// counts it here as the kernel would, so that memory-mode agents confirm
    /// sessions like real ones.
    fn probe_arrived(&mut self, _sa: SaId) {}

    /// Delete every meshsec-owned policy, then every meshsec-owned SA.
    /// Policies go first so traffic is never sent unprotected: with the
    /// policies gone and before the SAs go, packets simply flow in clear as
    /// they would on a host without meshsec.
    fn flush_owned(&mut self) -> Result<FlushReport, DatapathError> {
        let mut report = FlushReport::default();
        for p in self.dump_range_policies()? {
            match self.delete_range_policy(&p) {
                Ok(()) => report.policies += 1,
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        for p in self.dump_policies()? {
            match self.delete_policy(p.spec.id) {
                Ok(()) => report.policies += 1,
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        report.policies += self.remove_nd_bypass()?;
        for sa in self.dump_sas()? {
            match self.delete_sa(sa.id()) {
                Ok(()) => report.sas += 1,
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }

    /// Apply a list of changes in order, returning one result per change.
    /// The kernel implementation pipelines them over netlink (many requests
    /// per datagram), which is what makes bulk installs fast.
    fn apply(&mut self, changes: &[Change]) -> Vec<Result<(), DatapathError>> {
        apply_one_by_one(self, changes)
    }
}

/// [`Datapath::apply`] as one call per change, in order.
pub(crate) fn apply_one_by_one<D: Datapath + ?Sized>(
    dp: &mut D,
    changes: &[Change],
) -> Vec<Result<(), DatapathError>> {
    changes
        .iter()
        .map(|c| match c {
            Change::AddSa(sa) => dp.install_sa(sa),
            Change::FillSa(sa) => dp.update_sa(sa),
            Change::DeleteSa(id) => dp.delete_sa(*id),
            Change::AddPolicy(p) => dp.install_policy(p),
            Change::DeletePolicy(id) => dp.delete_policy(*id),
            Change::AddRange(p) => dp.install_range_policy(p),
            Change::DeleteRange(p) => dp.delete_range_policy(p),
        })
        .collect()
}

/// Checks shared by both implementations so they reject exactly the same
/// specs, before anything reaches the kernel.
pub(crate) fn validate_sa(op: Op, sa: &SaSpec) -> Result<(), DatapathError> {
    let invalid = |reason: String| Err(DatapathError::Invalid { op, reason });
    if sa.src.is_ipv4() != sa.dst.is_ipv4() {
        return invalid(format!("mixed address families {} -> {}", sa.src, sa.dst));
    }
    if sa.key.as_bytes().len() != sa.aead.key_len() {
        return invalid(format!(
            "{} needs a {}-byte key (salt included), got {}",
            sa.aead,
            sa.aead.key_len(),
            sa.key.as_bytes().len()
        ));
    }
    // SPIs 1..=255 are reserved by IANA; 0 means "none".
    if sa.spi < 0x100 {
        return invalid(format!("SPI 0x{:x} is reserved", sa.spi));
    }
    if sa.direction == Direction::In && sa.replay_window < MIN_INBOUND_REPLAY_WINDOW {
        return invalid(format!(
            "inbound replay window {} is below {}",
            sa.replay_window, MIN_INBOUND_REPLAY_WINDOW
        ));
    }
    // The ESN bitmap is capped by the kernel at XFRMA_REPLAY_ESN_MAX bytes.
    if sa.replay_window > 4096 * 8 {
        return invalid(format!("replay window {} exceeds 32768", sa.replay_window));
    }
    Ok(())
}

pub(crate) fn validate_range(op: Op, p: &RangePolicy) -> Result<(), DatapathError> {
    if !p.is_valid() {
        return Err(DatapathError::Invalid {
            op,
            reason: format!("mixed address families in {p}"),
        });
    }
    Ok(())
}

pub(crate) fn validate_policy(op: Op, p: &PolicySpec) -> Result<(), DatapathError> {
    if p.id.src.is_ipv4() != p.id.dst.is_ipv4() {
        return Err(DatapathError::Invalid {
            op,
            reason: format!("mixed address families {} -> {}", p.id.src, p.id.dst),
        });
    }
    Ok(())
}

/// Helper for sorting dumps deterministically.
pub(crate) fn sort_sas(mut v: Vec<SaState>) -> Vec<SaState> {
    v.sort_by_key(|s| s.id());
    v
}

pub(crate) fn sort_policies(mut v: Vec<PolicyState>) -> Vec<PolicyState> {
    v.sort_by_key(|p| p.spec.id);
    v
}
