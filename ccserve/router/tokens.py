"""Anonymous tokens: proof that a request was paid for by some authenticated client, without saying which.

A token is an RSA blind signature (RFC 9474, RSABSSA-SHA384-PSS-Randomized) over a message the issuer never saw:

    Token = version (1) = 1 || key_id (32) || msg_prefix (32) || nonce (32) || signature (modulus length)
    msg = "ccserve token v1" || key_id || nonce          input_msg = msg_prefix || msg

key_id is SHA-256 of the issuer public key (SubjectPublicKeyInfo, DER); nonce is the client's 32 random bytes.
The client puts a token in the `ccserve-token` header of its (encrypted) inner request, base64url-encoded; the
gateway verifies it and spends it: a second use of the same (key_id, nonce) is refused. Because the issuer
signed a blinded value, neither the issuer nor the gateway can link a spent token to its issuance.

Limits, stated: the spent set lives in the gateway's memory, one process; a restarted gateway must come with
a new issuer key (the issuer's key also lives in memory only, so restarting both together does it). The gateway
keeps the spent sets of at most KEEP_KEYS issuer keys; tokens of older keys are refused.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_der_public_key

from ccserve.router import blind_rsa
from ccserve.router.errors import IssuanceRefused, TokenRefused

VERSION = 1
DOMAIN = b"ccserve token v1"
KEY_ID_LEN = NONCE_LEN = 32
TOKEN_HEADER = "ccserve-token"
KEEP_KEYS = 2


def key_id(public_key: rsa.RSAPublicKey) -> bytes:
    return hashlib.sha256(public_key_der(public_key)).digest()


def public_key_der(public_key: rsa.RSAPublicKey) -> bytes:
    return public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def load_public_key(der: bytes) -> rsa.RSAPublicKey:
    try:
        key = load_der_public_key(der)
    except ValueError:
        raise IssuanceRefused("token key is not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
        raise IssuanceRefused("token key must be an RSA key of at least 2048 bits")
    return key


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenRefused("token is not valid base64url") from None


@dataclass(frozen=True)
class Token:
    key_id: bytes
    msg_prefix: bytes
    nonce: bytes
    signature: bytes

    def input_msg(self) -> bytes:
        return self.msg_prefix + DOMAIN + self.key_id + self.nonce

    def encode(self) -> bytes:
        return bytes([VERSION]) + self.key_id + self.msg_prefix + self.nonce + self.signature

    @classmethod
    def decode(cls, data: bytes) -> Token:
        a = 1 + KEY_ID_LEN                  # end of key_id
        b = a + blind_rsa.PREFIX_LEN        # end of msg_prefix
        c = b + NONCE_LEN                   # end of nonce; the signature follows
        if len(data) < c + 256 or data[0] != VERSION:
            raise TokenRefused("token is malformed or of an unknown version")
        return cls(data[1:a], data[a:b], data[b:c], data[c:])

    def header_value(self) -> str:
        return _b64url(self.encode())

    @classmethod
    def from_header(cls, value: str) -> Token:
        return cls.decode(_unb64url(value.strip()))


@dataclass
class PendingToken:
    """Client-side state between sending a blinded message and receiving its signature. Secret: the inverse
    unblinds, and the nonce is what will be spent."""
    public_key: rsa.RSAPublicKey
    input_msg: bytes
    inv: int
    blinded: bytes

    def complete(self, blind_sig: bytes) -> Token:
        sig = blind_rsa.finalize(self.public_key, self.input_msg, blind_sig, self.inv)
        prefix, msg = self.input_msg[:blind_rsa.PREFIX_LEN], self.input_msg[blind_rsa.PREFIX_LEN:]
        kid, nonce = msg[len(DOMAIN):len(DOMAIN) + KEY_ID_LEN], msg[len(DOMAIN) + KEY_ID_LEN:]
        return Token(kid, prefix, nonce, sig)


def begin(public_key: rsa.RSAPublicKey) -> PendingToken:
    """A fresh token request for the issuer key `public_key`: send `.blinded`, then `.complete(blind_sig)`."""
    msg = DOMAIN + key_id(public_key) + os.urandom(NONCE_LEN)
    input_msg = blind_rsa.prepare(msg)
    blinded, inv = blind_rsa.blind(public_key, input_msg)
    return PendingToken(public_key, input_msg, inv, blinded)


class TokenVerifier:
    """Gateway side: accepts tokens of the issuer keys it was given, each (key, nonce) once."""

    def __init__(self, public_keys: list[rsa.RSAPublicKey] = ()) -> None:
        self._keys: dict[bytes, rsa.RSAPublicKey] = {}
        self._spent: dict[bytes, set[bytes]] = {}
        for key in public_keys:
            self.add_key(key)

    def key_ids(self) -> list[bytes]:
        return list(self._keys)

    def add_key(self, public_key: rsa.RSAPublicKey) -> None:
        """Accept tokens of `public_key` too; the oldest key beyond KEEP_KEYS is dropped with its spent set."""
        kid = key_id(public_key)
        if kid in self._keys:
            return
        self._keys[kid], self._spent[kid] = public_key, set()
        while len(self._keys) > KEEP_KEYS:
            oldest = next(iter(self._keys))
            del self._keys[oldest], self._spent[oldest]

    def knows(self, token: Token) -> bool:
        return token.key_id in self._keys

    def redeem(self, token: Token) -> None:
        """Verify and spend `token`, or raise TokenRefused. Verification comes first, so an invalid token can
        never burn a valid one's nonce; the check and the spend happen without an await in between."""
        public_key = self._keys.get(token.key_id)
        if public_key is None:
            raise TokenRefused("token is signed by an issuer key this gateway does not accept: fetch fresh tokens")
        if len(token.signature) != blind_rsa.modulus_len(public_key):
            raise TokenRefused("token signature has the wrong length for its issuer key")
        blind_rsa.verify(public_key, token.input_msg(), token.signature)
        spent = self._spent[token.key_id]
        if token.nonce in spent:
            raise TokenRefused("token was already spent: each token pays for one request")
        spent.add(token.nonce)

    def spent_count(self) -> int:
        return sum(len(s) for s in self._spent.values())
