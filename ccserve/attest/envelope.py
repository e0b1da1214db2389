"""The sealed envelope: a request HPKE-encrypted to one attested node's key, and its response, streamed in
chunks that cannot be reordered, dropped, altered or cut short without the client noticing.

This is the *inner* layer, end to end between the client and the node; Oblivious HTTP (RFC 9458) is an outer
layer between the client and the gateway, and carries this envelope as an opaque body. It mirrors RFC 9458
sections 4.3-4.4 (and the chunked-OHTTP draft's response framing) so that both layers read alike.

Suite: DHKEM(X25519, HKDF-SHA256) = 0x0020, HKDF-SHA256 = 0x0001, AES-128-GCM = 0x0001 (RFC 9180), base mode.

Request (media type message/ccserve-sealed-request):

    hdr     = version (1 byte, 0x01) || key_id (8) || kem_id (2) || kdf_id (2) || aead_id (2)
    key_id  = SHA-256(node HPKE public key)[:8]   (lets a gateway route the envelope without opening it)
    info    = "message/ccserve-sealed-request" || 0x00 || hdr
    enc, ctx = SetupBaseS(pkR, info)
    request = hdr || enc (32) || ctx.Seal(aad="", body)

Response (media type message/ccserve-sealed-response):

    secret   = ctx.Export("message/ccserve-sealed-response", 16)
    nonce_r  = 16 random bytes chosen by the node
    prk      = HKDF-Extract(salt = enc || nonce_r, secret)
    key      = HKDF-Expand(prk, "key", 16);  iv = HKDF-Expand(prk, "nonce", 12)
    response = nonce_r || frame_0 || frame_1 || ... || frame_final
    frame_i  = flag (1 byte: 0x00 more, 0x01 final) || length (4, big-endian) || ct_i
    ct_i     = AES-128-GCM(key).Encrypt(nonce = iv XOR i (96-bit big-endian counter), chunk_i, aad = flag || length)

The counter in the nonce makes a reordered or dropped frame fail to decrypt; the authenticated final flag makes a
stream cut short detectable (no final frame) and a stream with frames after the final one refused. The node
chooses nonce_r, so a replayed request (same enc) still gets fresh response keys.
"""
from __future__ import annotations

import hashlib
import secrets
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKey, PyHPKEError

from ccserve.attest.errors import SealedMessageError

REQUEST_MEDIA_TYPE = "message/ccserve-sealed-request"
RESPONSE_MEDIA_TYPE = "message/ccserve-sealed-response"
VERSION = 0x01
KEM_ID, KDF_ID, AEAD_ID = KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES128_GCM
SUITE = CipherSuite.new(KEM_ID, KDF_ID, AEAD_ID)
N_ENC, N_K, N_N = 32, 16, 12
HDR_LEN = 1 + 8 + 6
FRAME_HEAD = struct.Struct(">BI")
MORE, FINAL = 0x00, 0x01


def key_id(public_key: bytes) -> bytes:
    return hashlib.sha256(public_key).digest()[:8]


def _hdr(public_key: bytes) -> bytes:
    return bytes([VERSION]) + key_id(public_key) + struct.pack(">HHH", KEM_ID.value, KDF_ID.value, AEAD_ID.value)


def _info(hdr: bytes) -> bytes:
    return REQUEST_MEDIA_TYPE.encode() + b"\x00" + hdr


def seal_request(node_public_key: bytes, body: bytes) -> tuple[bytes, ResponseOpener]:
    """Client side: the sealed request for the node whose raw X25519 public key is given, and the opener that
    will decrypt its response (it holds the only copy of the response secret)."""
    hdr = _hdr(node_public_key)
    pk = SUITE.kem.deserialize_public_key(node_public_key)
    enc, ctx = SUITE.create_sender_context(pk, info=_info(hdr))
    ct = ctx.seal(body, aad=b"")
    return hdr + enc + ct, ResponseOpener(ctx.export(RESPONSE_MEDIA_TYPE.encode(), N_K), enc)


def open_request(private_key: X25519PrivateKey, request: bytes) -> tuple[bytes, ResponseSealer]:
    """Node side: the request body, and the sealer for its response. SealedMessageError when the envelope is
    for another key, another suite or version, or was altered."""
    public = KEMKey.from_pyca_cryptography_key(private_key.public_key()).to_public_bytes()
    if len(request) < HDR_LEN + N_ENC + 16:
        raise SealedMessageError("the sealed request is too short to hold a header, an encapsulated key and a tag")
    hdr, enc, ct = request[:HDR_LEN], request[HDR_LEN:HDR_LEN + N_ENC], request[HDR_LEN + N_ENC:]
    if hdr[0] != VERSION or hdr[9:] != _hdr(public)[9:]:
        raise SealedMessageError(f"the sealed request is not version {VERSION} with X25519/HKDF-SHA256/AES-128-GCM")
    if hdr[1:9] != key_id(public):
        raise SealedMessageError("the sealed request is addressed to another node key: fetch this node's evidence "
                                 "again and seal to the key it attests")
    try:
        ctx = SUITE.create_recipient_context(enc, KEMKey.from_pyca_cryptography_key(private_key), info=_info(hdr))
        body = ctx.open(ct, aad=b"")
    except PyHPKEError:
        raise SealedMessageError("the sealed request does not decrypt: it was altered in transit") from None
    return body, ResponseSealer(ctx.export(RESPONSE_MEDIA_TYPE.encode(), N_K), enc)


def _response_keys(secret: bytes, enc: bytes, response_nonce: bytes) -> tuple[AESGCM, bytes]:
    prk = HKDF.extract(hashes.SHA256(), enc + response_nonce, secret)
    key = HKDFExpand(hashes.SHA256(), N_K, b"key").derive(prk)
    iv = HKDFExpand(hashes.SHA256(), N_N, b"nonce").derive(prk)
    return AESGCM(key), iv


def _nonce(iv: bytes, counter: int) -> bytes:
    return bytes(a ^ b for a, b in zip(iv, counter.to_bytes(N_N, "big")))


class ResponseSealer:
    """Node side: seals response chunks in order; the last one through `final`. Picks its own nonces (a recipe:
    callers never see an IV)."""

    def __init__(self, secret: bytes, enc: bytes) -> None:
        self._response_nonce = secrets.token_bytes(max(N_N, N_K))
        self._aead, self._iv = _response_keys(secret, enc, self._response_nonce)
        self._counter = 0
        self._started = False
        self._done = False

    def seal(self, chunk: bytes) -> bytes:
        """The bytes to send for one more chunk (the first call also carries the response nonce)."""
        return self._frame(chunk, MORE)

    def final(self, chunk: bytes = b"") -> bytes:
        """The bytes of the last chunk; nothing may be sealed after it."""
        return self._frame(chunk, FINAL)

    def _frame(self, chunk: bytes, flag: int) -> bytes:
        if self._done:
            raise RuntimeError("the response was already finalized")
        head = FRAME_HEAD.pack(flag, len(chunk) + 16)
        ct = self._aead.encrypt(_nonce(self._iv, self._counter), chunk, head)
        self._counter += 1
        self._done = flag == FINAL
        prefix = b"" if self._started else self._response_nonce
        self._started = True
        return prefix + head + ct


class ResponseOpener:
    """Client side: feed the response bytes as they arrive, get the plaintext chunks; `finish` at end of stream
    raises unless the final chunk arrived. Every failure is a SealedMessageError."""

    def __init__(self, secret: bytes, enc: bytes) -> None:
        self._secret, self._enc = secret, enc
        self._aead: AESGCM | None = None
        self._iv = b""
        self._buf = bytearray()
        self._counter = 0
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        chunks = []
        if self._aead is None:
            if len(self._buf) < max(N_N, N_K):
                return chunks
            nonce_len = max(N_N, N_K)
            self._aead, self._iv = _response_keys(self._secret, self._enc, bytes(self._buf[:nonce_len]))
            del self._buf[:nonce_len]
        while len(self._buf) >= FRAME_HEAD.size:
            if self._done:
                raise SealedMessageError("the sealed response has data after its final chunk")
            flag, length = FRAME_HEAD.unpack_from(self._buf)
            if flag not in (MORE, FINAL) or length < 16:
                raise SealedMessageError("the sealed response has a malformed frame header")
            if len(self._buf) < FRAME_HEAD.size + length:
                break
            head = bytes(self._buf[:FRAME_HEAD.size])
            ct = bytes(self._buf[FRAME_HEAD.size:FRAME_HEAD.size + length])
            del self._buf[:FRAME_HEAD.size + length]
            try:
                chunks.append(self._aead.decrypt(_nonce(self._iv, self._counter), ct, head))
            except InvalidTag:
                raise SealedMessageError(f"chunk {self._counter} of the sealed response does not decrypt: it was "
                                         "altered, reordered or a chunk before it was dropped") from None
            self._counter += 1
            self._done = flag == FINAL
        return chunks

    def finish(self) -> None:
        """Call at end of stream: a response without its final chunk was cut short."""
        if self._buf:
            raise SealedMessageError("the sealed response ends inside a frame: it was truncated")
        if not self._done:
            raise SealedMessageError("the sealed response ended before its final chunk: it was truncated")

    def open_all(self, data: bytes) -> bytes:
        """A whole (non-streamed) response's plaintext."""
        out = b"".join(self.feed(data))
        self.finish()
        return out
