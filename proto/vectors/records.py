#!/usr/bin/env python3
"""Generates records.json from proto/records.md, independently of the Rust code.

Uses only `cryptography` (Ed25519). The Rust test `gossip::records::tests::json_vectors`
checks the result byte for byte, so this script and the Rust encoder must agree.

    python3 proto/vectors/records.py > proto/vectors/records.json
"""
import base64
import json
import struct

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

LABEL = b"meshsec v1 gossip record"
SIGNED_KEYS = ["pubkey", "data_addrs", "hs_port", "proto", "status"]


def lv(b):
    return struct.pack(">I", len(b)) + b


def record(name, generation, signing_key, values):
    out = LABEL + lv(name.encode()) + struct.pack(">Q", generation) + signing_key
    for k in SIGNED_KEYS:
        out += lv(values[k].encode())
    return out


def vector(comment, seed, name, generation, values):
    sk = Ed25519PrivateKey.from_private_bytes(seed)
    pk = sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    rec = record(name, generation, pk, values)
    sig = sk.sign(rec)
    kv = dict(values)
    kv["sig_key"] = base64.b64encode(pk).decode()
    kv["sig"] = base64.b64encode(sig).decode()
    return {
        "comment": comment,
        "seed": seed.hex(),
        "signing_key": pk.hex(),
        "name": name,
        "generation": generation,
        "key_values": kv,
        "record": rec.hex(),
        "signature": sig.hex(),
    }


noise = base64.b64encode(bytes(range(32))).decode()
up = {
    "pubkey": noise,
    "data_addrs": "192.0.2.1,2001:db8::1",
    "hs_port": "9341",
    "proto": "1",
    "status": "up",
}
vectors = [
    vector("a member up, IPv4 and IPv6", bytes([1] * 32), "node-a", 1767225600000, up),
    vector("the same member after leaving (re-signed)", bytes([1] * 32), "node-a", 1767225600000,
           dict(up, status="left")),
    vector("no data address: the empty value is signed", bytes(range(32, 64)), "b", 1, dict(up, data_addrs="")),
]
print(json.dumps({"spec": "proto/records.md", "vectors": vectors}, indent=2))
