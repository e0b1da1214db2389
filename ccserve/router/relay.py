"""The oblivious relay (`ccserve relay`): forwards encapsulated requests to the gateway and the answers back.

It sees the client's address and ciphertext, nothing else, and the gateway sees the relay's address, never the
client's. So the relay rebuilds every upstream request from scratch: the body, its content type and (for
chunked OHTTP) `Incremental: ?1`, and nothing more; cookies, Authorization, User-Agent, X-Forwarded-For,
Forwarded, Via and every other client header stay behind, and it adds none of its own (RFC 9458 section 6.2).
Responses come back the same way: status, content type, the body streamed as it arrives. It records only
aggregate counts (GET /stats), never a per-request line.

HTTP:  POST /            message/ohttp-req or message/ohttp-chunked-req, forwarded to GATEWAY/gateway
       GET  /ohttp-keys  the gateway's key configuration, so clients fetch it without showing the gateway
                         their address
       GET  /stats       aggregate counters
"""
from __future__ import annotations

import contextlib

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ccserve.router import ohttp, ohttp_chunked
from ccserve.router.serve import BodyTooLarge, http_client, log, read_limited
from ccserve.router.stats import Stats

OUTCOMES = ("forwarded", "gateway_unreachable", "unsupported_media_type", "too_large", "empty", "keys_fetched")
REQUEST_TYPES = (ohttp.REQUEST_MEDIA_TYPE, ohttp_chunked.REQUEST_MEDIA_TYPE)
RESPONSE_HEADERS = ("content-type", "cache-control", "incremental")


def _upstream_headers(content_type: str) -> dict[str, str]:
    """The complete header set of a forwarded request (beside Host and Content-Length)."""
    headers = {"content-type": content_type}
    if content_type == ohttp_chunked.REQUEST_MEDIA_TYPE:
        headers["incremental"] = "?1"
    return headers


def _downstream_headers(upstream: httpx.Response) -> dict[str, str]:
    return {name: upstream.headers[name] for name in RESPONSE_HEADERS if name in upstream.headers}


class Relay:
    def __init__(self, gateway_url: str, http: httpx.AsyncClient, max_request_bytes: int = 8 << 20) -> None:
        base = gateway_url.rstrip("/")
        self.gateway_url, self.keys_url = base + "/gateway", base + "/ohttp-keys"
        self._http, self.max_request_bytes = http, max_request_bytes
        self.stats = Stats(OUTCOMES)

    async def forward(self, request: Request) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in REQUEST_TYPES:
            self.stats.count("unsupported_media_type")
            return JSONResponse({"error": f"content type must be one of {', '.join(REQUEST_TYPES)}"}, 415)
        try:
            body = await read_limited(request, self.max_request_bytes)
        except BodyTooLarge as exc:
            self.stats.count("too_large")
            return JSONResponse({"error": str(exc)}, 413)
        if not body:
            self.stats.count("empty")
            return JSONResponse({"error": "empty encapsulated request"}, 400)
        upstream_request = self._http.build_request("POST", self.gateway_url, content=body,
                                                    headers=_upstream_headers(content_type))
        try:
            upstream = await self._http.send(upstream_request, stream=True)
        except httpx.TransportError:
            self.stats.count("gateway_unreachable")
            return JSONResponse({"error": "the gateway could not be reached; retry later"}, 502)
        self.stats.count("forwarded")
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code,
                                 headers=_downstream_headers(upstream), background=BackgroundTask(upstream.aclose))

    async def keys(self, request: Request) -> Response:
        try:
            upstream = await self._http.get(self.keys_url)
        except httpx.TransportError:
            self.stats.count("gateway_unreachable")
            return JSONResponse({"error": "the gateway could not be reached; retry later"}, 502)
        self.stats.count("keys_fetched")
        return Response(upstream.content, status_code=upstream.status_code, headers=_downstream_headers(upstream))


def relay_app(relay: Relay, lifespan=None) -> Starlette:
    async def stats(request: Request) -> Response:
        return JSONResponse(relay.stats.snapshot())

    return Starlette(routes=[Route("/", relay.forward, methods=["POST"]), Route("/ohttp-keys", relay.keys),
                             Route("/stats", stats)], lifespan=lifespan)


def build(gateway_url: str, max_request_bytes: int = 8 << 20) -> tuple[Relay, Starlette]:
    """A relay and its app, whose lifespan closes the HTTP client and logs the totals at the end."""
    http = http_client()
    relay = Relay(gateway_url, http, max_request_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await http.aclose()
        log("relay", f"stopped; totals {relay.stats.snapshot()}")

    return relay, relay_app(relay, lifespan=lifespan)
