"""The node's HTTP pieces for attestation, for the server to mount: `GET /attestation` and an ASGI middleware that
opens sealed requests and seals their responses (streamed or not) around an unchanged app.

The middleware is why the OpenAI endpoints need no change: a request whose content type is
message/ccserve-sealed-request is opened, handed to the app as the plain JSON it carries, and everything the app
sends back is sealed. The outer response is always 200 message/ccserve-sealed-response; the app's status and
content type travel inside, as the first sealed chunk, `{"status": ..., "content-type": ...}`, so whoever sees the
ciphertext does not learn even whether the request failed. Request content is never logged here.
"""
from __future__ import annotations

import json

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ccserve.attest.envelope import REQUEST_MEDIA_TYPE, RESPONSE_MEDIA_TYPE, ResponseSealer
from ccserve.attest.errors import SealedMessageError
from ccserve.attest.identity import NodeIdentity, answer_attestation

MAX_SEALED_BYTES = 16 * 2**20


def attestation_router(identity: NodeIdentity) -> APIRouter:
    """`GET /attestation?nonce=HEX`: fresh evidence for the verifier's nonce (never cached)."""
    router = APIRouter()

    @router.get("/attestation")
    def attestation(nonce: str | None = None) -> JSONResponse:  # sync: hardware reports block, so a worker thread
        status, body = answer_attestation(identity, nonce)
        return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})

    return router


class SealedBody:
    """ASGI middleware: open sealed requests for `identity`, seal their responses. With `require_sealed`, plain
    requests to `sealed_paths` are refused (415), so a client cannot fall back to plaintext by mistake."""

    def __init__(self, app: ASGIApp, identity: NodeIdentity, require_sealed: bool = False,
                 sealed_paths: tuple[str, ...] = ("/v1/completions", "/v1/chat/completions"),
                 max_bytes: int = MAX_SEALED_BYTES) -> None:
        self.app, self.identity = app, identity
        self.require_sealed, self.sealed_paths, self.max_bytes = require_sealed, sealed_paths, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        content_type = Headers(scope=scope).get("content-type", "").split(";")[0].strip().lower()
        if content_type != REQUEST_MEDIA_TYPE:
            if self.require_sealed and scope["path"] in self.sealed_paths:
                return await _plain_error(send, 415, f"this node accepts only {REQUEST_MEDIA_TYPE} bodies on "
                                          f"{scope['path']}: encrypt the request with the ccserve client SDK",
                                          "sealed_request_required")
            return await self.app(scope, receive, send)
        try:
            sealed = await _read_body(receive, self.max_bytes)
        except HTTPException as exc:  # an outer body limit (the server's) refused it while it was being read
            return await _plain_error(send, exc.status_code, str(exc.detail), "request_too_large")
        if sealed is None:
            return await _plain_error(send, 413, f"the sealed request exceeds {self.max_bytes} bytes",
                                      "request_too_large")
        try:
            body, sealer = self.identity.open_request(sealed)
        except SealedMessageError as exc:
            return await _plain_error(send, 400, str(exc))
        await self.app(_plain_scope(scope, len(body)), _replay(body, receive), _sealing_send(send, sealer))


def _plain_scope(scope: Scope, length: int) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]
    return {**scope, "headers": headers}


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: only http.disconnect can come

    return replay


def _sealing_send(send: Send, sealer: ResponseSealer) -> Send:
    async def sealing_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            inner = Headers(raw=message.get("headers", []))
            head = json.dumps({"status": message["status"], "content-type": inner.get("content-type", "")}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", RESPONSE_MEDIA_TYPE.encode()), (b"cache-control", b"no-store")]})
            await send({"type": "http.response.body", "body": sealer.seal(head), "more_body": True})
        elif message["type"] == "http.response.body":
            chunk, more = message.get("body", b""), message.get("more_body", False)
            await send({"type": "http.response.body", "body": sealer.seal(chunk) if more else sealer.final(chunk),
                        "more_body": more})
        else:
            await send(message)

    return sealing_send


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _plain_error(send: Send, status: int, message: str, code: str = "sealed_request") -> None:
    """An error before the request was opened (so it cannot be sealed). Code `sealed_request` means: it does not
    open here (another key, altered); the client verifies again and resends."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
