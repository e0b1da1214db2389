"""Oblivious HTTP (RFC 9458): a binary HTTP request sealed with HPKE to the gateway's key, and the response
sealed back under a key only that client and the gateway can derive.

Why: the relay in between learns who is asking but sees only ciphertext; the gateway learns what is asked but
only the relay's address. HPKE itself (RFC 9180) is pyhpke's, over `cryptography`'s X25519, HKDF and AEADs;
this module only lays out the RFC 9458 framing and the response key schedule.

Recipes, not primitives: callers never choose an ephemeral key or a response nonce (the underscore helpers that
take them exist for the RFC's worked example only). Every failure to decrypt is DecryptError, and nothing of a
message that failed is returned.
"""
from __future__ import annotations

import os
import secrets
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKey, KEMKeyPair
from pyhpke.exceptions import PyHPKEError

from ccserve.router.errors import DecryptError, MalformedMessage, UnknownKey

KEM_X25519_SHA256 = 0x0020
KDF_HKDF_SHA256 = 0x0001
AEAD_AES_128_GCM, AEAD_AES_256_GCM, AEAD_CHACHA20_POLY1305 = 0x0001, 0x0002, 0x0003
DEFAULT_SUITES = ((KDF_HKDF_SHA256, AEAD_AES_128_GCM),)

REQUEST_MEDIA_TYPE, RESPONSE_MEDIA_TYPE = "message/ohttp-req", "message/ohttp-res"
KEYS_MEDIA_TYPE = "application/ohttp-keys"
REQUEST_LABEL, RESPONSE_LABEL = b"message/bhttp request", b"message/bhttp response"

N_ENC = {KEM_X25519_SHA256: 32}                       # also Npk for X25519
HASHES = {KDF_HKDF_SHA256: hashes.SHA256}
AEADS = {AEAD_AES_128_GCM: (AESGCM, 16, 12), AEAD_AES_256_GCM: (AESGCM, 32, 12),
         AEAD_CHACHA20_POLY1305: (ChaCha20Poly1305, 32, 12)}   # class, Nk, Nn
HEADER_LEN = 7                                        # key_id(1) kem_id(2) kdf_id(2) aead_id(2)


@dataclass(frozen=True)
class KeyConfig:
    """What a client needs to encapsulate to a gateway: key identifier, KEM, public key, KDF/AEAD pairs."""
    key_id: int
    kem_id: int
    public_key: bytes
    suites: tuple[tuple[int, int], ...]

    def encode(self) -> bytes:
        algs = b"".join(struct.pack("!HH", kdf, aead) for kdf, aead in self.suites)
        return struct.pack("!BH", self.key_id, self.kem_id) + self.public_key + struct.pack("!H", len(algs)) + algs

    @classmethod
    def decode(cls, data: bytes) -> KeyConfig:
        if len(data) < 3:
            raise MalformedMessage("OHTTP key configuration is too short")
        key_id, kem_id = struct.unpack_from("!BH", data)
        npk = N_ENC.get(kem_id)
        if npk is None:
            raise MalformedMessage(f"OHTTP key configuration uses KEM {kem_id:#06x}; only X25519 (0x0020) is "
                                   "supported")
        if len(data) < 3 + npk + 2:
            raise MalformedMessage("OHTTP key configuration is truncated")
        public_key = data[3:3 + npk]
        (algs_len,) = struct.unpack_from("!H", data, 3 + npk)
        algs = data[5 + npk:]
        if algs_len != len(algs) or algs_len < 4 or algs_len % 4:
            raise MalformedMessage("OHTTP key configuration has a bad symmetric algorithms length")
        suites = tuple(struct.unpack_from("!HH", algs, i) for i in range(0, algs_len, 4))
        return cls(key_id, kem_id, public_key, suites)

    def usable_suite(self) -> tuple[int, int]:
        """The first (KDF, AEAD) pair of this configuration that we implement."""
        for kdf, aead in self.suites:
            if kdf in HASHES and aead in AEADS:
                return kdf, aead
        raise UnknownKey("the gateway's key configuration offers no KDF/AEAD pair this client implements")


def encode_key_configs(configs: list[KeyConfig]) -> bytes:
    """application/ohttp-keys: each configuration prefixed with its 2-byte length."""
    out = bytearray()
    for config in configs:
        encoded = config.encode()
        out += struct.pack("!H", len(encoded)) + encoded
    return bytes(out)


def decode_key_configs(data: bytes) -> list[KeyConfig]:
    """Every configuration of an application/ohttp-keys body. A body with any encoding error is refused
    whole (RFC 9458 section 3.2: recovering part of it differently from other clients could single us out)."""
    configs, pos = [], 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise MalformedMessage("application/ohttp-keys ends inside a length")
        (size,) = struct.unpack_from("!H", data, pos)
        if pos + 2 + size > len(data):
            raise MalformedMessage("application/ohttp-keys ends inside a key configuration")
        configs.append(KeyConfig.decode(data[pos + 2:pos + 2 + size]))
        pos += 2 + size
    if not configs:
        raise MalformedMessage("application/ohttp-keys holds no key configuration")
    return configs


class GatewayKey:
    """The gateway's HPKE key pair: generated in memory at start, never written anywhere."""

    def __init__(self, key_id: int, private_key: X25519PrivateKey,
                 suites: tuple[tuple[int, int], ...] = DEFAULT_SUITES) -> None:
        if not 0 <= key_id <= 255:
            raise ValueError(f"OHTTP key identifier {key_id} must be 0..255")
        self.key_id, self._private, self.suites = key_id, private_key, suites
        public = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.config = KeyConfig(key_id, KEM_X25519_SHA256, public, suites)

    @classmethod
    def generate(cls, key_id: int | None = None) -> GatewayKey:
        return cls(secrets.randbelow(256) if key_id is None else key_id, X25519PrivateKey.generate())

    def hpke_private_key(self):
        return KEMKey.from_pyca_cryptography_key(self._private)


def _hpke_suite(kem_id: int, kdf_id: int, aead_id: int) -> CipherSuite:
    return CipherSuite.new(KEMId(kem_id), KDFId(kdf_id), AEADId(aead_id))


def _header(key_id: int, kem_id: int, kdf_id: int, aead_id: int) -> bytes:
    return struct.pack("!BHHH", key_id, kem_id, kdf_id, aead_id)


def response_keys(hpke_context, enc: bytes, response_nonce: bytes, label: bytes, kdf_id: int,
                  aead_id: int) -> tuple[bytes, bytes]:
    """(AEAD key, AEAD nonce) of the response, RFC 9458 section 4.4: export a secret from the HPKE context,
    extract with salt enc || response_nonce, expand to "key" and "nonce"."""
    _, nk, nn = AEADS[aead_id]
    algorithm = HASHES[kdf_id]()
    secret = hpke_context.export(label, max(nk, nn))
    prk = HKDF.extract(algorithm, enc + response_nonce, secret)
    key = HKDFExpand(HASHES[kdf_id](), nk, b"key").derive(prk)
    nonce = HKDFExpand(HASHES[kdf_id](), nn, b"nonce").derive(prk)
    return key, nonce


def response_nonce_len(aead_id: int) -> int:
    _, nk, nn = AEADS[aead_id]
    return max(nk, nn)


def aead(aead_id: int, key: bytes):
    return AEADS[aead_id][0](key)


class ClientContext:
    """What a client keeps between sending an encapsulated request and opening its response."""

    def __init__(self, hpke_context, enc: bytes, kdf_id: int, aead_id: int) -> None:
        self.hpke_context, self.enc, self.kdf_id, self.aead_id = hpke_context, enc, kdf_id, aead_id

    def open_response(self, enc_response: bytes) -> bytes:
        """The binary HTTP response inside `enc_response`; DecryptError if it was altered or truncated."""
        n = response_nonce_len(self.aead_id)
        if len(enc_response) < n + 16:
            raise DecryptError("encapsulated response is too short: truncated in transit")
        key, nonce = response_keys(self.hpke_context, self.enc, enc_response[:n], RESPONSE_LABEL,
                                   self.kdf_id, self.aead_id)
        try:
            return aead(self.aead_id, key).decrypt(nonce, enc_response[n:], b"")
        except InvalidTag:
            raise DecryptError("encapsulated response failed authentication: altered in transit") from None


def encapsulate_request(config: KeyConfig, request: bytes) -> tuple[bytes, ClientContext]:
    """(message/ohttp-req body, context to open the response with) for a binary HTTP request."""
    return _encapsulate_request(config, request, REQUEST_LABEL, None)


def setup_sender(config: KeyConfig, label: bytes, ephemeral: X25519PrivateKey | None):
    """(header, enc, HPKE sender context, kdf_id, aead_id) for a request to `config` under `label`."""
    if config.kem_id != KEM_X25519_SHA256:
        raise UnknownKey(f"gateway KEM {config.kem_id:#06x} is not supported")
    kdf_id, aead_id = config.usable_suite()
    header = _header(config.key_id, config.kem_id, kdf_id, aead_id)
    suite = _hpke_suite(config.kem_id, kdf_id, aead_id)
    pkr = KEMKey.from_pyca_cryptography_key(X25519PublicKey.from_public_bytes(config.public_key))
    eks = None
    if ephemeral is not None:
        eks = KEMKeyPair(KEMKey.from_pyca_cryptography_key(ephemeral),
                         KEMKey.from_pyca_cryptography_key(ephemeral.public_key()))
    enc, context = suite.create_sender_context(pkr, label + b"\x00" + header, eks=eks)
    return header, enc, context, kdf_id, aead_id


def _encapsulate_request(config: KeyConfig, request: bytes, label: bytes,
                         ephemeral: X25519PrivateKey | None) -> tuple[bytes, ClientContext]:
    header, enc, context, kdf_id, aead_id = setup_sender(config, label, ephemeral)
    ct = context.seal(request, b"")
    return header + enc + ct, ClientContext(context, enc, kdf_id, aead_id)


class GatewayContext:
    """What the gateway keeps between opening a request and sealing its response."""

    def __init__(self, hpke_context, enc: bytes, kdf_id: int, aead_id: int) -> None:
        self.hpke_context, self.enc, self.kdf_id, self.aead_id = hpke_context, enc, kdf_id, aead_id

    def seal_response(self, response: bytes) -> bytes:
        """message/ohttp-res body for a binary HTTP response, under a fresh random response nonce."""
        return self._seal_response(response, os.urandom(response_nonce_len(self.aead_id)))

    def _seal_response(self, response: bytes, response_nonce: bytes) -> bytes:
        key, nonce = response_keys(self.hpke_context, self.enc, response_nonce, RESPONSE_LABEL,
                                   self.kdf_id, self.aead_id)
        return response_nonce + aead(self.aead_id, key).encrypt(nonce, response, b"")


def setup_receiver(key: GatewayKey, data: bytes, label: bytes):
    """(HPKE recipient context, enc, kdf_id, aead_id, position after enc) for a request header in `data`."""
    if len(data) < HEADER_LEN:
        raise DecryptError("encapsulated request is shorter than its header")
    key_id, kem_id, kdf_id, aead_id = struct.unpack_from("!BHHH", data)
    if key_id != key.key_id or kem_id != KEM_X25519_SHA256:
        raise UnknownKey("encapsulated request names a key this gateway does not hold: fetch GET /ohttp-keys")
    if (kdf_id, aead_id) not in key.suites:
        raise UnknownKey("encapsulated request uses a KDF/AEAD pair this gateway does not offer")
    n_enc = N_ENC[kem_id]
    if len(data) < HEADER_LEN + n_enc:
        raise DecryptError("encapsulated request is truncated inside its encapsulated key")
    enc = bytes(data[HEADER_LEN:HEADER_LEN + n_enc])
    info = label + b"\x00" + bytes(data[:HEADER_LEN])
    try:
        context = _hpke_suite(kem_id, kdf_id, aead_id).create_recipient_context(enc, key.hpke_private_key(), info)
    except (PyHPKEError, ValueError):
        raise DecryptError("encapsulated request carries an invalid encapsulated key") from None
    return context, enc, kdf_id, aead_id, HEADER_LEN + n_enc


def decapsulate_request(key: GatewayKey, enc_request: bytes) -> tuple[bytes, GatewayContext]:
    """(binary HTTP request, context to seal the response with); DecryptError if it was altered in transit,
    UnknownKey if it was sealed to another key."""
    context, enc, kdf_id, aead_id, pos = setup_receiver(key, enc_request, REQUEST_LABEL)
    try:
        request = context.open(bytes(enc_request[pos:]), b"")
    except PyHPKEError:
        raise DecryptError("encapsulated request failed authentication: altered in transit") from None
    return request, GatewayContext(context, enc, kdf_id, aead_id)
