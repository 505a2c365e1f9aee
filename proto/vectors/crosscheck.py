#!/usr/bin/env python3
"""Independent check of handshake.json against proto/handshake.md.

Re-derives every vector with a second Noise implementation (the `noiseprotocol` package) and
`cryptography`, written from the spec only, so the Rust code is not checking itself.

    python3 -m venv /tmp/xcheck && /tmp/xcheck/bin/pip install noiseprotocol cryptography
    /tmp/xcheck/bin/python proto/vectors/crosscheck.py

Not part of CI (it needs those two packages); run it after regenerating the vectors.
"""
import hashlib
import hmac
import ipaddress
import json
import os
import struct
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from noise.connection import Keypair, NoiseConnection

PROLOGUE = b"meshsec v1 handshake"
ALGS = {"aes128gcm": (1, 20), "aes256gcm": (2, 36), "chacha20poly1305": (3, 36)}


def hkdf(salt, ikm, info, length):
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def mac16(key, data):
    return hmac.new(key, data, hashlib.sha256).digest()[:16]


def pub(priv):
    return X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def noise(initiator, s_priv, e_priv, psk, remote_pub=None):
    c = NoiseConnection.from_name(b"Noise_IKpsk2_25519_ChaChaPoly_SHA256")
    c.set_as_initiator() if initiator else c.set_as_responder()
    c.set_keypair_from_private_bytes(Keypair.STATIC, s_priv)
    c.set_keypair_from_private_bytes(Keypair.EPHEMERAL, e_priv)
    if remote_pub:
        c.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote_pub)
    c.set_psks(psk)
    c.set_prologue(PROLOGUE)
    c.start_handshake()
    return c


def check_handshake(v):
    h = bytes.fromhex
    alg_id, key_len = ALGS[v["algorithm"]]
    secret = h(v["cluster_secret"])
    i_priv, r_priv = h(v["initiator_static_private"]), h(v["responder_static_private"])
    i_pub, r_pub = pub(i_priv), pub(r_priv)
    psk = hkdf(None, secret, b"meshsec v1 handshake psk", 32)
    mac1_to_r = hkdf(None, secret, b"meshsec v1 mac1" + r_pub, 32)
    mac1_to_i = hkdf(None, secret, b"meshsec v1 mac1" + i_pub, 32)

    init_payload = struct.pack(">QIB3x", int(v["initiator_timestamp"]), v["initiator_spi"], alg_id)
    ini = noise(True, i_priv, h(v["initiator_ephemeral_private"]), psk, r_pub)
    m1 = ini.write_message(init_payload)
    initiation = struct.pack(">BBHI", 1, 1, 0, v["initiator_index"]) + m1
    initiation += mac16(mac1_to_r, initiation) + bytes(16)

    res = noise(False, r_priv, h(v["responder_ephemeral_private"]), psk)
    assert res.read_message(m1) == init_payload
    resp_payload = struct.pack(">IB3xQ", v["responder_spi"], alg_id, int(v["responder_timestamp"]))
    m2 = res.write_message(resp_payload)
    response = struct.pack(">BBHII", 1, 2, 0, v["responder_index"], v["initiator_index"]) + m2
    response += mac16(mac1_to_i, response) + bytes(16)
    assert ini.read_message(m2) == resp_payload
    assert ini.handshake_finished and res.handshake_finished

    hh = ini.get_handshake_hash()
    k1 = ini.noise_protocol.cipher_state_encrypt.k
    k2 = ini.noise_protocol.cipher_state_decrypt.k
    key_i2r = hkdf(hh, k1, b"meshsec v1 esp i2r" + bytes([alg_id]), key_len)
    key_r2i = hkdf(hh, k2, b"meshsec v1 esp r2i" + bytes([alg_id]), key_len)

    want = {
        "initiator_static_public": i_pub, "responder_static_public": r_pub, "psk": psk,
        "mac1_key_to_responder": mac1_to_r, "mac1_key_to_initiator": mac1_to_i,
        "initiation_payload": init_payload, "initiation": initiation,
        "response_payload": resp_payload, "response": response, "handshake_hash": hh,
        "key_i2r": key_i2r, "key_r2i": key_r2i,
    }
    for k, val in want.items():
        assert v[k] == val.hex(), f"{v['name']}: {k} differs"
    assert v["session_id"] == str(int.from_bytes(hh[:8], "big")), f"{v['name']}: session_id"
    return initiation


def check_cookie(c, hv, initiation):
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    h = bytes.fromhex
    r_pub = pub(h(hv["responder_static_private"]))
    cookie_key = hkdf(None, h(hv["cluster_secret"]), b"meshsec v1 cookie" + r_pub, 32)
    host, port = c["source"].rsplit(":", 1)
    ip = ipaddress.ip_address(host.strip("[]"))
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    cookie = mac16(h(c["rotating_secret"]), ip.packed + struct.pack(">H", int(port)))
    mac1 = initiation[120:136]
    # XChaCha20-Poly1305 = HChaCha20 subkey + ChaCha20-Poly1305 with nonce 0000 ‖ nonce[16:24].
    nonce = h(c["nonce"])
    sealed = ChaCha20Poly1305(hchacha20(cookie_key, nonce[:16])).encrypt(bytes(4) + nonce[16:], cookie, mac1)
    reply = struct.pack(">BBHI", 1, 3, 0, hv["initiator_index"]) + nonce + sealed
    with_mac2 = initiation[:136] + mac16(cookie, initiation[:136])
    want = {"cookie_key": cookie_key, "cookie": cookie, "trigger_mac1": mac1,
            "cookie_reply": reply, "initiation_with_mac2": with_mac2}
    for k, val in want.items():
        assert c[k] == val.hex(), f"{c['name']}: {k} differs"


def hchacha20(key, nonce16):
    def rotl(x, n):
        return ((x << n) & 0xFFFFFFFF) | (x >> (32 - n))

    def qr(s, a, b, c, d):
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] = rotl(s[d] ^ s[a], 16)
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] = rotl(s[b] ^ s[c], 12)
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] = rotl(s[d] ^ s[a], 8)
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] = rotl(s[b] ^ s[c], 7)

    s = list(struct.unpack("<4I", b"expand 32-byte k")) + list(struct.unpack("<8I", key)) + list(
        struct.unpack("<4I", nonce16))
    for _ in range(10):
        qr(s, 0, 4, 8, 12); qr(s, 1, 5, 9, 13); qr(s, 2, 6, 10, 14); qr(s, 3, 7, 11, 15)
        qr(s, 0, 5, 10, 15); qr(s, 1, 6, 11, 12); qr(s, 2, 7, 8, 13); qr(s, 3, 4, 9, 14)
    return struct.pack("<8I", *(s[0:4] + s[12:16]))


def main():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "handshake.json")
    data = json.load(open(path))
    inits = {}
    for v in data["handshakes"]:
        inits[v["name"]] = check_handshake(v)
    for c in data["cookies"]:
        hv = next(v for v in data["handshakes"] if v["name"] == c["handshake"])
        check_cookie(c, hv, inits[c["handshake"]])
    n = len(data["handshakes"]) + len(data["cookies"])
    print(f"crosscheck: {n} passed, 0 failed")


if __name__ == "__main__":
    sys.exit(main())
