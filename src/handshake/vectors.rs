//! Known-answer vectors (proto/vectors/handshake.json).
//!
//! Static and ephemeral keys, indices, timestamps and nonces are fixed, so every byte of every
//! message is determined. `check_vectors` recomputes each vector's outputs from its inputs with
//! the pure functions and also drives real endpoints through it, comparing byte for byte.
//!
//! Regenerate (after a deliberate protocol change only):
//! `cargo test --lib handshake::vectors::regenerate -- --ignored`

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::crypto::{self, hex, Aead, StaticKeypair};
use super::noise;
use super::wire::{
    self, InitPayload, RespPayload, INITIATION_MAC1_OFF, INITIATION_MAC2_OFF, RESPONSE_MAC1_OFF,
};
use super::*;

const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/vectors/handshake.json");

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VectorFile {
    description: String,
    protocol: String,
    regenerate: String,
    handshakes: Vec<HandshakeVector>,
    cookies: Vec<CookieVector>,
}

/// Inputs first, then derived values. Byte strings are lower-case hex; u64 values are decimal
/// strings (JSON numbers lose precision above 2^53).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct HandshakeVector {
    name: String,
    algorithm: String,
    cluster_secret: String,
    initiator_static_private: String,
    responder_static_private: String,
    initiator_ephemeral_private: String,
    responder_ephemeral_private: String,
    initiator_index: u32,
    responder_index: u32,
    initiator_timestamp: String,
    initiator_spi: u32,
    responder_spi: u32,
    responder_timestamp: String,
    // Derived.
    initiator_static_public: String,
    responder_static_public: String,
    psk: String,
    mac1_key_to_responder: String,
    mac1_key_to_initiator: String,
    initiation_payload: String,
    initiation: String,
    response_payload: String,
    response: String,
    handshake_hash: String,
    session_id: String,
    key_i2r: String,
    key_r2i: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CookieVector {
    name: String,
    /// The handshake vector whose initiation triggered the cookie reply.
    handshake: String,
    rotating_secret: String,
    source: String,
    nonce: String,
    // Derived.
    cookie_key: String,
    cookie: String,
    trigger_mac1: String,
    cookie_reply: String,
    initiation_with_mac2: String,
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn unhex32(s: &str) -> [u8; 32] {
    unhex(s).try_into().expect("32 bytes")
}

fn alg_name(a: Aead) -> &'static str {
    match a {
        Aead::Aes128Gcm => "aes128gcm",
        Aead::Aes256Gcm => "aes256gcm",
        Aead::ChaCha20Poly1305 => "chacha20poly1305",
    }
}

fn alg_from(s: &str) -> Aead {
    Aead::ALL
        .into_iter()
        .find(|a| alg_name(*a) == s)
        .expect("known algorithm")
}

/// Fills the derived fields of `v` from its inputs, using the same functions as the endpoint.
fn compute_handshake(v: &HandshakeVector) -> HandshakeVector {
    let alg = alg_from(&v.algorithm);
    let secret = unhex32(&v.cluster_secret);
    let ikp = StaticKeypair::from_private(unhex32(&v.initiator_static_private));
    let rkp = StaticKeypair::from_private(unhex32(&v.responder_static_private));
    let (ie, re) = (
        unhex32(&v.initiator_ephemeral_private),
        unhex32(&v.responder_ephemeral_private),
    );
    let psk = crypto::derive_psk(&secret);
    let mac1_r = crypto::derive_mac1_key(&secret, rkp.public());
    let mac1_i = crypto::derive_mac1_key(&secret, ikp.public());

    let ip = InitPayload {
        timestamp: v.initiator_timestamp.parse().unwrap(),
        spi: v.initiator_spi,
        alg: alg.id(),
    };
    let (mut ihs, n1) = noise::initiator_start(
        &super::dh::StaticDh::new(&ikp),
        rkp.public(),
        &psk,
        Some(&ie),
        &ip.encode(),
    )
    .unwrap();
    let mut init = wire::encode_initiation(v.initiator_index, &n1);
    noise::put_mac(&mut init, INITIATION_MAC1_OFF, &mac1_r);

    let (rhs, rs, got_ip) =
        noise::responder_read(&super::dh::StaticDh::new(&rkp), &psk, Some(&re), &n1).unwrap();
    assert_eq!(&rs, ikp.public());
    assert_eq!(got_ip, ip.encode());
    let rp = RespPayload {
        spi: v.responder_spi,
        alg: alg.id(),
        timestamp: v.responder_timestamp.parse().unwrap(),
    };
    let (n2, rsplit) = noise::responder_finish(rhs, &rp.encode()).unwrap();
    let mut resp = wire::encode_response(v.responder_index, v.initiator_index, &n2);
    noise::put_mac(&mut resp, RESPONSE_MAC1_OFF, &mac1_i);

    let (got_rp, isplit) = noise::initiator_finish(&mut ihs, &n2).unwrap();
    assert_eq!(got_rp, rp.encode());
    assert_eq!(*isplit.k1, *rsplit.k1);
    assert_eq!(isplit.hash, rsplit.hash);
    let (i2r, r2i) = crypto::derive_esp_keys(&isplit.k1, &isplit.k2, &isplit.hash, alg);

    HandshakeVector {
        initiator_static_public: hex(ikp.public()),
        responder_static_public: hex(rkp.public()),
        psk: hex(&*psk),
        mac1_key_to_responder: hex(&*mac1_r),
        mac1_key_to_initiator: hex(&*mac1_i),
        initiation_payload: hex(&ip.encode()),
        initiation: hex(&init),
        response_payload: hex(&rp.encode()),
        response: hex(&resp),
        handshake_hash: hex(&isplit.hash),
        session_id: u64::from_be_bytes(isplit.hash[..8].try_into().unwrap()).to_string(),
        key_i2r: hex(i2r.as_bytes()),
        key_r2i: hex(r2i.as_bytes()),
        ..v.clone()
    }
}

fn compute_cookie(c: &CookieVector, h: &HandshakeVector) -> CookieVector {
    let secret = unhex32(&h.cluster_secret);
    let rkp = StaticKeypair::from_private(unhex32(&h.responder_static_private));
    let cookie_key = crypto::derive_cookie_key(&secret, rkp.public());
    let source: SocketAddr = c.source.parse().unwrap();
    let cookie = crypto::make_cookie(&unhex32(&c.rotating_secret), &source);
    let init = unhex(&h.initiation);
    let mac1: [u8; 16] = init[INITIATION_MAC1_OFF..INITIATION_MAC2_OFF]
        .try_into()
        .unwrap();
    let nonce: [u8; 24] = unhex(&c.nonce).try_into().unwrap();
    let sealed = crypto::seal_cookie(&cookie_key, &nonce, &mac1, &cookie);
    let reply = wire::encode_cookie_reply(h.initiator_index, &nonce, &sealed);
    let mut with_mac2 = init.clone();
    noise::put_mac2(&mut with_mac2, INITIATION_MAC2_OFF, &cookie);
    CookieVector {
        cookie_key: hex(&*cookie_key),
        cookie: hex(&cookie),
        trigger_mac1: hex(&mac1),
        cookie_reply: hex(&reply),
        initiation_with_mac2: hex(&with_mac2),
        ..c.clone()
    }
}

struct Ctx {
    members: HashSet<PublicKey>,
    spi: u32,
}

impl HandshakeContext for Ctx {
    fn is_member(&self, peer: &PublicKey) -> bool {
        self.members.contains(peer)
    }
    fn alloc_spi(&mut self, _: &PublicKey) -> Result<u32, SpiAllocError> {
        Ok(self.spi)
    }
}

const I_ADDR: &str = "192.0.2.1:4500";
const R_ADDR: &str = "192.0.2.2:4500";

/// Initiator endpoint positioned so that its next initiation is exactly the vector's.
fn initiator_endpoint(h: &HandshakeVector, now: Instant) -> Endpoint {
    let cfg = Config {
        algorithm: alg_from(&h.algorithm),
        ..Config::default()
    };
    let ts: u64 = h.initiator_timestamp.parse().unwrap();
    let kp = StaticKeypair::from_private(unhex32(&h.initiator_static_private));
    let mut ep = Endpoint::new(
        cfg,
        kp,
        &[unhex32(&h.cluster_secret)],
        now,
        Duration::from_nanos(ts),
    )
    .unwrap();
    ep.fixed_ephemerals
        .push_back(unhex32(&h.initiator_ephemeral_private));
    ep.fixed_indices.push_back(h.initiator_index);
    ep
}

fn responder_endpoint(h: &HandshakeVector, now: Instant) -> (Endpoint, Ctx) {
    let cfg = Config {
        algorithm: alg_from(&h.algorithm),
        ..Config::default()
    };
    let kp = StaticKeypair::from_private(unhex32(&h.responder_static_private));
    // Anchored so that the responder's clock reads exactly the vector's timestamp.
    let ts: u64 = h.responder_timestamp.parse().unwrap();
    let mut ep = Endpoint::new(
        cfg,
        kp,
        &[unhex32(&h.cluster_secret)],
        now,
        Duration::from_nanos(ts),
    )
    .unwrap();
    ep.fixed_ephemerals
        .push_back(unhex32(&h.responder_ephemeral_private));
    ep.fixed_indices.push_back(h.responder_index);
    let ctx = Ctx {
        members: [unhex32(&h.initiator_static_public)].into(),
        spi: h.responder_spi,
    };
    (ep, ctx)
}

fn established(ep: &mut Endpoint) -> Session {
    match ep.poll_event() {
        Some(Event::Established(s)) => s,
        e => panic!("expected Established, got {e:?}"),
    }
}

/// Drives real endpoints through a vector.
fn check_endpoints(h: &HandshakeVector) {
    let now = Instant::now();
    let (ia, ra): (SocketAddr, SocketAddr) = (I_ADDR.parse().unwrap(), R_ADDR.parse().unwrap());
    let mut ini = initiator_endpoint(h, now);
    ini.initiate(
        now,
        unhex32(&h.responder_static_public),
        ra,
        h.initiator_spi,
    )
    .unwrap();
    let (to, init) = ini.poll_transmit().unwrap();
    assert_eq!(to, ra);
    assert_eq!(hex(&init), h.initiation, "{}: endpoint initiation", h.name);

    let (mut res, mut ctx) = responder_endpoint(h, now);
    res.handle(now, ia, &init, &mut ctx).unwrap();
    let (to, resp) = res.poll_transmit().unwrap();
    assert_eq!(to, ia);
    assert_eq!(hex(&resp), h.response, "{}: endpoint response", h.name);
    let rs = established(&mut res);

    ini.handle(
        now,
        ra,
        &resp,
        &mut Ctx {
            members: HashSet::new(),
            spi: 0,
        },
    )
    .unwrap();
    let is = established(&mut ini);
    assert_eq!(hex(is.key_out.as_bytes()), h.key_i2r);
    assert_eq!(hex(is.key_in.as_bytes()), h.key_r2i);
    assert_eq!(hex(rs.key_in.as_bytes()), h.key_i2r);
    assert_eq!(hex(rs.key_out.as_bytes()), h.key_r2i);
    assert_eq!(is.session_id.to_string(), h.session_id);
    assert_eq!(rs.session_id.to_string(), h.session_id);
    assert_eq!(
        (is.local_spi, is.peer_spi),
        (h.initiator_spi, h.responder_spi)
    );
    assert_eq!(
        (rs.local_spi, rs.peer_spi),
        (h.responder_spi, h.initiator_spi)
    );
}

/// Cookie round trip through real endpoints.
fn check_cookie_endpoints(c: &CookieVector, h: &HandshakeVector) {
    let now = Instant::now();
    let source: SocketAddr = c.source.parse().unwrap();
    let ra: SocketAddr = R_ADDR.parse().unwrap();
    let mut ini = initiator_endpoint(h, now);
    ini.initiate(
        now,
        unhex32(&h.responder_static_public),
        ra,
        h.initiator_spi,
    )
    .unwrap();
    let (_, init) = ini.poll_transmit().unwrap();

    // Responder under load: no DH work, a cookie reply carrying the vector's cookie.
    let (mut res, mut ctx) = responder_endpoint(h, now);
    res.force_under_load(
        now,
        now + Duration::from_secs(5),
        unhex32(&c.rotating_secret),
    );
    assert_eq!(
        res.handle(now, source, &init, &mut ctx),
        Err(Rejected::CookieSent)
    );
    assert_eq!(res.counters().dh_work, 0);
    let (to, reply) = res.poll_transmit().unwrap();
    assert_eq!(to, source);
    let m = match wire::decode(&reply).unwrap() {
        wire::Message::CookieReply(m) => m,
        m => panic!("{m:?}"),
    };
    let key = unhex32(&c.cookie_key);
    let mac1: [u8; 16] = unhex(&c.trigger_mac1).try_into().unwrap();
    let opened = crypto::open_cookie(&key, m.nonce, &mac1, m.sealed).unwrap();
    assert_eq!(hex(&opened), c.cookie);

    // Initiator takes the vector's cookie reply and resends with exactly the vector's mac2.
    ini.handle(
        now,
        ra,
        &unhex(&c.cookie_reply),
        &mut Ctx {
            members: HashSet::new(),
            spi: 0,
        },
    )
    .unwrap();
    let (_, again) = ini.poll_transmit().unwrap();
    assert_eq!(hex(&again), c.initiation_with_mac2);

    // The responder accepts it from that source only.
    let other: SocketAddr = "192.0.2.99:4500".parse().unwrap();
    assert_eq!(
        res.handle(now, other, &again, &mut ctx),
        Err(Rejected::CookieSent)
    );
    res.handle(now, source, &again, &mut ctx).unwrap();
    let _ = res.poll_transmit();
    let (_, resp) = res.poll_transmit().unwrap();
    assert_eq!(hex(&resp), h.response);
}

#[test]
fn check_vectors() {
    let text = std::fs::read_to_string(PATH).expect("proto/vectors/handshake.json present");
    let file: VectorFile = serde_json::from_str(&text).expect("valid vector JSON");
    assert!(file.handshakes.len() >= 3 && !file.cookies.is_empty());
    assert_eq!(file.protocol, crypto::NOISE_PARAMS);
    for h in &file.handshakes {
        assert_eq!(
            &compute_handshake(h),
            h,
            "vector {} (pure functions)",
            h.name
        );
        check_endpoints(h);
    }
    for c in &file.cookies {
        let h = file
            .handshakes
            .iter()
            .find(|h| h.name == c.handshake)
            .expect("referenced handshake");
        assert_eq!(&compute_cookie(c, h), c, "cookie vector {}", c.name);
        check_cookie_endpoints(c, h);
    }
}

fn seq(start: u8) -> String {
    hex(&(0..32u8).map(|i| start.wrapping_add(i)).collect::<Vec<_>>())
}

fn input(name: &str, alg: Aead) -> HandshakeVector {
    HandshakeVector {
        name: name.into(),
        algorithm: alg_name(alg).into(),
        cluster_secret: seq(0xc0),
        initiator_static_private: seq(0x10),
        responder_static_private: seq(0x40),
        initiator_ephemeral_private: seq(0x70),
        responder_ephemeral_private: seq(0xa0),
        initiator_index: 0x0a0b0c0d,
        responder_index: 0x01020304,
        initiator_timestamp: "1780000000123456789".into(),
        initiator_spi: 0xc0de0001,
        responder_spi: 0xc0de0002,
        responder_timestamp: "1780000000987654321".into(),
        initiator_static_public: String::new(),
        responder_static_public: String::new(),
        psk: String::new(),
        mac1_key_to_responder: String::new(),
        mac1_key_to_initiator: String::new(),
        initiation_payload: String::new(),
        initiation: String::new(),
        response_payload: String::new(),
        response: String::new(),
        handshake_hash: String::new(),
        session_id: String::new(),
        key_i2r: String::new(),
        key_r2i: String::new(),
    }
}

#[test]
#[ignore = "writes proto/vectors/handshake.json; run only after a deliberate protocol change"]
fn regenerate() {
    let handshakes: Vec<_> = [
        input("aes128gcm", Aead::Aes128Gcm),
        input("aes256gcm", Aead::Aes256Gcm),
        input("chacha20poly1305", Aead::ChaCha20Poly1305),
    ]
    .iter()
    .map(compute_handshake)
    .collect();
    let cookie_in = CookieVector {
        name: "cookie-aes128gcm".into(),
        handshake: "aes128gcm".into(),
        rotating_secret: seq(0xe0),
        source: "192.0.2.7:40000".into(),
        nonce: hex(&(0..24u8).collect::<Vec<_>>()),
        cookie_key: String::new(),
        cookie: String::new(),
        trigger_mac1: String::new(),
        cookie_reply: String::new(),
        initiation_with_mac2: String::new(),
    };
    let cookies = vec![compute_cookie(&cookie_in, &handshakes[0])];
    let file = VectorFile {
        description: "meshsec handshake v1 known-answer vectors; see proto/handshake.md §9".into(),
        protocol: crypto::NOISE_PARAMS.into(),
        regenerate: "cargo test --lib handshake::vectors::regenerate -- --ignored".into(),
        handshakes,
        cookies,
    };
    let json = serde_json::to_string_pretty(&file).unwrap() + "\n";
    std::fs::write(PATH, json).unwrap();
}
