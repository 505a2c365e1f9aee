#!/usr/bin/env python3
"""Generates certs.json from proto/certs.md, independently of the Rust code.

Uses only `cryptography` (Ed25519). The Rust test `cert::tests::json_vectors`
checks the result byte for byte, so this script and the Rust encoder and
decoder must agree.

    python3 proto/vectors/certs.py > proto/vectors/certs.json
"""
import base64
import hashlib
import ipaddress
import json
import struct

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

LABEL = b"meshsec v1 certificate"


def public(seed):
    sk = Ed25519PrivateKey.from_private_bytes(seed)
    return sk, sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def fingerprint(b):
    d = hashlib.sha256(b).digest()[:8]
    return ":".join(d[i:i + 2].hex() for i in range(0, 8, 2))


def body(ca_pk, name, node_pk, ranges, not_before, not_after):
    out = bytes([1]) + hashlib.sha256(ca_pk).digest()[:8]
    out += bytes([len(name)]) + name.encode() + node_pk
    out += bytes([len(ranges)])
    for r in ranges:
        net = ipaddress.ip_network(r)
        out += bytes([net.version]) + net.network_address.packed + bytes([net.prefixlen])
    out += struct.pack(">QQ", not_before, not_after)
    return out


def vector(comment, ca_seed, node_seed, name, ranges, not_before, not_after):
    ca_sk, ca_pk = public(ca_seed)
    _, node_pk = public(node_seed)
    b = body(ca_pk, name, node_pk, ranges, not_before, not_after)
    sig = ca_sk.sign(LABEL + b)
    cert = b + sig
    return {
        "comment": comment,
        "ca_seed": ca_seed.hex(),
        "ca_key": ca_pk.hex(),
        "ca_key_id": hashlib.sha256(ca_pk).digest()[:8].hex(),
        "node_key": node_pk.hex(),
        "name": name,
        "ranges": ranges,
        "not_before": not_before,
        "not_after": not_after,
        "signed": (LABEL + b).hex(),
        "cert": cert.hex(),
        "text": base64.b64encode(cert).decode(),
        "fingerprint": fingerprint(cert),
    }


CA = bytes(range(32))
NODE = bytes([0x42] * 32)
good = [
    vector("IPv4 host and network", CA, NODE, "node-1", ["10.0.0.1/32", "192.168.10.0/24"],
           1_700_000_000, 1_800_000_000),
    vector("IPv6 and IPv4, a whole family", CA, bytes([7] * 32), "db.example_2",
           ["2001:db8::/32", "0.0.0.0/0"], 0, 2**64 - 1),
]

g = bytes.fromhex(good[0]["cert"])
name_at = 1 + 8
ranges_at = name_at + 1 + len("node-1") + 32
def patch(at, value):
    b = bytearray(g)
    b[at] = value
    return bytes(b).hex()

bad = [
    {"comment": "version 2", "cert": patch(0, 2), "error": "version"},
    {"comment": "truncated signature", "cert": g[:-1].hex(), "error": "truncated"},
    {"comment": "one byte after the signature", "cert": (g + b"\0").hex(), "error": "trailing"},
    {"comment": "name with a space", "cert": patch(name_at + 1 + 4, 0x20), "error": "name"},
    {"comment": "empty name", "cert": (g[:name_at] + b"\0" + g[name_at + 1 + 6:]).hex(), "error": "name"},
    {"comment": "no ranges", "cert": patch(ranges_at, 0), "error": "range"},
    {"comment": "17 ranges", "cert": patch(ranges_at, 17), "error": "range"},
    {"comment": "family 5", "cert": patch(ranges_at + 1, 5), "error": "range"},
    {"comment": "prefix 33 on IPv4", "cert": patch(ranges_at + 1 + 1 + 4, 33), "error": "range"},
    {"comment": "host bits set: 192.168.10.1/24", "cert": patch(ranges_at + 7 + 1 + 3, 1), "error": "range"},
    {"comment": "not_after equal to not_before", "cert": (g[:-64 - 16] + struct.pack(">QQ", 5, 5) + g[-64:]).hex(), "error": "validity"},
]
# Decodes, but the signature no longer verifies: a tampered not_after (a
# later expiry) and a tampered range (a wider network).
tampered = [
    {"comment": "not_after moved later", "cert": (g[:-64 - 8] + struct.pack(">Q", 1_900_000_000) + g[-64:]).hex()},
    {"comment": "range widened to /16", "cert": (g[:ranges_at + 7 + 1] + bytes([192, 168, 0, 0, 16]) + g[ranges_at + 7 + 6:]).hex()},
    {"comment": "signature bit flipped", "cert": (g[:-1] + bytes([g[-1] ^ 1])).hex()},
]

print(json.dumps({"spec": "proto/certs.md", "label": LABEL.decode(), "vectors": good,
                  "malformed": bad, "tampered": tampered}, indent=2))
