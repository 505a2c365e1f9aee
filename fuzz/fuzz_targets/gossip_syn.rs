//! The SYN digest decoder (src/gossip/transport/digest.rs) on arbitrary opened datagrams: what
//! the transport runs on every SYN a peer with the cluster secret sends, before chitchat sees it.
//!
//! Each input is used twice: as the whole datagram, and behind a well-formed header (magic, a
//! protocol version, the SYN type) so the block and entry decoders are reached at once.
//!
//! Checked:
//! - no panic, however the digest is cut, tagged, compressed or sized (decompression bombs are
//!   errors);
//! - a decoded SYN re-encodes (`encode_syn`) to bytes that decode to the same digest, and its
//!   length is the one `encoded_len` predicts (the figure the transport's guard acts on);
//! - merging it into a small own state (`merged`, as the transport does) never panics, never
//!   lists our own id twice, and drops nothing it held.
#![no_main]

use chitchat::{ChitchatId, ProtocolVersion};
use libfuzzer_sys::fuzz_target;
use meshsec::gossip::transport::digest::{
    encode_syn, encoded_len, merged, parse_syn, Digest, NodeDigest,
};

fn check(plain: &[u8]) {
    let Ok(Some(syn)) = parse_syn(plain) else {
        return;
    };
    let cluster = "meshsec";
    {
        let again = encode_syn(&syn.digest, syn.version, cluster);
        assert_eq!(
            again.len(),
            4 + encoded_len(&syn.digest, syn.version) + 2 + cluster.len(),
            "encoded_len mispredicts a {:?} digest of {} ids",
            syn.version,
            syn.digest.len()
        );
        let back = parse_syn(&again)
            .expect("a re-encoded SYN decodes")
            .expect("a re-encoded SYN is a SYN");
        assert_eq!(back.version, syn.version);
        assert_eq!(back.digest, syn.digest);
    }

    let me = ChitchatId::new("me", 1, "192.0.2.1:9340".parse().unwrap());
    let peer = ChitchatId::new("peer", 2, "192.0.2.2:9340".parse().unwrap());
    let nd = |heartbeat, max_version| NodeDigest {
        heartbeat,
        last_gc_version: 0,
        max_version,
    };
    let own: Digest = [(me.clone(), nd(10, 4)), (peer.clone(), nd(3, 2))].into();
    let m = merged(&own, &Default::default(), &me, &syn.digest);
    assert_eq!(m[&me].heartbeat, 11, "our heartbeat comes from our state only");
    assert!(m.contains_key(&peer));
    assert!(m.len() <= own.len() + syn.digest.len());
    let _ = encoded_len(&m, syn.version);
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some((&v, rest)) = data.split_first() {
        let mut framed = 45_139u16.to_le_bytes().to_vec();
        framed.push(v % 2);
        framed.push(0);
        framed.extend_from_slice(rest);
        check(&framed);
    }
});
