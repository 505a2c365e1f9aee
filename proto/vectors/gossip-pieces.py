#!/usr/bin/env python3
"""Generates the "pieces" vectors of gossip-seal.json from proto/gossip-seal.md, independently
of the Rust code.

Uses only `cryptography` (HKDF, ChaCha20-Poly1305); XChaCha20-Poly1305 is built from it with
HChaCha20 (draft-irtf-cfrg-xchacha), written out below. The script first re-derives the
existing version-1 vector (computed with libsodium) to check that construction. The Rust test
`gossip::pieces::tests::json_vectors` checks the result byte for byte.

    python3 proto/vectors/gossip-pieces.py   # prints the "pieces" array
"""
import json
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

BUDGET = 1400
OVERHEAD = 53
PIECE_HEADER = 12
PIECE_DATA = BUDGET - OVERHEAD - PIECE_HEADER


def hkdf(secret, info, n):
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=None, info=info).derive(secret)


def rotl(v, c):
    return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))


def hchacha20(key, nonce16):
    s = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574]
    s += list(struct.unpack("<8I", key)) + list(struct.unpack("<4I", nonce16))

    def qr(a, b, c, d):
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] = rotl(s[d] ^ s[a], 16)
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] = rotl(s[b] ^ s[c], 12)
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] = rotl(s[d] ^ s[a], 8)
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] = rotl(s[b] ^ s[c], 7)

    for _ in range(10):
        qr(0, 4, 8, 12); qr(1, 5, 9, 13); qr(2, 6, 10, 14); qr(3, 7, 11, 15)
        qr(0, 5, 10, 15); qr(1, 6, 11, 12); qr(2, 7, 8, 13); qr(3, 4, 9, 14)
    return struct.pack("<8I", *(s[0:4] + s[12:16]))


def xchacha_seal(key, nonce24, plaintext, aad):
    sub = hchacha20(key, nonce24[:16])
    return ChaCha20Poly1305(sub).encrypt(b"\0\0\0\0" + nonce24[16:], plaintext, aad)


def seal(secret, version, sent_at_ms, nonce, payload):
    key = hkdf(secret, b"meshsec v1 gossip seal", 32)
    key_id = hkdf(secret, b"meshsec v1 gossip key id", 4)
    header = bytes([version]) + key_id + nonce
    return header + xchacha_seal(key, nonce, struct.pack(">Q", sent_at_ms) + payload, header)


def pieces(message_id, message):
    count = (len(message) + PIECE_DATA - 1) // PIECE_DATA
    for i in range(count):
        data = message[i * PIECE_DATA:(i + 1) * PIECE_DATA]
        yield struct.pack(">QHH", message_id, i, count) + data


def main():
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    doc = json.load(open(os.path.join(here, "gossip-seal.json")))
    for v in doc["vectors"]:
        got = seal(bytes.fromhex(v["secret"]), 1, v["sent_at_ms"], bytes.fromhex(v["nonce"]),
                   bytes.fromhex(v["payload"]))
        assert got.hex() == v["sealed"], "XChaCha20-Poly1305 construction disagrees with libsodium"
    secret = bytes([1] * 32)
    at = 1_700_000_000_000
    # The smallest message that does not fit one datagram: 1,348 bytes, in two pieces.
    message = bytes(i % 251 for i in range(BUDGET - OVERHEAD + 1))
    message_id = 0x0102030405060708
    out = {
        "name": "smallest message sent in pieces",
        "secret": secret.hex(),
        "sent_at_ms": at,
        "message_id": message_id,
        "message": message.hex(),
        "pieces": [],
    }
    for i, piece in enumerate(pieces(message_id, message)):
        nonce = bytes([4 + i] * 24)
        sealed = seal(secret, 2, at, nonce, piece)
        assert len(sealed) <= BUDGET
        out["pieces"].append({"nonce": nonce.hex(), "piece": piece.hex(), "sealed": sealed.hex()})
    print(json.dumps([out], indent=2))


if __name__ == "__main__":
    main()
