"""The sealed envelope: a request any one of several attested nodes can open, and its response, streamed in
chunks that cannot be reordered, dropped, altered or cut short without the client noticing.

Why several recipients: behind a router the client does not choose its node (the router draws one at random
after the client has sealed, docs/router.md), so the body must open on whichever attested node is drawn. The
client draws a random content key, wraps it with HPKE to each node's key, and seals the body once under it.

This is the *inner* layer, end to end between the client and the node; Oblivious HTTP (RFC 9458) is an outer
layer between the client and the gateway, and carries this envelope as an opaque body. Its response framing is
the chunked-OHTTP draft's, so both layers read alike.

Suite: DHKEM(X25519, HKDF-SHA256) = 0x0020, HKDF-SHA256 = 0x0001, AES-128-GCM = 0x0001 (RFC 9180), base mode.

Request (media type message/ccserve-sealed-request), version 2:

    hdr         = version (1 byte, 0x02) || kem_id (2) || kdf_id (2) || aead_id (2) || n (2, big-endian, 1..1024)
    recipient_i = key_id_i (8) || enc_i (32) || wrapped_i (32)
    key_id_i    = SHA-256(node i's HPKE public key)[:8]
    wrapped_i   = HPKE-Seal(pk_i, info = "message/ccserve-sealed-request" || 0x00 || hdr || key_id_i, aad = "",
                            content_key)                     (content_key: 16 random bytes, one per request)
    prk         = HKDF-Extract(salt = "", content_key)
    ct          = AES-128-GCM(HKDF-Expand(prk, "request key", 16)).Encrypt(nonce = HKDF-Expand(prk, "request nonce",
                  12), body, aad = hdr || recipient_1 || ... || recipient_n)
    request     = hdr || recipient_1 || ... || recipient_n || ct

The body's AAD covers every recipient entry, so none can be added, removed or swapped without the body failing to
open. A node opens the entry that names its key id and learns nothing about the others but their key ids.

Response (media type message/ccserve-sealed-response):

    nonce_r  = 16 random bytes chosen by the node
    prk_r    = HKDF-Extract(salt = nonce_r, content_key)
    key      = HKDF-Expand(prk_r, "response key", 16);  iv = HKDF-Expand(prk_r, "response nonce", 12)
    response = nonce_r || frame_0 || frame_1 || ... || frame_final
    frame_i  = flag (1 byte: 0x00 more, 0x01 final) || length (4, big-endian) || ct_i
    ct_i     = AES-128-GCM(key).Encrypt(nonce = iv XOR i (96-bit big-endian counter), chunk_i, aad = flag || length)

The counter in the nonce makes a reordered or dropped frame fail to decrypt; the authenticated final flag makes a
stream cut short detectable (no final frame) and a stream with frames after the final one refused. The content key
is fresh per request, so a response cannot be passed off as another request's; the node chooses nonce_r, so a
replayed request still gets fresh response keys.
"""
from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKey, PyHPKEError

from ccserve.attest.errors import SealedMessageError

REQUEST_MEDIA_TYPE = "message/ccserve-sealed-request"
RESPONSE_MEDIA_TYPE = "message/ccserve-sealed-response"
VERSION = 0x02
KEM_ID, KDF_ID, AEAD_ID = KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES128_GCM
SUITE = CipherSuite.new(KEM_ID, KDF_ID, AEAD_ID)
N_ENC, N_K, N_N, N_TAG = 32, 16, 12, 16
KEY_ID_LEN = 8
HDR = struct.Struct(">BHHHH")
RECIPIENT_LEN = KEY_ID_LEN + N_ENC + N_K + N_TAG
MAX_RECIPIENTS = 1024
RESPONSE_NONCE_LEN = max(N_N, N_K)
FRAME_HEAD = struct.Struct(">BI")
MORE, FINAL = 0x00, 0x01


def key_id(public_key: bytes) -> bytes:
    return hashlib.sha256(public_key).digest()[:KEY_ID_LEN]


def _hdr(count: int) -> bytes:
    return HDR.pack(VERSION, KEM_ID.value, KDF_ID.value, AEAD_ID.value, count)


def _wrap_info(hdr: bytes, kid: bytes) -> bytes:
    return REQUEST_MEDIA_TYPE.encode() + b"\x00" + hdr + kid


def _expand(prk: bytes, label: bytes, length: int) -> bytes:
    return HKDFExpand(hashes.SHA256(), length, label).derive(prk)


def _body_cipher(content_key: bytes) -> tuple[AESGCM, bytes]:
    prk = HKDF.extract(hashes.SHA256(), b"", content_key)
    return AESGCM(_expand(prk, b"request key", N_K)), _expand(prk, b"request nonce", N_N)


def seal_request(node_public_keys: Sequence[bytes], body: bytes) -> tuple[bytes, ResponseOpener]:
    """Client side: the sealed request that any node holding one of `node_public_keys` (raw X25519, each attested)
    can open, and the opener of its response (it holds the content key, which never leaves the client but
    wrapped to those keys)."""
    keys = list(dict.fromkeys(node_public_keys))  # each key once, in the caller's order
    if not 1 <= len(keys) <= MAX_RECIPIENTS:
        raise ValueError(f"a sealed request needs 1 to {MAX_RECIPIENTS} recipient keys, got {len(keys)}")
    content_key = secrets.token_bytes(N_K)
    hdr = _hdr(len(keys))
    entries = [_wrap(pk, hdr, content_key) for pk in keys]
    aead, nonce = _body_cipher(content_key)
    head = hdr + b"".join(entries)
    return head + aead.encrypt(nonce, body, head), ResponseOpener(content_key)


def _wrap(public_key: bytes, hdr: bytes, content_key: bytes) -> bytes:
    kid = key_id(public_key)
    enc, ctx = SUITE.create_sender_context(SUITE.kem.deserialize_public_key(public_key), info=_wrap_info(hdr, kid))
    return kid + enc + ctx.seal(content_key, aad=b"")


def open_request(private_key: X25519PrivateKey, request: bytes) -> tuple[bytes, ResponseSealer]:
    """Node side: the request body, and the sealer for its response. SealedMessageError when the envelope names
    no key of this node, is of another suite or version, or was altered."""
    count = _parse_hdr(request)
    head_len = HDR.size + count * RECIPIENT_LEN
    if len(request) < head_len + N_TAG:
        raise SealedMessageError("the sealed request is too short for its recipient list and a tag")
    head, ct = request[:head_len], request[head_len:]
    public = KEMKey.from_pyca_cryptography_key(private_key.public_key()).to_public_bytes()
    content_key = _unwrap(private_key, head, key_id(public), count)
    aead, nonce = _body_cipher(content_key)
    try:
        body = aead.decrypt(nonce, ct, head)
    except InvalidTag:
        raise SealedMessageError("the sealed request does not decrypt: it was altered in transit") from None
    return body, ResponseSealer(content_key)


def _parse_hdr(request: bytes) -> int:
    if len(request) < HDR.size:
        raise SealedMessageError("the sealed request is too short to hold a header")
    version, kem, kdf, aead, count = HDR.unpack_from(request)
    if version != VERSION:
        raise SealedMessageError(f"the sealed request is envelope version {version}, this node opens version "
                                 f"{VERSION}: update the ccserve client")
    if (kem, kdf, aead) != (KEM_ID.value, KDF_ID.value, AEAD_ID.value):
        raise SealedMessageError("the sealed request is not X25519 / HKDF-SHA256 / AES-128-GCM")
    if not 1 <= count <= MAX_RECIPIENTS:
        raise SealedMessageError(f"the sealed request names {count} recipients; 1 to {MAX_RECIPIENTS} are allowed")
    return count


def _unwrap(private_key: X25519PrivateKey, head: bytes, kid: bytes, count: int) -> bytes:
    """The content key from the recipient entry that names `kid`."""
    hdr = head[:HDR.size]
    recipient = KEMKey.from_pyca_cryptography_key(private_key)
    for i in range(count):
        entry = head[HDR.size + i * RECIPIENT_LEN:HDR.size + (i + 1) * RECIPIENT_LEN]
        if entry[:KEY_ID_LEN] != kid:
            continue
        enc, wrapped = entry[KEY_ID_LEN:KEY_ID_LEN + N_ENC], entry[KEY_ID_LEN + N_ENC:]
        try:
            ctx = SUITE.create_recipient_context(enc, recipient, info=_wrap_info(hdr, kid))
            return ctx.open(wrapped, aad=b"")
        except PyHPKEError:
            raise SealedMessageError("the sealed request's key entry for this node does not decrypt: it was "
                                     "altered in transit") from None
    raise SealedMessageError("the sealed request is addressed to other node keys: fetch the nodes' evidence again "
                             "and seal to the keys they attest")


def _response_keys(content_key: bytes, response_nonce: bytes) -> tuple[AESGCM, bytes]:
    prk = HKDF.extract(hashes.SHA256(), response_nonce, content_key)
    return AESGCM(_expand(prk, b"response key", N_K)), _expand(prk, b"response nonce", N_N)


def _nonce(iv: bytes, counter: int) -> bytes:
    return bytes(a ^ b for a, b in zip(iv, counter.to_bytes(N_N, "big")))


class ResponseSealer:
    """Node side: seals response chunks in order; the last one through `final`. Picks its own nonces (a recipe:
    callers never see an IV)."""

    def __init__(self, content_key: bytes) -> None:
        self._response_nonce = secrets.token_bytes(RESPONSE_NONCE_LEN)
        self._aead, self._iv = _response_keys(content_key, self._response_nonce)
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
        head = FRAME_HEAD.pack(flag, len(chunk) + N_TAG)
        ct = self._aead.encrypt(_nonce(self._iv, self._counter), chunk, head)
        self._counter += 1
        self._done = flag == FINAL
        prefix = b"" if self._started else self._response_nonce
        self._started = True
        return prefix + head + ct


class ResponseOpener:
    """Client side: feed the response bytes as they arrive, get the plaintext chunks; `finish` at end of stream
    raises unless the final chunk arrived. Every failure is a SealedMessageError."""

    def __init__(self, content_key: bytes) -> None:
        self._content_key = content_key
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
        chunks: list[bytes] = []
        if self._aead is None:
            if len(self._buf) < RESPONSE_NONCE_LEN:
                return chunks
            self._aead, self._iv = _response_keys(self._content_key, bytes(self._buf[:RESPONSE_NONCE_LEN]))
            del self._buf[:RESPONSE_NONCE_LEN]
        while len(self._buf) >= FRAME_HEAD.size:
            if self._done:
                raise SealedMessageError("the sealed response has data after its final chunk")
            flag, length = FRAME_HEAD.unpack_from(self._buf)
            if flag not in (MORE, FINAL) or length < N_TAG:
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
