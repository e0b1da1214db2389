"""The oblivious gateway and router (`ccserve router`): opens OHTTP requests, spends their token, and forwards
each to a node drawn at random in proportion to capacity.

What it sees: the inner request's method, path, a few headers and the anonymous token; the relay's address,
never the client's. What it does not see: the request body, which the client sealed to the nodes' HPKE keys (it
is opaque bytes here), and who the client is (the token is blind-signed, the relay hides the address).
What a node sees: the body and the gateway's address; neither the client's address nor its token.

HTTP:  POST /gateway          message/ohttp-req -> message/ohttp-res, or
                              message/ohttp-chunked-req -> message/ohttp-chunked-res (streamed, chunk by chunk)
       GET  /ohttp-keys       application/ohttp-keys (the gateway's key configuration)
       GET  /nodes/challenge  {"nonce": hex}: a fresh nonce for a node's evidence (attestation.py)
       POST /nodes/register   a node's signed report, with evidence when it attests (JSON, see nodes.py)
       GET  /nodes            the healthy, attested nodes: URL, capacity, public keys, signed report
       GET  /stats            aggregate counters only

Inner requests to /nodes and /nodes/<id>/attestation are answered by the gateway itself, without a token
(directory.py): that is how clients verify the nodes through the relay.

Errors before decryption are plain 400s (RFC 9458 section 5.2: they cannot be encrypted); errors after it are
encrypted responses: 400 malformed inner request, 401 token refused, 503 no node, 502 node unreachable. A node
that fails mid-stream ends the response with the trailer `ccserve-error`, sealed like the rest, so the client
sees a clean, authenticated end rather than a cut.
"""
from __future__ import annotations

import base64
import contextlib
import json
import random
import time
from dataclasses import dataclass

import httpx
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ccserve.router import bhttp, directory, ohttp, ohttp_chunked, tokens
from ccserve.router.attestation import Attestor
from ccserve.router.errors import (ERROR_TRAILER, DecryptError, MalformedMessage, NodeRefused, NoHealthyNode,
                                   NotAttested, RouterError, TokenRefused, UnknownKey)
from ccserve.router.nodes import Node, NodeRegistry, SignedReport
from ccserve.router.policy import Router
from ccserve.router.serve import BodyTooLarge, http_client, log, read_limited
from ccserve.router.stats import Stats

OUTCOMES = ("served", "directory", "decrypt_failed", "unknown_key", "bad_request", "token_refused", "no_node",
            "node_failed", "node_failed_midstream", "too_large", "unsupported_media_type")
FORWARDED_METHODS = ("GET", "POST")
FORWARDED_HEADERS = ("content-type", "accept")      # inner request -> node; everything else stays behind
RETURNED_HEADERS = ("content-type",)                # node response -> client, inside the encryption
KEY_REFRESH_INTERVAL = 10.0
MAX_REPORT_BYTES = 1 << 20                          # a report with evidence (hardware quotes included)


def _problem(status: int, title: str, problem_type: str = "about:blank") -> Response:
    return Response(json.dumps({"type": problem_type, "title": title}), status_code=status,
                    media_type="application/problem+json")


def _error(status: int, message: str) -> bhttp.Response:
    body = json.dumps({"error": {"message": message, "code": status}}).encode()
    return bhttp.Response(status, [("content-type", "application/json")], body)


class NodeForwarder:
    """The gateway's one network call per request: the inner request, body untouched, to the chosen node."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    async def open(self, node: Node, inner: bhttp.Request) -> httpx.Response:
        headers = [(n, v) for n, v in inner.headers if n in FORWARDED_HEADERS]
        request = self._http.build_request(inner.method, node.url + inner.path, headers=headers,
                                           content=inner.content)
        return await self._http.send(request, stream=True)

    async def directory(self, inner: bhttp.Request, registry: NodeRegistry) -> bhttp.Response:
        return await directory.answer(inner, registry, self._http)


class IssuerKeys:
    """Fetches the issuer's token key into the verifier: at start, and again (at most every 10 s) when a token
    names a key the gateway does not know yet (the issuer restarted with a new in-memory key)."""

    def __init__(self, issuer_url: str, http: httpx.AsyncClient, verifier: tokens.TokenVerifier) -> None:
        self.url, self._http, self._verifier = issuer_url.rstrip("/") + "/token-key", http, verifier
        self._last = -KEY_REFRESH_INTERVAL

    async def refresh(self) -> None:
        now = time.monotonic()
        if now - self._last < KEY_REFRESH_INTERVAL:
            return
        self._last = now
        response = await self._http.get(self.url)
        response.raise_for_status()
        info = response.json()
        self._verifier.add_key(tokens.load_public_key(base64.b64decode(info["public_key"])))


@dataclass
class Gateway:
    key: ohttp.GatewayKey
    verifier: tokens.TokenVerifier
    attestor: Attestor
    registry: NodeRegistry
    router: Router
    forwarder: NodeForwarder
    issuer_keys: IssuerKeys | None = None
    max_request_bytes: int = 8 << 20
    max_response_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        self.stats = Stats(OUTCOMES)

    # ---- one oblivious request -------------------------------------------------------------------------------

    async def handle(self, content_type: str, body: bytes) -> Response:
        """The outer response to one POST /gateway."""
        chunked = content_type == ohttp_chunked.REQUEST_MEDIA_TYPE
        if not chunked and content_type != ohttp.REQUEST_MEDIA_TYPE:
            self.stats.count("unsupported_media_type")
            return _problem(415, f"content type must be {ohttp.REQUEST_MEDIA_TYPE} or "
                                 f"{ohttp_chunked.REQUEST_MEDIA_TYPE}")
        try:
            if chunked:
                inner, sealer = ohttp_chunked.decapsulate_request(self.key, body)
            else:
                inner, context = ohttp.decapsulate_request(self.key, body)
        except UnknownKey as exc:
            self.stats.count("unknown_key")
            return _problem(400, str(exc), "https://iana.org/assignments/http-problem-types#ohttp-key")
        except DecryptError:
            self.stats.count("decrypt_failed")
            return _problem(400, "encapsulated request could not be decrypted")
        node, answer = await self._dispatch(inner)
        if chunked:
            return StreamingResponse(self._stream(sealer, node, answer),
                                     media_type=ohttp_chunked.RESPONSE_MEDIA_TYPE,
                                     headers={"cache-control": "no-store", "incremental": "?1"})
        response = answer if isinstance(answer, bhttp.Response) else await self._read_whole(node, answer)
        return Response(context.seal_response(bhttp.encode_response(response)),
                        media_type=ohttp.RESPONSE_MEDIA_TYPE, headers={"cache-control": "no-store"})

    async def _dispatch(self, inner_bytes: bytes) -> tuple[Node | None, bhttp.Response | httpx.Response]:
        """Check the inner request and its token, choose a node, open the request to it. Returns the node and
        its streaming response, or (None, an error response to encrypt)."""
        try:
            inner = bhttp.decode_request(inner_bytes)
        except MalformedMessage as exc:
            self.stats.count("bad_request")
            return None, _error(400, str(exc))
        if inner.method not in FORWARDED_METHODS or not inner.path.startswith("/"):
            # the path is appended to the node's URL: "@host" or a full URL must never pick another host
            self.stats.count("bad_request")
            return None, _error(400, f"inner request must be {' or '.join(FORWARDED_METHODS)} of a path starting "
                                     "with '/'")
        if directory.is_directory(inner):
            self.stats.count("directory")
            return None, await self.forwarder.directory(inner, self.registry)
        try:
            await self._redeem(inner.header(tokens.TOKEN_HEADER))
        except TokenRefused as exc:
            self.stats.count("token_refused")
            return None, _error(401, str(exc))
        try:
            node = self.router.choose(self.registry.healthy())
        except NoHealthyNode as exc:
            self.stats.count("no_node")
            return None, _error(503, str(exc))
        try:
            return node, await self.forwarder.open(node, inner)
        except httpx.TransportError:
            self.registry.mark_failed(node.node_id)
            self.stats.count("node_failed")
            return None, _error(502, "the node chosen for this request could not be reached; it is now avoided: "
                                     "retry with a fresh token")

    async def _redeem(self, header: str | None) -> None:
        if not header:
            raise TokenRefused(f"request carries no {tokens.TOKEN_HEADER} header: get tokens from the issuer")
        token = tokens.Token.from_header(header)
        if not self.verifier.knows(token) and self.issuer_keys is not None:
            try:
                await self.issuer_keys.refresh()
            except (httpx.HTTPError, ValueError, KeyError, RouterError):
                pass    # the token is then refused below as signed by an unknown key
        self.verifier.redeem(token)

    async def _read_whole(self, node: Node, upstream: httpx.Response) -> bhttp.Response:
        body = bytearray()
        try:
            async for data in upstream.aiter_raw():
                body += data
                if len(body) > self.max_response_bytes:
                    return _error(502, "node response is larger than the gateway forwards")
        except httpx.TransportError:
            self.registry.mark_failed(node.node_id)
            self.stats.count("node_failed_midstream")
            return _error(502, "the node failed while answering; it is now avoided: retry with a fresh token")
        finally:
            await upstream.aclose()
        self.stats.count("served")
        headers = [(n, upstream.headers[n]) for n in RETURNED_HEADERS if n in upstream.headers]
        return bhttp.Response(upstream.status_code, headers, bytes(body))

    async def _stream(self, sealer: ohttp_chunked.ResponseSealer, node: Node | None,
                      answer: bhttp.Response | httpx.Response):
        """The chunked OHTTP response: nonce, the binary HTTP head, one sealed chunk per chunk the node sends,
        and a final chunk with the trailers (carrying ccserve-error if the node failed on the way)."""
        yield sealer.start()
        if isinstance(answer, bhttp.Response):
            yield sealer.seal(bhttp.stream_head(answer.status, answer.headers))
            yield sealer.seal(bhttp.stream_chunk(answer.content))
            yield sealer.seal_final(bhttp.stream_end())
            return
        headers = [(n, answer.headers[n]) for n in RETURNED_HEADERS if n in answer.headers]
        yield sealer.seal(bhttp.stream_head(answer.status_code, headers))
        trailers: list[tuple[str, str]] = []
        try:
            async for data in answer.aiter_raw():
                yield sealer.seal(bhttp.stream_chunk(data))
            self.stats.count("served")
        except httpx.TransportError:
            self.registry.mark_failed(node.node_id)
            self.stats.count("node_failed_midstream")
            trailers = [(ERROR_TRAILER, "node failed mid-response; it is now avoided")]
        finally:
            await answer.aclose()
        yield sealer.seal_final(bhttp.stream_end(trailers))

    # ---- node registry ----------------------------------------------------------------------------------------

    async def register(self, data: object) -> dict:
        """Accept a node's signed report; evidence sent with it is verified first (off the event loop: it reads
        the transparency log). NodeRefused says why not."""
        evidence = data.pop("evidence", None) if isinstance(data, dict) else None
        signed = SignedReport.from_json(data)
        signed.verify()
        if evidence is not None:
            await run_in_threadpool(self.attestor.verify, signed.report, evidence)
        node = self.registry.register(signed)
        return {"node_id": node.node_id, "capacity": node.capacity, "report_ttl": self.registry.report_ttl}


def gateway_app(gateway: Gateway, lifespan=None) -> Starlette:
    async def oblivious(request: Request) -> Response:
        try:
            body = await read_limited(request, gateway.max_request_bytes)
        except BodyTooLarge as exc:
            gateway.stats.count("too_large")
            return _problem(413, str(exc))
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        return await gateway.handle(content_type, body)

    async def ohttp_keys(request: Request) -> Response:
        return Response(ohttp.encode_key_configs([gateway.key.config]), media_type=ohttp.KEYS_MEDIA_TYPE,
                        headers={"cache-control": "max-age=60"})

    async def challenge(request: Request) -> Response:
        return JSONResponse({"nonce": gateway.attestor.challenge().hex()}, headers={"cache-control": "no-store"})

    async def register(request: Request) -> Response:
        try:
            data = json.loads(await read_limited(request, MAX_REPORT_BYTES))
            return JSONResponse(await gateway.register(data))
        except (BodyTooLarge, json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse({"error": "node report must be a JSON object under 1 MiB"}, status_code=400)
        except NodeRefused as exc:
            code = "attestation_required" if isinstance(exc, NotAttested) else "refused"
            return JSONResponse({"error": str(exc), "code": code}, status_code=403)

    async def nodes(request: Request) -> Response:
        return JSONResponse(directory.listing(gateway.registry), headers={"cache-control": "no-store"})

    async def stats(request: Request) -> Response:
        return JSONResponse({**gateway.stats.snapshot(), "tokens_spent": gateway.verifier.spent_count(),
                             "healthy_nodes": len(gateway.registry.healthy())})

    return Starlette(routes=[Route("/gateway", oblivious, methods=["POST"]), Route("/ohttp-keys", ohttp_keys),
                             Route("/nodes/challenge", challenge), Route("/nodes/register", register, methods=["POST"]),
                             Route("/nodes", nodes), Route("/stats", stats)],
                     lifespan=lifespan)


def build(issuer_url: str, attestor: Attestor, *, max_node_capacity: int = 1000, report_ttl: float = 30.0,
          max_request_bytes: int = 8 << 20, rng: random.Random | None = None) -> tuple[Gateway, Starlette]:
    """A gateway with a fresh in-memory OHTTP key, and its app, whose lifespan fetches the issuer's key at
    start and closes the HTTP client at the end. `attestor` decides which nodes count as attested
    (attestation.py). `rng` only for tests (default: the OS CSPRNG)."""
    http = http_client()
    verifier = tokens.TokenVerifier()
    registry = NodeRegistry(attestor.is_attested, max_node_capacity, report_ttl)
    gateway = Gateway(ohttp.GatewayKey.generate(), verifier, attestor, registry, Router(rng), NodeForwarder(http),
                      IssuerKeys(issuer_url, http, verifier), max_request_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            await gateway.issuer_keys.refresh()
        except (httpx.HTTPError, ValueError, KeyError, RouterError):
            log("router", f"issuer at {issuer_url} not reachable yet; its key is fetched when tokens arrive")
        yield
        await http.aclose()
        log("router", f"stopped; totals {gateway.stats.snapshot()}")

    return gateway, gateway_app(gateway, lifespan=lifespan)
