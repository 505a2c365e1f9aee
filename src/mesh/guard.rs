//! Fail closed for good: once traffic between this host and a peer address
//! has been protected, it is never sent in clear again because of anything
//! gossip says or fails to say. The pair's policies stay (with no SA the
//! kernel drops) until the peer leaves (`left`), the operator runs
//! `meshsec forget NAME`, or meshsec's state is flushed; and an address that
//! had a link to a peer key stays bound to that key.

use std::collections::{BTreeMap, BTreeSet};
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
    /// Protected before the host rebooted (its address binding was saved);
    /// waits for its link to re-key.
    Rebooted,
}

impl std::fmt::Display for BlockReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BlockReason::PeerUnreachable => "peer unreachable (dead or gone from gossip)",
            BlockReason::NoUsableRecord => "peer's record gives no usable link",
            BlockReason::Adopted => "left by a previous run, no member re-keyed it",
            BlockReason::Rebooted => "protected before the host rebooted, link not re-keyed yet",
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
    /// Blocked pairs restored from the state directory and not yet checked
    /// against the kernel (see [`Guard::drop_restored_absent`]).
    restored: BTreeSet<(IpAddr, IpAddr)>,
    /// Bumped by every change, so the driver saves only after one.
    revision: u64,
}

/// File in the state directory holding the guard (bindings and blocked
/// pairs), so that a restart keeps what fail-closed holds, and for whom.
pub const GUARD_FILE: &str = "guard.json";

/// The guard as saved in the state directory (keys in base64, times in
/// seconds since the epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardFile {
    /// Format version (1).
    pub version: u32,
    /// Peer address → key and name.
    pub bindings: Vec<SavedBinding>,
    /// Peer key → the name it was first protected under.
    pub key_owners: Vec<SavedOwner>,
    /// Blocked pairs.
    pub blocked: Vec<SavedBlocked>,
    /// The kernel's boot id when saved (`/proc/sys/kernel/random/boot_id`):
    /// after a reboot the kernel holds no policy, and that is no reason to
    /// release a pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

/// The running kernel's boot id, if it can be read.
pub fn current_boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// One address binding in [`GuardFile`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedBinding {
    /// Peer address.
    pub address: IpAddr,
    /// Peer Noise key (base64).
    pub key: String,
    /// Peer name.
    pub name: String,
}

/// One key owner in [`GuardFile`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedOwner {
    /// Peer Noise key (base64).
    pub key: String,
    /// The name it is bound to.
    pub name: String,
}

/// One blocked pair in [`GuardFile`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedBlocked {
    /// Our address.
    pub local: IpAddr,
    /// Peer address.
    pub remote: IpAddr,
    /// The peer's name, when known.
    pub peer: Option<String>,
    /// The peer's Noise key (base64), when known.
    pub key: Option<String>,
    /// Why it is blocked.
    pub reason: BlockReason,
    /// Since when (seconds since the epoch).
    pub since_unix: u64,
}

/// Why a saved guard cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardFileError {
    /// Unknown format version.
    #[error("version {0} is not 1")]
    Version(u32),
    /// A key is not base64 of 32 bytes.
    #[error("{0}: key is not base64 of 32 bytes")]
    BadKey(String),
    /// A blocked pair names a peer without a key, or a key without a peer.
    #[error("blocked pair {0}: peer and key go together")]
    HalfPeer(String),
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
        let before = (self.bindings.len(), self.key_owners.len());
        self.bindings
            .entry(remote)
            .or_insert_with(|| (key, name.to_string()));
        self.key_owners
            .entry(key)
            .or_insert_with(|| name.to_string());
        if before != (self.bindings.len(), self.key_owners.len()) {
            self.revision += 1;
        }
    }

    /// Releases `remote` if it is bound to `key` (the peer gave it up).
    pub fn unbind(&mut self, remote: IpAddr, key: &PublicKey) {
        if self.bindings.get(&remote).is_some_and(|(k, _)| k == key) {
            self.bindings.remove(&remote);
            self.revision += 1;
        }
    }

    /// Blocks a protected pair (first reason wins).
    pub fn block(&mut self, b: Blocked) {
        if let std::collections::btree_map::Entry::Vacant(e) =
            self.blocked.entry((b.local, b.remote))
        {
            e.insert(b);
            self.revision += 1;
        }
    }

    /// Takes the pair out of the blocked set (a link protects it again).
    /// Returns whether it was blocked.
    pub fn unblock(&mut self, local: IpAddr, remote: IpAddr) -> bool {
        self.restored.remove(&(local, remote));
        let was = self.blocked.remove(&(local, remote)).is_some();
        if was {
            self.revision += 1;
        }
        was
    }

    /// Whether the pair is blocked.
    pub fn is_blocked(&self, local: IpAddr, remote: IpAddr) -> bool {
        self.blocked.contains_key(&(local, remote))
    }

    /// How many pairs are blocked.
    pub fn blocked_len(&self) -> usize {
        self.blocked.len()
    }

    /// Bumped by every change.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Releases everything (the node left the mesh and removed its state).
    pub fn clear(&mut self) {
        self.bindings.clear();
        self.key_owners.clear();
        self.blocked.clear();
        self.restored.clear();
        self.revision += 1;
    }

    /// What to save; `unix_of` turns a monotonic instant into seconds since
    /// the epoch.
    pub fn to_file(&self, unix_of: impl Fn(Instant) -> u64) -> GuardFile {
        use crate::identity::encode_public;
        GuardFile {
            version: 1,
            boot_id: None,
            bindings: self
                .bindings
                .iter()
                .map(|(a, (k, n))| SavedBinding {
                    address: *a,
                    key: encode_public(k),
                    name: n.clone(),
                })
                .collect(),
            key_owners: self
                .key_owners
                .iter()
                .map(|(k, n)| SavedOwner {
                    key: encode_public(k),
                    name: n.clone(),
                })
                .collect(),
            blocked: self
                .blocked
                .values()
                .map(|b| SavedBlocked {
                    local: b.local,
                    remote: b.remote,
                    peer: b.peer.as_ref().map(|(n, _)| n.clone()),
                    key: b.peer.as_ref().map(|(_, k)| encode_public(k)),
                    reason: b.reason,
                    since_unix: unix_of(b.since),
                })
                .collect(),
        }
    }

    /// A guard from a saved file (checked whole: nothing is restored from a
    /// file with a bad entry). Its blocked pairs count as restored until
    /// [`Guard::drop_restored_absent`] has seen the kernel; `instant_of`
    /// turns seconds since the epoch back into a monotonic instant.
    pub fn from_file(
        file: &GuardFile,
        instant_of: impl Fn(u64) -> Instant,
    ) -> Result<Guard, GuardFileError> {
        use crate::identity::decode_public;
        if file.version != 1 {
            return Err(GuardFileError::Version(file.version));
        }
        let key = |what: String, k: &str| decode_public(k).ok_or(GuardFileError::BadKey(what));
        let mut g = Guard::default();
        for b in &file.bindings {
            let k = key(format!("binding of {}", b.address), &b.key)?;
            g.bindings.insert(b.address, (k, b.name.clone()));
        }
        for o in &file.key_owners {
            let k = key(format!("key owner {:?}", o.name), &o.key)?;
            g.key_owners.insert(k, o.name.clone());
        }
        for b in &file.blocked {
            let pair = format!("{} -> {}", b.local, b.remote);
            let peer = match (&b.peer, &b.key) {
                (Some(n), Some(k)) => Some((n.clone(), key(format!("blocked pair {pair}"), k)?)),
                (None, None) => None,
                _ => return Err(GuardFileError::HalfPeer(pair)),
            };
            g.blocked.insert(
                (b.local, b.remote),
                Blocked {
                    local: b.local,
                    remote: b.remote,
                    peer,
                    reason: b.reason,
                    since: instant_of(b.since_unix),
                },
            );
            g.restored.insert((b.local, b.remote));
        }
        Ok(g)
    }

    /// Keeps every restored blocked pair whatever the kernel holds at the
    /// first look (the host rebooted: an empty kernel says nothing about
    /// what the operator wanted).
    pub fn keep_restored(&mut self) {
        self.restored.clear();
    }

    /// After a reboot (the kernel lost every policy): blocks the pair of
    /// every bound address, so that what was protected before the reboot
    /// stays protected until its link re-keys. `local_for` gives our
    /// address of the peer address's family. Returns how many were added.
    pub fn block_bound_pairs(
        &mut self,
        now: Instant,
        local_for: impl Fn(IpAddr) -> Option<IpAddr>,
    ) -> usize {
        let pairs: Vec<Blocked> = self
            .bindings
            .iter()
            .filter_map(|(remote, (key, name))| {
                Some(Blocked {
                    local: local_for(*remote)?,
                    remote: *remote,
                    peer: Some((name.clone(), *key)),
                    reason: BlockReason::Rebooted,
                    since: now,
                })
            })
            .collect();
        let before = self.blocked.len();
        for b in pairs {
            self.block(b);
        }
        self.blocked.len() - before
    }

    /// Releases the restored blocked pairs of which the kernel holds neither
    /// policy: the operator removed them while the agent was down
    /// (`meshsec flush`, or by hand), and fail closed does not put back what
    /// the operator took out. Runs once, at the first look at the kernel.
    /// Returns how many were released.
    pub fn drop_restored_absent(&mut self, has_policy: impl Fn(IpAddr, IpAddr) -> bool) -> usize {
        let restored = std::mem::take(&mut self.restored);
        let mut n = 0;
        for (local, remote) in restored {
            if !has_policy(local, remote) && self.blocked.remove(&(local, remote)).is_some() {
                n += 1;
            }
        }
        if n > 0 {
            self.revision += 1;
        }
        n
    }

    /// Releases what is held for the peer `name` with `key` (its own signed
    /// `left`): bindings and blocked pairs held for exactly that name and
    /// key, so another member's record carrying the same key releases
    /// nothing. Returns how many pairs were released.
    pub fn release(&mut self, name: &str, key: &PublicKey) -> usize {
        let before = (self.bindings.len(), self.key_owners.len());
        self.bindings.retain(|_, (k, n)| !(k == key && n == name));
        if self.key_owners.get(key).is_some_and(|n| n == name) {
            self.key_owners.remove(key);
        }
        let blocked_before = self.blocked.len();
        self.blocked.retain(|_, b| {
            b.peer
                .as_ref()
                .is_none_or(|(n, k)| !(k == key && n == name))
        });
        let released = blocked_before - self.blocked.len();
        if released > 0 || before != (self.bindings.len(), self.key_owners.len()) {
            self.revision += 1;
        }
        released
    }

    /// Releases everything held for the peer `name`, and blocked pairs to
    /// `name` given as an address. Returns bindings + pairs released.
    pub fn forget(&mut self, name: &str) -> usize {
        let addr: Option<IpAddr> = name.parse().ok();
        let before = self.bindings.len() + self.blocked.len();
        let owners_before = self.key_owners.len();
        self.bindings
            .retain(|a, (_, n)| n != name && Some(*a) != addr);
        self.key_owners.retain(|_, n| n != name);
        if owners_before != self.key_owners.len() {
            self.revision += 1;
        }
        self.blocked.retain(|(_, remote), b| {
            b.peer.as_ref().is_none_or(|(n, _)| n != name) && Some(*remote) != addr
        });
        let n = before - (self.bindings.len() + self.blocked.len());
        if n > 0 {
            self.revision += 1;
        }
        n
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

    #[test]
    fn a_saved_guard_is_restored_whole_or_not_at_all() {
        let t0 = Instant::now();
        let mut g = Guard::default();
        g.bind(ip("2001:db8::2"), [2; 32], "b");
        g.block(Blocked {
            local: ip("2001:db8::1"),
            remote: ip("2001:db8::2"),
            peer: Some(("b".into(), [2; 32])),
            reason: BlockReason::NoUsableRecord,
            since: t0,
        });
        g.block(Blocked {
            local: ip("192.0.2.1"),
            remote: ip("192.0.2.3"),
            peer: None,
            reason: BlockReason::Adopted,
            since: t0,
        });
        let file = g.to_file(|_| 1_700_000_000);
        let back = Guard::from_file(&file, |_| t0).unwrap();
        assert_eq!(back.to_file(|_| 1_700_000_000), file);
        assert_eq!(back.bound().keys[&[2; 32]], "b");

        let mut bad = file.clone();
        bad.bindings[0].key = "AAAA".into();
        assert!(matches!(
            Guard::from_file(&bad, |_| t0),
            Err(GuardFileError::BadKey(_))
        ));
        let mut bad = file.clone();
        bad.blocked[0].key = None;
        bad.blocked[0].peer = Some("b".into());
        let bad_pair = Guard::from_file(&bad, |_| t0).unwrap_err();
        assert!(
            bad_pair.to_string().contains("peer and key go together"),
            "{bad_pair}"
        );
        let mut bad = file.clone();
        bad.version = 2;
        assert_eq!(
            Guard::from_file(&bad, |_| t0).unwrap_err(),
            GuardFileError::Version(2)
        );
        let text = serde_json::to_string(&file)
            .unwrap()
            .replace("\"version\"", "\"verzion\"");
        assert!(serde_json::from_str::<GuardFile>(&text).is_err());
    }

    #[test]
    fn restored_pairs_without_policies_are_dropped_once() {
        let t0 = Instant::now();
        let mut g = Guard::default();
        for last in [2u8, 3] {
            g.block(Blocked {
                local: ip("192.0.2.1"),
                remote: format!("192.0.2.{last}").parse().unwrap(),
                peer: None,
                reason: BlockReason::Adopted,
                since: t0,
            });
        }
        let mut back = Guard::from_file(&g.to_file(|_| 0), |_| t0).unwrap();
        let present = ip("192.0.2.2");
        assert_eq!(back.drop_restored_absent(|_, r| r == present), 1);
        assert!(back.is_blocked(ip("192.0.2.1"), present));
        // Only once: later absences are the planner's to repair.
        assert_eq!(back.drop_restored_absent(|_, _| false), 0);
        assert_eq!(back.blocked_len(), 1);
    }
}
