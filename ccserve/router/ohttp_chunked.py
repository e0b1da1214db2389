"""Chunked Oblivious HTTP (draft-ietf-ohai-chunked-ohttp-05): OHTTP whose response is sealed chunk by chunk,
so a streamed LLM response reaches the client token by token instead of after the whole generation.

Request:  header (key id, KEM, KDF, AEAD) || enc || chunks, each `varint(len) || HPKE Seal("", chunk)`, the last
          one `0 || HPKE Seal("final", chunk)` running to the end of the body.
Response: response_nonce || chunks, each sealed with the exported AEAD key under `nonce XOR counter`, the last
          one prefixed by 0 and sealed with AAD "final".
The "final" AAD is what makes truncation visible: a response whose last chunk is missing never finishes.
What this reveals that RFC 9458 does not: the relay sees the size and timing of every chunk.
"""
from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from pyhpke.exceptions import PyHPKEError

from ccserve.router import ohttp, varint
from ccserve.router.errors import DecryptError, Truncated

REQUEST_MEDIA_TYPE, RESPONSE_MEDIA_TYPE = "message/ohttp-chunked-req", "message/ohttp-chunked-res"
REQUEST_LABEL, RESPONSE_LABEL = b"message/bhttp chunked request", b"message/bhttp chunked response"
FINAL = b"final"
MAX_CHUNK = 16384   # the draft's size every receiver must accept


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)] or [b""]


class ClientContext:
    """What a client keeps to open the chunked response to its request."""

    def __init__(self, hpke_context, enc: bytes, kdf_id: int, aead_id: int) -> None:
        self.hpke_context, self.enc, self.kdf_id, self.aead_id = hpke_context, enc, kdf_id, aead_id

    def response_opener(self) -> ResponseOpener:
        return ResponseOpener(self)


def encapsulate_request(config: ohttp.KeyConfig, request: bytes) -> tuple[bytes, ClientContext]:
    """(message/ohttp-chunked-req body, context) for a binary HTTP request, in chunks of at most 16 KiB."""
    return _encapsulate_request(config, _split(request, MAX_CHUNK), None)


def _encapsulate_request(config: ohttp.KeyConfig, chunks: list[bytes], ephemeral) -> tuple[bytes, ClientContext]:
    header, enc, context, kdf_id, aead_id = ohttp.setup_sender(config, REQUEST_LABEL, ephemeral)
    out = bytearray(header + enc)
    for chunk in chunks[:-1]:
        if not chunk:
            raise ValueError("a non-final chunk must not be empty")
        sealed = context.seal(chunk, b"")
        out += varint.encode(len(sealed)) + sealed
    out += b"\x00" + context.seal(chunks[-1], FINAL)
    return bytes(out), ClientContext(context, enc, kdf_id, aead_id)


def decapsulate_request(key: ohttp.GatewayKey, body: bytes) -> tuple[bytes, ResponseSealer]:
    """(binary HTTP request, sealer for the chunked response) of a complete chunked request body.
    DecryptError when any chunk was altered, reordered, dropped or the final one is missing."""
    context, enc, kdf_id, aead_id, pos = ohttp.setup_receiver(key, body, REQUEST_LABEL)
    out = bytearray()
    try:
        while True:
            size, pos = varint.decode(body, pos)
            if size == 0:
                out += context.open(bytes(body[pos:]), FINAL)
                break
            if pos + size > len(body):
                raise DecryptError("chunked request is truncated inside a chunk")
            chunk = context.open(bytes(body[pos:pos + size]), b"")
            if not chunk:
                raise DecryptError("chunked request carries an empty non-final chunk")
            out += chunk
            pos += size
    except Truncated:
        raise DecryptError("chunked request ends without its final chunk: truncated in transit") from None
    except PyHPKEError:
        raise DecryptError("chunked request failed authentication: altered, reordered or truncated") from None
    return bytes(out), ResponseSealer(context, enc, kdf_id, aead_id)


class _ResponseCipher:
    """The response AEAD key and base nonce, and the chunk counter XORed into the nonce."""

    def __init__(self, hpke_context, enc: bytes, response_nonce: bytes, kdf_id: int, aead_id: int) -> None:
        key, self._nonce = ohttp.response_keys(hpke_context, enc, response_nonce, RESPONSE_LABEL, kdf_id, aead_id)
        self._aead = ohttp.aead(aead_id, key)
        self._counter = 0

    def _next_nonce(self) -> bytes:
        nn = len(self._nonce)
        if self._counter >= 1 << (8 * nn):
            raise DecryptError("chunked response has more chunks than its nonce can count")
        nonce = bytes(a ^ b for a, b in zip(self._nonce, self._counter.to_bytes(nn, "big")))
        self._counter += 1
        return nonce

    def seal(self, chunk: bytes, aad: bytes) -> bytes:
        return self._aead.encrypt(self._next_nonce(), chunk, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(self._next_nonce(), sealed, aad)
        except InvalidTag:
            raise DecryptError("chunked response failed authentication: altered, reordered or truncated") from None


class ResponseSealer:
    """Gateway side: start() gives the response nonce to send first, then seal() each chunk as it is produced
    and seal_final() once."""

    def __init__(self, hpke_context, enc: bytes, kdf_id: int, aead_id: int) -> None:
        self._args = (hpke_context, enc, kdf_id, aead_id)
        self._cipher: _ResponseCipher | None = None
        self._aead_id = aead_id

    def start(self) -> bytes:
        return self._start(os.urandom(ohttp.response_nonce_len(self._aead_id)))

    def _start(self, response_nonce: bytes) -> bytes:
        hpke_context, enc, kdf_id, aead_id = self._args
        self._cipher = _ResponseCipher(hpke_context, enc, response_nonce, kdf_id, aead_id)
        return response_nonce

    def seal(self, chunk: bytes) -> bytes:
        """A non-final chunk; empty input gives nothing (an empty non-final chunk is not allowed)."""
        if not chunk:
            return b""
        sealed = self._cipher.seal(chunk, b"")
        return varint.encode(len(sealed)) + sealed

    def seal_final(self, chunk: bytes = b"") -> bytes:
        return b"\x00" + self._cipher.seal(chunk, FINAL)


class ResponseOpener:
    """Client side: feed() the response body as it arrives and get plaintext chunks back; finish() at the end
    of the body returns the final chunk, or raises DecryptError if the response was cut short."""

    def __init__(self, context: ClientContext) -> None:
        self._context = context
        self._buf = bytearray()
        self._cipher: _ResponseCipher | None = None
        self._final = False

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        if self._cipher is None:
            n = ohttp.response_nonce_len(self._context.aead_id)
            if len(self._buf) < n:
                return out
            c = self._context
            self._cipher = _ResponseCipher(c.hpke_context, c.enc, bytes(self._buf[:n]), c.kdf_id, c.aead_id)
            del self._buf[:n]
        while not self._final and self._buf:
            try:
                size, pos = varint.decode(self._buf, 0)
            except Truncated:
                break
            if size == 0:
                self._final = True
                del self._buf[:pos]
                break
            if pos + size > len(self._buf):
                break
            chunk = self._cipher.open(bytes(self._buf[pos:pos + size]), b"")
            if not chunk:
                raise DecryptError("chunked response carries an empty non-final chunk")
            out.append(chunk)
            del self._buf[:pos + size]
        return out

    def finish(self) -> bytes:
        if self._cipher is None or not self._final:
            raise DecryptError("chunked response ended without its final chunk: truncated in transit")
        return self._cipher.open(bytes(self._buf), FINAL)
