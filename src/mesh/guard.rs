//! Fail closed for good: once traffic between this host and a peer address
//! has been protected, it is never sent in clear again because of anything
//! gossip says or fails to say. The pair's policies stay (with no SA the
//! kernel drops) until the peer leaves (`left`), the operator runs
//! `meshsec forget NAME`, or meshsec's state is flushed; and an address that
//! had a link to a peer key stays bound to that key.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::datapath::{PolicySpec, Reqid};
use crate::handshake::PublicKey;

/// Why a protected pair is blocked (its policies stay, without SAs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockReason {
    /// The peer is dead past the grace period, or gone from gossip.
    PeerUnreachable,
    /// The peer's record no longer gives a usable link (its address or key
    /// is claimed by another member, or it stopped publishing one).
    NoUsableRecord,
    /// Found in the kernel at start-up; no member re-keyed it in time.
    Adopted,
}

impl std::fmt::Display for BlockReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BlockReason::PeerUnreachable => "peer unreachable (dead or gone from gossip)",
            BlockReason::NoUsableRecord => "peer's record gives no usable link",
            BlockReason::Adopted => "left by a previous run, no member re-keyed it",
        })
    }
}

/// A blocked pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocked {
    /// Our address.
    pub local: IpAddr,
    /// The peer address.
    pub remote: IpAddr,
    /// The peer it was protected for, when known.
    pub peer: Option<(String, PublicKey)>,
    /// Why.
    pub reason: BlockReason,
    /// Since when (monotonic; the listing shows wall time).
    pub since: Instant,
}

/// A member's claim on an address bound to another peer: ignored.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Conflict {
    /// The claimant's node name.
    pub claimant: String,
    /// The address it claims.
    pub address: IpAddr,
    /// The peer the address is bound to.
    pub bound_to: String,
}

/// What is bound, for [`super::wanted_links`]: addresses to keys, keys to
/// the names that own them.
#[derive(Debug, Default, Clone)]
pub struct Bound {
    /// Peer address → the key it is bound to.
    pub addrs: BTreeMap<IpAddr, PublicKey>,
    /// Peer key → the name that owns it.
    pub keys: BTreeMap<PublicKey, String>,
}

/// Address bindings and blocked pairs.
#[derive(Debug, Default)]
pub struct Guard {
    /// Peer address → the key (and name) it is bound to.
    bindings: BTreeMap<IpAddr, (PublicKey, String)>,
    /// Peer key → the name it was first protected under.
    key_owners: BTreeMap<PublicKey, String>,
    /// (local, remote) → why its policies stay without SAs.
    blocked: BTreeMap<(IpAddr, IpAddr), Blocked>,
}

impl Guard {
    /// Claims in `members` on addresses bound to another key (ignored by
    /// [`super::wanted_links`]).
    pub fn conflicts(&self, members: &[crate::gossip::members::Member]) -> Vec<Conflict> {
        let mut out = Vec::new();
        for m in members
            .iter()
            .filter(|m| !m.is_self && m.state != crate::gossip::members::MemberState::Left)
        {
            let Some(k) = m.public_key else {
                continue;
            };
            for a in &m.data_addrs {
                if let Some((owner, name)) = self.bindings.get(a) {
                    if *owner != k {
                        out.push(Conflict {
                            claimant: m.name.clone(),
                            address: *a,
                            bound_to: name.clone(),
                        });
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// The address → key bindings.
    pub fn bindings(&self) -> BTreeMap<IpAddr, PublicKey> {
        self.bindings.iter().map(|(a, (k, _))| (*a, *k)).collect()
    }

    /// Addresses and keys bound so far, for [`super::wanted_links`].
    pub fn bound(&self) -> Bound {
        Bound {
            addrs: self.bindings(),
            keys: self.key_owners.clone(),
        }
    }

    /// Binds `remote` to `key` and `key` to `name` (once a link to them is
    /// protected), unless they are bound already.
    pub fn bind(&mut self, remote: IpAddr, key: PublicKey, name: &str) {
        self.bindings
            .entry(remote)
            .or_insert_with(|| (key, name.to_string()));
        self.key_owners
            .entry(key)
            .or_insert_with(|| name.to_string());
    }

    /// Releases `remote` if it is bound to `key` (the peer gave it up).
    pub fn unbind(&mut self, remote: IpAddr, key: &PublicKey) {
        if self.bindings.get(&remote).is_some_and(|(k, _)| k == key) {
            self.bindings.remove(&remote);
        }
    }

    /// Blocks a protected pair (first reason wins).
    pub fn block(&mut self, b: Blocked) {
        self.blocked.entry((b.local, b.remote)).or_insert(b);
    }

    /// Takes the pair out of the blocked set (a link protects it again).
    /// Returns whether it was blocked.
    pub fn unblock(&mut self, local: IpAddr, remote: IpAddr) -> bool {
        self.blocked.remove(&(local, remote)).is_some()
    }

    /// Releases what is held for the peer `name` with `key` (its own signed
    /// `left`): bindings and blocked pairs held for exactly that name and
    /// key, so another member's record carrying the same key releases
    /// nothing. Returns how many pairs were released.
    pub fn release(&mut self, name: &str, key: &PublicKey) -> usize {
        self.bindings.retain(|_, (k, n)| !(k == key && n == name));
        if self.key_owners.get(key).is_some_and(|n| n == name) {
            self.key_owners.remove(key);
        }
        let before = self.blocked.len();
        self.blocked.retain(|_, b| {
            b.peer
                .as_ref()
                .is_none_or(|(n, k)| !(k == key && n == name))
        });
        before - self.blocked.len()
    }

    /// Releases everything held for the peer `name`, and blocked pairs to
    /// `name` given as an address. Returns bindings + pairs released.
    pub fn forget(&mut self, name: &str) -> usize {
        let addr: Option<IpAddr> = name.parse().ok();
        let before = self.bindings.len() + self.blocked.len();
        self.bindings
            .retain(|a, (_, n)| n != name && Some(*a) != addr);
        self.key_owners.retain(|_, n| n != name);
        self.blocked.retain(|(_, remote), b| {
            b.peer.as_ref().is_none_or(|(n, _)| n != name) && Some(*remote) != addr
        });
        before - (self.bindings.len() + self.blocked.len())
    }

    /// The blocked pairs.
    pub fn blocked(&self) -> impl Iterator<Item = &Blocked> {
        self.blocked.values()
    }

    /// The policies every blocked pair keeps.
    pub fn policies(&self) -> Vec<PolicySpec> {
        self.blocked
            .keys()
            .flat_map(|(local, remote)| PolicySpec::pair(*local, *remote, Reqid::DEFAULT))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn bindings_keep_the_first_key_and_release_on_leave_or_forget() {
        let mut g = Guard::default();
        g.bind(ip("192.0.2.2"), [2; 32], "b");
        g.bind(ip("192.0.2.2"), [9; 32], "impostor");
        assert_eq!(g.bindings()[&ip("192.0.2.2")], [2; 32]);
        g.block(Blocked {
            local: ip("192.0.2.1"),
            remote: ip("192.0.2.2"),
            peer: Some(("b".into(), [2; 32])),
            reason: BlockReason::PeerUnreachable,
            since: Instant::now(),
        });
        assert_eq!(g.policies().len(), 2);
        assert_eq!(g.release("impostor", &[9; 32]), 0);
        assert_eq!(
            g.release("c", &[2; 32]),
            0,
            "another name with b's key releases nothing"
        );
        assert_eq!(g.forget("c"), 0);
        assert_eq!(g.forget("b"), 2);
        assert!(g.bindings().is_empty() && g.policies().is_empty());
    }
}
