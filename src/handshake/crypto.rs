//! Key derivation, MACs, cookies and ESP key expansion (proto/handshake.md §3, §5, §7).
//!
//! Everything here is a pure function of its inputs so that the test vectors in
//! proto/vectors/ can pin it down byte for byte.

use std::net::SocketAddr;

use chacha20poly1305::aead::{Aead as _, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use curve25519_dalek::montgomery::MontgomeryPoint;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

pub use crate::aead::Aead;

/// Length of an X25519 public or private key.
pub const KEY_LEN: usize = 32;
/// Length of mac1, mac2 and of a cookie.
pub const MAC_LEN: usize = 16;
/// Length of the random nonce in a cookie reply (XChaCha20-Poly1305).
pub const COOKIE_NONCE_LEN: usize = 24;

/// The Noise protocol name. ChaChaPoly rather than AESGCM: the handshake encrypts ~100 bytes
/// so speed is irrelevant, and ChaCha20-Poly1305 is constant-time in portable software on every
/// CPU (no dependence on AES-NI), which is the property that matters for key exchange.
pub const NOISE_PARAMS: &str = "Noise_IKpsk2_25519_ChaChaPoly_SHA256";
/// Noise prologue: binds the protocol name and version into the handshake hash.
pub const PROLOGUE: &[u8] = b"meshsec v1 handshake";

/// HKDF info label for the Noise PSK.
pub const LABEL_PSK: &[u8] = b"meshsec v1 handshake psk";
/// HKDF info label (prefix) for the mac1 key; the receiver's static public key follows.
pub const LABEL_MAC1: &[u8] = b"meshsec v1 mac1";
/// HKDF info label (prefix) for the cookie-reply key; the responder's static public key follows.
pub const LABEL_COOKIE: &[u8] = b"meshsec v1 cookie";
/// HKDF info label (prefix) for the initiator→responder ESP key; the algorithm id follows.
pub const LABEL_ESP_I2R: &[u8] = b"meshsec v1 esp i2r";
/// HKDF info label (prefix) for the responder→initiator ESP key; the algorithm id follows.
pub const LABEL_ESP_R2I: &[u8] = b"meshsec v1 esp r2i";

type HmacSha256 = Hmac<Sha256>;

/// An X25519 static key pair (the member identity used by the handshake).
#[derive(Clone)]
pub struct StaticKeypair {
    private: Zeroizing<[u8; KEY_LEN]>,
    public: [u8; KEY_LEN],
}

impl StaticKeypair {
    /// Builds the key pair from a private key (the public key is computed from it).
    pub fn from_private(private: [u8; KEY_LEN]) -> Self {
        let public = MontgomeryPoint::mul_base_clamped(private).to_bytes();
        StaticKeypair {
            private: Zeroizing::new(private),
            public,
        }
    }

    /// Generates a fresh key pair from the operating system's random number generator.
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut private = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut private);
        let kp = Self::from_private(private);
        private.zeroize();
        kp
    }

    /// The public key, as gossiped to other members.
    pub fn public(&self) -> &[u8; KEY_LEN] {
        &self.public
    }

    /// The private key. Handle with care.
    pub fn private(&self) -> &[u8; KEY_LEN] {
        &self.private
    }
}

impl std::fmt::Debug for StaticKeypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticKeypair")
            .field("public", &hex(&self.public))
            .field("private", &"<redacted>")
            .finish()
    }
}

/// Lower-case hex, for logs and vectors.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn hkdf_expand(ikm: &[u8], salt: Option<&[u8]>, info: &[&[u8]], out: &mut [u8]) {
    let hk = Hkdf::<Sha256>::new(salt, ikm);
    // Output lengths used here are at most 36 bytes, far below HKDF-SHA256's 8160-byte limit.
    hk.expand_multi_info(info, out)
        .expect("HKDF output length within limit");
}

/// PSK = HKDF-SHA256(salt = none, ikm = cluster secret, info = LABEL_PSK), 32 bytes.
pub fn derive_psk(cluster_secret: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    hkdf_expand(cluster_secret, None, &[LABEL_PSK], &mut *out);
    out
}

/// mac1 key for messages sent *to* `receiver_pub`:
/// HKDF-SHA256(salt = none, ikm = cluster secret, info = LABEL_MAC1 ‖ receiver_pub).
pub fn derive_mac1_key(cluster_secret: &[u8; 32], receiver_pub: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    hkdf_expand(cluster_secret, None, &[LABEL_MAC1, receiver_pub], &mut *out);
    out
}

/// Cookie-reply encryption key of the responder `responder_pub`:
/// HKDF-SHA256(salt = none, ikm = cluster secret, info = LABEL_COOKIE ‖ responder_pub).
pub fn derive_cookie_key(
    cluster_secret: &[u8; 32],
    responder_pub: &[u8; 32],
) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    hkdf_expand(
        cluster_secret,
        None,
        &[LABEL_COOKIE, responder_pub],
        &mut *out,
    );
    out
}

/// HMAC-SHA256(key, data) truncated to 16 bytes. Used for mac1, mac2 and cookies.
pub fn mac16(key: &[u8], data: &[&[u8]]) -> [u8; MAC_LEN] {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    for d in data {
        m.update(d);
    }
    let full = m.finalize().into_bytes();
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(&full[..MAC_LEN]);
    out
}

/// Constant-time comparison of two MACs (no early exit on the first differing byte).
pub fn mac_eq(a: &[u8; MAC_LEN], b: &[u8; MAC_LEN]) -> bool {
    let mut diff = 0u8;
    for i in 0..MAC_LEN {
        diff |= a[i] ^ b[i];
    }
    std::hint::black_box(diff) == 0
}

/// Serialises a source address the way cookies bind it: IPv4 as 4 bytes or IPv6 as 16 bytes,
/// followed by the UDP port as 2 bytes big-endian. IPv4-mapped IPv6 addresses are normalised
/// to IPv4 so a dual-stack socket and a v4 socket produce the same cookie.
pub fn addr_bytes(addr: &SocketAddr) -> Vec<u8> {
    let mut v = Vec::with_capacity(18);
    match addr {
        SocketAddr::V4(a) => v.extend_from_slice(&a.ip().octets()),
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => v.extend_from_slice(&v4.octets()),
            None => v.extend_from_slice(&a.ip().octets()),
        },
    }
    v.extend_from_slice(&addr.port().to_be_bytes());
    v
}

/// cookie = HMAC-SHA256(responder's rotating secret, addr_bytes(source))[..16].
pub fn make_cookie(rotating_secret: &[u8; 32], source: &SocketAddr) -> [u8; MAC_LEN] {
    mac16(rotating_secret, &[&addr_bytes(source)])
}

/// Encrypts a cookie for a cookie reply: XChaCha20-Poly1305(key = cookie key, nonce,
/// aad = mac1 of the message that triggered the reply). Returns cookie ‖ tag (32 bytes).
pub fn seal_cookie(
    cookie_key: &[u8; 32],
    nonce: &[u8; COOKIE_NONCE_LEN],
    trigger_mac1: &[u8; MAC_LEN],
    cookie: &[u8; MAC_LEN],
) -> [u8; 32] {
    let aead = XChaCha20Poly1305::new(cookie_key.into());
    let ct = aead
        .encrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: cookie,
                aad: trigger_mac1,
            },
        )
        .expect("encrypting 16 bytes cannot fail");
    let mut out = [0u8; 32];
    out.copy_from_slice(&ct);
    out
}

/// Opens a cookie reply's sealed cookie; `None` if it does not authenticate.
pub fn open_cookie(
    cookie_key: &[u8; 32],
    nonce: &[u8; COOKIE_NONCE_LEN],
    trigger_mac1: &[u8; MAC_LEN],
    sealed: &[u8; 32],
) -> Option<[u8; MAC_LEN]> {
    let aead = XChaCha20Poly1305::new(cookie_key.into());
    let pt = aead
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: sealed,
                aad: trigger_mac1,
            },
        )
        .ok()?;
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(pt.get(..MAC_LEN)?);
    Some(out)
}

/// ESP key material for one direction; zeroed on drop, redacted in Debug.
#[derive(Clone, PartialEq, Eq)]
pub struct EspKey(Zeroizing<Vec<u8>>);

impl EspKey {
    /// The raw key material (key ‖ salt) in the kernel's layout.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for EspKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EspKey({} bytes, redacted)", self.0.len())
    }
}

/// ESP keys for both directions from the Noise split:
/// key_i2r = HKDF-SHA256(salt = handshake hash, ikm = k1, info = LABEL_ESP_I2R ‖ alg id),
/// key_r2i = HKDF-SHA256(salt = handshake hash, ikm = k2, info = LABEL_ESP_R2I ‖ alg id),
/// each `alg.key_len()` bytes.
pub fn derive_esp_keys(
    k1: &[u8; 32],
    k2: &[u8; 32],
    handshake_hash: &[u8],
    alg: Aead,
) -> (EspKey, EspKey) {
    let len = alg.key_len();
    let mut i2r = Zeroizing::new(vec![0u8; len]);
    let mut r2i = Zeroizing::new(vec![0u8; len]);
    hkdf_expand(
        k1,
        Some(handshake_hash),
        &[LABEL_ESP_I2R, &[alg.id()]],
        &mut i2r,
    );
    hkdf_expand(
        k2,
        Some(handshake_hash),
        &[LABEL_ESP_R2I, &[alg.id()]],
        &mut r2i,
    );
    (EspKey(i2r), EspKey(r2i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keypair_public_matches_snow() {
        let params: snow::params::NoiseParams = NOISE_PARAMS.parse().unwrap();
        let kp = snow::Builder::new(params).generate_keypair().unwrap();
        let mut private = [0u8; 32];
        private.copy_from_slice(&kp.private);
        let ours = StaticKeypair::from_private(private);
        assert_eq!(ours.public().as_slice(), kp.public.as_slice());
    }

    #[test]
    fn cookie_roundtrip_and_tamper() {
        let key = [7u8; 32];
        let nonce = [9u8; 24];
        let mac1 = [1u8; 16];
        let cookie = [3u8; 16];
        let sealed = seal_cookie(&key, &nonce, &mac1, &cookie);
        assert_eq!(open_cookie(&key, &nonce, &mac1, &sealed), Some(cookie));
        assert_eq!(open_cookie(&key, &nonce, &[2u8; 16], &sealed), None);
        let mut bad = sealed;
        bad[0] ^= 1;
        assert_eq!(open_cookie(&key, &nonce, &mac1, &bad), None);
    }

    #[test]
    fn esp_key_lengths_and_directions_differ() {
        for alg in [Aead::Aes128Gcm, Aead::Aes256Gcm, Aead::ChaCha20Poly1305] {
            let (a, b) = derive_esp_keys(&[1; 32], &[1; 32], &[0; 32], alg);
            assert_eq!(a.as_bytes().len(), alg.key_len());
            assert_ne!(a, b, "same split input must still give distinct directions");
        }
        let (a128, _) = derive_esp_keys(&[1; 32], &[2; 32], &[0; 32], Aead::Aes128Gcm);
        let (a256, _) = derive_esp_keys(&[1; 32], &[2; 32], &[0; 32], Aead::Aes256Gcm);
        assert_ne!(a128.as_bytes(), &a256.as_bytes()[..20]);
    }

    #[test]
    fn mapped_v6_cookie_equals_v4() {
        let v4: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let v6: SocketAddr = "[::ffff:192.0.2.1]:51820".parse().unwrap();
        assert_eq!(make_cookie(&[5; 32], &v4), make_cookie(&[5; 32], &v6));
    }
}
