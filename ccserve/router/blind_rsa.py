"""RSA blind signatures (RFC 9474), variant RSABSSA-SHA384-PSS-Randomized: the issuer signs a message it never
sees, so a token it issued cannot be linked to the request that later spends it.

client:  input_msg = prepare(msg); blinded, inv = blind(pk, input_msg)      --blinded-->  issuer
issuer:  blind_sig = blind_sign(sk, blinded)                                 <--blind_sig--
client:  sig = finalize(pk, input_msg, blind_sig, inv)    anyone: verify(pk, input_msg, sig)

No Python library on PyPI implements RFC 9474, so the protocol steps are here, over Python integers:
EMSA-PSS-ENCODE (RFC 8017 9.1.1, with MGF1/SHA-384 from hashlib) and the blinding arithmetic. What is not
hand-written: the issuer's private-key operation runs in GMP's side-channel-silent `powmod_sec` (gmpy2), keys
come from `cryptography`, and every signature is checked by `cryptography`'s RSASSA-PSS verification, both in
finalize() (as the RFC requires) and wherever a token is spent. Tested against RFC 9474 Appendix A.
"""
from __future__ import annotations

import hashlib
import math
import os
import secrets

import gmpy2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ccserve.router.errors import IssuanceRefused, TokenRefused

VARIANT = "RSABSSA-SHA384-PSS-Randomized"
H_LEN = SALT_LEN = 48
PREFIX_LEN = 32
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=SALT_LEN)


def modulus_len(key: rsa.RSAPublicKey | rsa.RSAPrivateKey) -> int:
    return (key.key_size + 7) // 8


def prepare(msg: bytes) -> bytes:
    """PrepareRandomize: a fresh 32-byte prefix, so the issuer's signature never covers a value it could choose."""
    return os.urandom(PREFIX_LEN) + msg


def _mgf1(seed: bytes, length: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha384(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def emsa_pss_encode(msg: bytes, em_bits: int, salt: bytes) -> bytes:
    """RFC 8017 section 9.1.1 with SHA-384 and MGF1-SHA-384."""
    em_len = (em_bits + 7) // 8
    if em_len < H_LEN + len(salt) + 2:
        raise ValueError("RSA modulus too small for EMSA-PSS with SHA-384 and a 48-byte salt")
    m_hash = hashlib.sha384(msg).digest()
    h = hashlib.sha384(bytes(8) + m_hash + salt).digest()
    db = bytes(em_len - len(salt) - H_LEN - 2) + b"\x01" + salt
    masked = bytearray(a ^ b for a, b in zip(db, _mgf1(h, em_len - H_LEN - 1)))
    masked[0] &= 0xFF >> (8 * em_len - em_bits)
    return bytes(masked) + h + b"\xbc"


def blind(public_key: rsa.RSAPublicKey, input_msg: bytes) -> tuple[bytes, int]:
    """(blinded message to send to the issuer, inverse to keep for finalize)."""
    return _blind(public_key, input_msg, os.urandom(SALT_LEN), None)


def _blind(public_key: rsa.RSAPublicKey, input_msg: bytes, salt: bytes, r: int | None) -> tuple[bytes, int]:
    n, e = public_key.public_numbers().n, public_key.public_numbers().e
    encoded = emsa_pss_encode(input_msg, n.bit_length() - 1, salt)
    m = int.from_bytes(encoded, "big")
    if math.gcd(m, n) != 1:
        raise ValueError("invalid input: the encoded message is not coprime with the issuer's modulus")
    while True:
        r = r if r is not None else secrets.randbelow(n - 1) + 1
        try:
            inv = pow(r, -1, n)
            break
        except ValueError:   # r shares a factor with n: negligible, draw again (RFC 9474 "blinding error")
            r = None
    z = (m * pow(r, e, n)) % n
    return z.to_bytes(modulus_len(public_key), "big"), inv


class BlindSigner:
    """The issuer's private-key operation: RSASP1 by CRT in constant-time modular exponentiation, checked with
    the public key before it is released (a fault in the CRT would otherwise leak a factor of n)."""

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        numbers = private_key.private_numbers()
        self.public_key = private_key.public_key()
        self._n, self._e = numbers.public_numbers.n, numbers.public_numbers.e
        self._p, self._q = gmpy2.mpz(numbers.p), gmpy2.mpz(numbers.q)
        self._dp, self._dq, self._qinv = gmpy2.mpz(numbers.dmp1), gmpy2.mpz(numbers.dmq1), gmpy2.mpz(numbers.iqmp)
        self._len = modulus_len(private_key)

    def blind_sign(self, blinded_msg: bytes) -> bytes:
        if len(blinded_msg) != self._len:
            raise IssuanceRefused(f"blinded message must be {self._len} bytes (the issuer key's modulus length)")
        m = int.from_bytes(blinded_msg, "big")
        if m >= self._n:
            raise IssuanceRefused("blinded message is not below the issuer's modulus: it was not blinded to "
                                  "this key; fetch the current token key")
        s1 = gmpy2.powmod_sec(m % self._p, self._dp, self._p)
        s2 = gmpy2.powmod_sec(m % self._q, self._dq, self._q)
        s = int(s2 + self._q * ((self._qinv * (s1 - s2)) % self._p))
        if pow(s, self._e, self._n) != m:
            raise IssuanceRefused("signing failure (RSA-CRT fault); nothing was released")
        return s.to_bytes(self._len, "big")


def verify(public_key: rsa.RSAPublicKey, input_msg: bytes, sig: bytes) -> None:
    """RSASSA-PSS-VERIFY with SHA-384, MGF1-SHA-384, 48-byte salt (by `cryptography`); TokenRefused if bad."""
    try:
        public_key.verify(sig, input_msg, PSS, hashes.SHA384())
    except InvalidSignature:
        raise TokenRefused("token signature does not verify under the issuer key it names") from None


def finalize(public_key: rsa.RSAPublicKey, input_msg: bytes, blind_sig: bytes, inv: int) -> bytes:
    """Unblind the issuer's answer into a signature over input_msg, and check it before returning it."""
    if len(blind_sig) != modulus_len(public_key):
        raise IssuanceRefused("blind signature has the wrong length for the issuer key")
    n = public_key.public_numbers().n
    sig = ((int.from_bytes(blind_sig, "big") * inv) % n).to_bytes(modulus_len(public_key), "big")
    try:
        verify(public_key, input_msg, sig)
    except TokenRefused:
        raise IssuanceRefused("the issuer's blind signature does not verify: a wrong key or a faulty issuer") \
            from None
    return sig
