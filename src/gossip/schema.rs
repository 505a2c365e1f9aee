//! The key-values each node publishes through gossip.
//!
//! Values come from other nodes: parsing never fails as a whole, a malformed
//! field simply reads as absent (and the node cannot be paired with).

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::identity::{decode_public, encode_public};

/// Wire protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Key: base64 static X25519 public key.
pub const KEY_PUBKEY: &str = "pubkey";
/// Key: comma-separated data-plane addresses.
pub const KEY_DATA_ADDRS: &str = "data_addrs";
/// Key: handshake UDP port.
pub const KEY_HANDSHAKE_PORT: &str = "hs_port";
/// Key: protocol version.
pub const KEY_PROTOCOL: &str = "proto";
/// Key: `up` or `left`.
pub const KEY_STATUS: &str = "status";
/// Key: base64 Ed25519 public key that signs this record (proto/records.md).
pub const KEY_SIGNING_KEY: &str = "sig_key";
/// Key: base64 Ed25519 signature over the record (proto/records.md).
pub const KEY_SIGNATURE: &str = "sig";
/// Key for the node's CA certificate (proto/certs.md), base64; outside the
/// signed values: the CA signature covers it.
pub const KEY_CERT: &str = "cert";
/// The published keys a record's signature covers, in signing order.
pub const SIGNED_KEYS: [&str; 5] = [
    KEY_PUBKEY,
    KEY_DATA_ADDRS,
    KEY_HANDSHAKE_PORT,
    KEY_PROTOCOL,
    KEY_STATUS,
];

/// Upper bound on published data addresses read from a peer.
const MAX_DATA_ADDRS: usize = 16;

/// What a node publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeInfo {
    /// Static public key.
    pub public_key: Option<[u8; 32]>,
    /// Data-plane addresses.
    pub data_addrs: Vec<IpAddr>,
    /// Handshake port.
    pub handshake_port: Option<u16>,
    /// Protocol version.
    pub protocol: Option<u32>,
    /// Announced a graceful leave.
    pub left: bool,
}

impl NodeInfo {
    /// The key-values to publish.
    pub fn to_key_values(&self) -> Vec<(String, String)> {
        let mut kv = Vec::new();
        if let Some(pk) = &self.public_key {
            kv.push((KEY_PUBKEY.to_string(), encode_public(pk)));
        }
        let addrs: Vec<String> = self.data_addrs.iter().map(|a| a.to_string()).collect();
        kv.push((KEY_DATA_ADDRS.to_string(), addrs.join(",")));
        if let Some(p) = self.handshake_port {
            kv.push((KEY_HANDSHAKE_PORT.to_string(), p.to_string()));
        }
        if let Some(p) = self.protocol {
            kv.push((KEY_PROTOCOL.to_string(), p.to_string()));
        }
        kv.push((
            KEY_STATUS.to_string(),
            if self.left { "left" } else { "up" }.to_string(),
        ));
        kv
    }

    /// Reads what a node published; malformed fields read as absent.
    pub fn from_key_values(kv: &BTreeMap<String, String>) -> NodeInfo {
        NodeInfo {
            public_key: kv.get(KEY_PUBKEY).and_then(|v| decode_public(v)),
            data_addrs: kv
                .get(KEY_DATA_ADDRS)
                .map(|v| {
                    v.split(',')
                        .filter_map(|s| s.trim().parse().ok())
                        .take(MAX_DATA_ADDRS)
                        .collect()
                })
                .unwrap_or_default(),
            handshake_port: kv
                .get(KEY_HANDSHAKE_PORT)
                .and_then(|v| v.parse().ok())
                .filter(|p| *p != 0),
            protocol: kv.get(KEY_PROTOCOL).and_then(|v| v.parse().ok()),
            left: kv.get(KEY_STATUS).map(|v| v == "left").unwrap_or(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_hostile_values() {
        let info = NodeInfo {
            public_key: Some([7u8; 32]),
            data_addrs: vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
            handshake_port: Some(9341),
            protocol: Some(1),
            left: false,
        };
        let kv: BTreeMap<_, _> = info.to_key_values().into_iter().collect();
        assert_eq!(NodeInfo::from_key_values(&kv), info);

        let mut bad = kv.clone();
        bad.insert(KEY_PUBKEY.into(), "!!".into());
        bad.insert(KEY_DATA_ADDRS.into(), "x,192.0.2.9,".repeat(100));
        bad.insert(KEY_HANDSHAKE_PORT.into(), "0".into());
        let parsed = NodeInfo::from_key_values(&bad);
        assert_eq!(parsed.public_key, None);
        assert_eq!(parsed.data_addrs.len(), MAX_DATA_ADDRS);
        assert_eq!(parsed.handshake_port, None);
    }
}
