//! Which links this node wants: a pure function of the membership view.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::datapath::AddressFamily;
use crate::gossip::members::{Member, MemberState};
use crate::handshake::PublicKey;

/// One (peer, family) link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId {
    /// The peer's static public key.
    pub peer: PublicKey,
    /// Address family.
    pub family: AddressFamily,
}

/// Where a link goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Peer name (for logs and the listing).
    pub name: String,
    /// Our data address of this family.
    pub local: IpAddr,
    /// The peer's data address of this family.
    pub remote: IpAddr,
    /// The peer's handshake endpoint.
    pub handshake: SocketAddr,
}

/// The links this node wants: every other member that is alive or suspect,
/// or dead for less than `grace` (a short flap breaks nothing), that
/// published a key, a handshake port and an address of a family we have.
/// Left members are dropped at once.
///
/// Addresses are checked, since a member could publish anything: only
/// unicast addresses that are not ours count; an address bound to a peer
/// (`bound.addrs`: it had a protected link to that key) stays that peer's,
/// whoever else claims it later, and a bound key (`bound.keys`) stays the
/// name's it was protected under; an unbound address (or key) claimed by
/// two members is used for neither. So one member can never make us require ESP towards
/// somebody else, nor make two other members lose their link. A member that
/// left claims nothing (its replacement may take its addresses).
pub fn wanted_links(
    self_key: &PublicKey,
    self_addrs: &[IpAddr],
    members: &[Member],
    grace: Duration,
    bound: &super::guard::Bound,
) -> BTreeMap<LinkId, Target> {
    let bindings = &bound.addrs;
    // A claim on a key bound to another name does not count, nor get a link.
    let owns_key = |m: &Member, k: &PublicKey| bound.keys.get(k).is_none_or(|n| *n == m.name);
    let mut claims: HashMap<IpAddr, usize> = HashMap::new();
    let mut keys: HashMap<PublicKey, usize> = HashMap::new();
    let claiming = members
        .iter()
        .filter(|m| !m.is_self && m.state != MemberState::Left);
    for m in claiming {
        let Some(k) = m.public_key else {
            continue;
        };
        if !owns_key(m, &k) {
            continue;
        }
        *keys.entry(k).or_default() += 1;
        for a in &m.data_addrs {
            // A claim on an address bound to another key does not count.
            if bindings.get(a).is_none_or(|owner| *owner == k) {
                *claims.entry(*a).or_default() += 1;
            }
        }
    }
    let usable = |a: &IpAddr, key: &PublicKey| {
        usable_peer_address(a)
            && !self_addrs.contains(a)
            && bindings.get(a).is_none_or(|owner| owner == key)
            && claims.get(a).copied().unwrap_or(0) == 1
    };
    let mut out = BTreeMap::new();
    for m in members {
        if m.is_self {
            continue;
        }
        let keep = match m.state {
            MemberState::Alive | MemberState::Suspect => true,
            MemberState::Dead => Duration::from_millis(m.last_heard_ms) < grace,
            MemberState::Left => false,
        };
        let (Some(key), Some(port)) = (m.public_key, m.handshake_port) else {
            continue;
        };
        if !keep
            || &key == self_key
            || !owns_key(m, &key)
            || keys.get(&key).copied().unwrap_or(0) != 1
            || m.protocol != Some(1)
        {
            continue;
        }
        for family in [AddressFamily::V4, AddressFamily::V6] {
            let local = self_addrs.iter().find(|a| AddressFamily::of(**a) == family);
            let remote = m
                .data_addrs
                .iter()
                .find(|a| AddressFamily::of(**a) == family && usable(a, &key));
            if let (Some(local), Some(remote)) = (local, remote) {
                out.insert(
                    LinkId { peer: key, family },
                    Target {
                        name: m.name.clone(),
                        local: *local,
                        remote: *remote,
                        handshake: SocketAddr::new(*remote, port),
                    },
                );
            }
        }
    }
    out
}

/// Whether a peer may be protected under this address: unicast, not
/// unspecified, loopback, multicast or broadcast.
pub fn usable_peer_address(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified() || v4.is_loopback() || v4.is_multicast() || v4.is_broadcast())
        }
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_loopback() || v6.is_multicast()),
    }
}
