"""The HTTP surface: exactly the OpenAI generation endpoints, /v1/models, /health and /metrics, and, on an
attested node, /attestation (docs/attest.md).

Nothing else is routed: no /docs or /redoc (a PCC node has no debug pages); /openapi.json stays, as the
published contract clients and fuzzers test against. The engine runs on its own thread (async_engine.py),
started and stopped with the app's lifespan. An attested node opens requests sealed to its in-memory key and seals
every response (ccserve.attest.http.SealedBody, inside BodyLimit), so the endpoints themselves are unchanged.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ccserve import __version__
from ccserve.attest.http import SealedBody, attestation_router
from ccserve.config import EngineConfig, ServerOptions
from ccserve.server import protocol as p
from ccserve.server.async_engine import AsyncEngine
from ccserve.server.idle_gc import CollectWhenIdle
from ccserve.server.errors import error_response, install_error_handlers
from ccserve.server.metrics import ServerMetrics
from ccserve.server.serving import OpenAIServing

if TYPE_CHECKING:
    from ccserve.attest.identity import NodeIdentity
    from ccserve.engine.llm_engine import LLMEngine

DEFAULT_MAX_QUEUE = 1024
MAX_BODY_BYTES = 16 * 2**20  # far above any prompt that fits a context window; refuses memory-exhaustion bodies
ENDPOINT_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions"}
_ERROR_RESPONSES = {code: {"model": p.ErrorResponse} for code in (400, 404, 413, 429, 500, 503)}


def build_app(engine: LLMEngine, served_model_name: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
              identity: NodeIdentity | None = None, require_sealed: bool = False) -> FastAPI:
    """An app serving `engine` (an LLMEngine, used from one thread only) under `served_model_name`. With an
    `identity` (an attested node) it answers GET /attestation and opens sealed requests; `require_sealed` (the pcc
    policy) refuses plain ones on the generation endpoints."""
    async_engine = AsyncEngine(engine, max_queue)
    model_name = served_model_name or engine.model_name
    metrics = ServerMetrics(lambda: async_engine.stats, lambda: async_engine.num_unfinished)
    serving = OpenAIServing(async_engine, model_name, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        yield
        await async_engine.close()

    app = FastAPI(title="ccserve", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine = async_engine
    if identity is not None:
        app.include_router(attestation_router(identity))
        app.add_middleware(SealedBody, identity=identity, require_sealed=require_sealed, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)  # after SealedBody: it wraps it, sealed bodies count
    app.add_middleware(CollectWhenIdle)  # around it all: it must see every request, rejected ones included

    def count(request: Request, outcome: str) -> None:
        endpoint = ENDPOINT_PATHS.get(request.url.path)
        if endpoint is not None:
            metrics.count(endpoint, outcome)

    install_error_handlers(app, on_rejected=lambda r: count(r, "rejected"),
                           on_internal_error=lambda r: count(r, "error"))

    @app.post("/v1/completions", responses={200: {"model": p.CompletionResponse}, **_ERROR_RESPONSES})
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        return await serving.completion(body, request)

    @app.post("/v1/chat/completions", responses={200: {"model": p.ChatCompletionResponse}, **_ERROR_RESPONSES})
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    @app.get("/v1/models")
    async def models() -> p.ModelList:
        base = p.ModelCard(id=model_name, max_model_len=engine.max_model_len)
        adapters = [p.ModelCard(id=name, parent=model_name, max_model_len=engine.max_model_len)
                    for name in engine.lora_names]
        return p.ModelList(data=[base, *adapters])

    @app.get("/health")
    async def health() -> Response:
        if async_engine.healthy:
            return JSONResponse({"status": "ok"})
        return error_response(503, "the engine is not running", code="unhealthy")

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


class BodyLimit:
    """413 in OpenAI's format for a request body over max_bytes: before reading a body whose declared length
    is over, and as soon as a chunked one passes the limit (raised inside the route's body read, so the
    error handlers answer it). FastAPI's own max_body_size answers in plain text, hence this."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(413, self.message, code="request_too_large")(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, self.message)
            return message

        await self.app(scope, limited, send)

    @property
    def message(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes"


def serve(config: EngineConfig, options: ServerOptions | None = None) -> None:
    """Load the engine and serve it until interrupted, with the privacy-safe logging setup. With `options.attest`
    the node measures itself first; with `options.router` it then registers there once its socket listens."""
    import uvicorn

    from ccserve.engine.llm_engine import LLMEngine
    from ccserve.listen import bind, url_of
    from ccserve.server import node
    from ccserve.server.log_config import configure_logging

    options = options or ServerOptions()
    configure_logging(options.log_level)
    identity = node.node_identity(config, options) if options.attest else None
    app = build_app(LLMEngine(config), options.served_model_name, options.max_queue, identity=identity,
                    require_sealed=options.attest and config.privacy == "pcc")
    uvicorn_options = dict(log_config=None, access_log=False, log_level=options.log_level, server_header=False,
                           date_header=False)
    if options.router is None:
        uvicorn.run(app, host=options.host, port=options.port, **uvicorn_options)
        return
    sock = bind(options.host, options.port)  # listening before registering: the router may route at once
    agent = node.register(identity, config, options, url_of(sock))
    try:
        port = sock.getsockname()[1]
        uvicorn.Server(uvicorn.Config(app, host=options.host, port=port, **uvicorn_options)).run(sockets=[sock])
    finally:
        agent.stop()
        sock.close()
