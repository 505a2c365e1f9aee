//! X25519 for snow, with the two savings WireGuard implementations also make:
//! - our static public key is computed once, not on every `Builder::local_private_key`;
//! - the static-static DH (`ss`) with each peer is memoised: it is the same value in every
//!   handshake with that peer, so recomputing it is pure waste.
//!
//! The memo maps a public key P to X25519(our static private key, P). It is a cache of a
//! deterministic function, so a hit is always correct whatever P is; the endpoint only decides
//! which P are worth keeping (peer static keys) and when to drop them. DH outputs that are all
//! zero (low-order points) are rejected, as WireGuard does.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use curve25519_dalek::montgomery::MontgomeryPoint;
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use zeroize::Zeroizing;

use super::crypto::{StaticKeypair, KEY_LEN};

/// Upper bound on memoised peers (one entry per member; far above any cluster size).
const MAX_MEMO: usize = 65_536;

/// Our static key with its memo of static-static DH results. Shared by all handshakes.
pub struct StaticDh {
    private: Zeroizing<[u8; KEY_LEN]>,
    public: [u8; KEY_LEN],
    memo: RwLock<HashMap<[u8; KEY_LEN], Zeroizing<[u8; KEY_LEN]>>>,
}

impl StaticDh {
    /// Wraps a static key pair.
    pub fn new(kp: &StaticKeypair) -> Arc<Self> {
        Arc::new(StaticDh {
            private: Zeroizing::new(*kp.private()),
            public: *kp.public(),
            memo: RwLock::new(HashMap::new()),
        })
    }

    /// The private key (for `Builder::local_private_key`).
    pub fn private(&self) -> &[u8; KEY_LEN] {
        &self.private
    }

    /// Memoises X25519(our private, `peer`) if not yet known.
    pub fn remember(&self, peer: &[u8; KEY_LEN]) {
        if self
            .memo
            .read()
            .map(|m| m.contains_key(peer))
            .unwrap_or(true)
        {
            return;
        }
        let v = Zeroizing::new(MontgomeryPoint(*peer).mul_clamped(*self.private).to_bytes());
        if let Ok(mut m) = self.memo.write() {
            if m.len() >= MAX_MEMO {
                m.clear();
            }
            m.insert(*peer, v);
        }
    }

    /// Drops the memo entry of `peer` (it left the cluster).
    pub fn forget(&self, peer: &[u8; KEY_LEN]) {
        if let Ok(mut m) = self.memo.write() {
            m.remove(peer);
        }
    }

    fn lookup(&self, peer: &[u8; KEY_LEN]) -> Option<[u8; KEY_LEN]> {
        self.memo.read().ok()?.get(peer).map(|v| **v)
    }

    /// A snow resolver whose X25519 uses this key's shortcuts; everything else is snow's.
    pub fn resolver(self: &Arc<Self>) -> Box<dyn CryptoResolver + Send> {
        Box::new(Resolver {
            st: Arc::clone(self),
        })
    }
}

struct Resolver {
    st: Arc<StaticDh>,
}

impl CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        DefaultResolver.resolve_rng()
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        match choice {
            DHChoice::Curve25519 => Some(Box::new(X25519 {
                private: Zeroizing::new([0; KEY_LEN]),
                public: [0; KEY_LEN],
                is_static: false,
                st: Arc::clone(&self.st),
            })),
            _ => None,
        }
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        DefaultResolver.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        DefaultResolver.resolve_cipher(choice)
    }
}

struct X25519 {
    private: Zeroizing<[u8; KEY_LEN]>,
    public: [u8; KEY_LEN],
    /// This instance holds our static key, so memo hits apply.
    is_static: bool,
    st: Arc<StaticDh>,
}

fn ct_eq(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> bool {
    let mut d = 0u8;
    for i in 0..KEY_LEN {
        d |= a[i] ^ b[i];
    }
    std::hint::black_box(d) == 0
}

impl Dh for X25519 {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        KEY_LEN
    }

    fn priv_len(&self) -> usize {
        KEY_LEN
    }

    fn set(&mut self, privkey: &[u8]) {
        let mut k = [0u8; KEY_LEN];
        let n = privkey.len().min(KEY_LEN);
        k[..n].copy_from_slice(&privkey[..n]);
        *self.private = k;
        self.is_static = ct_eq(&k, &self.st.private);
        self.public = if self.is_static {
            self.st.public
        } else {
            MontgomeryPoint::mul_base_clamped(k).to_bytes()
        };
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        rng.try_fill_bytes(&mut *k)?;
        *self.private = *k;
        self.is_static = false;
        self.public = MontgomeryPoint::mul_base_clamped(*k).to_bytes();
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        &*self.private
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let p: [u8; KEY_LEN] = pubkey
            .get(..KEY_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(snow::Error::Dh)?;
        let r = match self.is_static.then(|| self.st.lookup(&p)).flatten() {
            Some(r) => r,
            None => MontgomeryPoint(p).mul_clamped(*self.private).to_bytes(),
        };
        if r == [0u8; KEY_LEN] {
            return Err(snow::Error::Dh);
        }
        out.get_mut(..KEY_LEN)
            .ok_or(snow::Error::Dh)?
            .copy_from_slice(&r);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memo_hit_equals_computation_and_low_order_rejected() {
        let a = StaticKeypair::from_private([1; 32]);
        let b = StaticKeypair::from_private([2; 32]);
        let st = StaticDh::new(&a);
        let r = st.resolver();
        let mut d = r.resolve_dh(&DHChoice::Curve25519).unwrap();
        d.set(a.private());
        assert_eq!(d.pubkey(), a.public());
        let mut cold = [0u8; 32];
        d.dh(b.public(), &mut cold).unwrap();
        st.remember(b.public());
        let mut warm = [0u8; 32];
        d.dh(b.public(), &mut warm).unwrap();
        assert_eq!(cold, warm);
        let expect = MontgomeryPoint(*b.public())
            .mul_clamped(*a.private())
            .to_bytes();
        assert_eq!(cold, expect);
        // The identity (u = 0) is a low-order point: all-zero output, rejected.
        assert!(d.dh(&[0u8; 32], &mut warm).is_err());
        assert!(d.dh(&[0u8; 5], &mut warm).is_err());
        st.forget(b.public());
        assert!(st.lookup(b.public()).is_none());
    }
}
