//! The one AEAD enum: the cluster-wide ESP transform, as the config names it,
//! as the handshake carries it (one byte on the wire, mixed into the key
//! derivation) and as the kernel installs it. Depends on no other module.

use std::fmt;

use serde::Deserialize;

/// ESP AEAD transform, chosen cluster-wide (every host must use the same).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Deserialize, clap::ValueEnum,
)]
#[repr(u8)]
pub enum Aead {
    /// `rfc4106(gcm(aes))` with a 128-bit key (16 key + 4 salt bytes). Default.
    #[default]
    #[serde(rename = "aes128-gcm")]
    #[value(name = "aes128-gcm")]
    Aes128Gcm = 1,
    /// `rfc4106(gcm(aes))` with a 256-bit key (32 key + 4 salt bytes).
    #[serde(rename = "aes256-gcm")]
    #[value(name = "aes256-gcm")]
    Aes256Gcm = 2,
    /// `rfc7539esp(chacha20,poly1305)` (32 key + 4 salt bytes).
    #[serde(rename = "chacha20-poly1305")]
    #[value(name = "chacha20-poly1305")]
    ChaCha20Poly1305 = 3,
}

/// ICV (authentication tag) length of every AEAD meshsec uses, in bits.
pub const ICV_BITS: u32 = 128;

impl Aead {
    /// Every transform, in wire-id order.
    pub const ALL: [Aead; 3] = [Aead::Aes128Gcm, Aead::Aes256Gcm, Aead::ChaCha20Poly1305];

    /// Wire id → transform; `None` for unknown ids.
    pub fn from_id(id: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.id() == id)
    }

    /// The wire id (handshake messages, key derivation info).
    pub fn id(self) -> u8 {
        self as u8
    }

    /// Key material length in bytes, salt included (key ‖ 4-byte salt), in
    /// the kernel's layout.
    pub fn key_len(self) -> usize {
        match self {
            Aead::Aes128Gcm => 20,
            Aead::Aes256Gcm | Aead::ChaCha20Poly1305 => 36,
        }
    }

    /// The kernel crypto API name given in `XFRMA_ALG_AEAD`.
    pub fn kernel_name(self) -> &'static str {
        match self {
            Aead::Aes128Gcm | Aead::Aes256Gcm => "rfc4106(gcm(aes))",
            Aead::ChaCha20Poly1305 => "rfc7539esp(chacha20,poly1305)",
        }
    }

    /// Recognise a transform from what the kernel reports in a dump.
    pub fn from_kernel(name: &str, key_bits: u32) -> Option<Aead> {
        Self::ALL
            .into_iter()
            .find(|a| a.kernel_name() == name && a.key_len() * 8 == key_bits as usize)
    }

    /// The name used in config files, flags, listings and test vectors.
    pub fn name(self) -> &'static str {
        match self {
            Aead::Aes128Gcm => "aes128-gcm",
            Aead::Aes256Gcm => "aes256-gcm",
            Aead::ChaCha20Poly1305 => "chacha20-poly1305",
        }
    }
}

impl fmt::Display for Aead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_ids_and_kernel_names_round_trip() {
        for a in Aead::ALL {
            assert_eq!(Aead::from_id(a.id()), Some(a));
            assert_eq!(
                Aead::from_kernel(a.kernel_name(), a.key_len() as u32 * 8),
                Some(a)
            );
        }
        assert_eq!(Aead::from_id(0), None);
        assert_eq!(Aead::from_id(4), None);
        assert_eq!(Aead::from_kernel("rfc4106(gcm(aes))", 128), None);
        // The wire ids are part of the protocol (proto/handshake.md).
        assert_eq!(
            Aead::ALL.map(Aead::id),
            [1, 2, 3],
            "wire ids must not change"
        );
        assert_eq!(Aead::default(), Aead::Aes128Gcm);
    }
}
