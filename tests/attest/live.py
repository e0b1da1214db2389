"""Real HTTP on loopback for the attestation and client tests: uvicorn in a thread on port 0, a node app (the
attestation route and the sealing middleware around a small OpenAI-shaped app) and a log app."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp

from ccserve.attest.http import SealedBody, attestation_router
from ccserve.attest.identity import NodeIdentity
from ccserve.attest.measure import measure
from ccserve.attest.note import Signer
from ccserve.attest.tlog import TransparencyLog

CONFIG = {"settings": {"privacy": "pcc", "max_num_seqs": 8}, "public_prefixes": []}


@dataclass
class Live:
    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(app: ASGIApp, port: int = 0) -> Live:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return Live(f"http://127.0.0.1:{port}", server, thread)


def make_model_dir(path: Path, weights: bytes = b"\x01\x02weights") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "model.safetensors").write_bytes(weights)
    return path


def make_log(path: Path, origin: str = "example.test/ccserve-log") -> tuple[TransparencyLog, Signer]:
    signer = Signer.generate(origin)
    return TransparencyLog.create(path, signer), signer


def openai_app() -> FastAPI:
    """An OpenAI-shaped app: echoes the request in a completion, or streams it word by word as SSE."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        text = " ".join(m["content"] for m in body.get("messages", []))
        if body.get("max_tokens") == 0:
            return JSONResponse({"error": {"message": "max_tokens must be >= 1", "code": "bad"}}, status_code=400)
        if not body.get("stream"):
            return JSONResponse({"object": "chat.completion",
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})

        def events() -> Iterator[str]:
            for word in text.split():
                yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": word}}]}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def node_app(identity: NodeIdentity, inner: FastAPI | None = None, require_sealed: bool = True) -> ASGIApp:
    app = inner or openai_app()
    app.include_router(attestation_router(identity))
    return SealedBody(app, identity, require_sealed=require_sealed)


def released_identity(model_dir: Path, log: TransparencyLog, signer: Signer, config: dict = CONFIG) -> NodeIdentity:
    """A node identity whose measurement is appended to `log` (what `ccserve release` then `serve` do)."""
    measurement = measure(config, model_dir, progress=False)
    log.append(measurement.entry(), signer)
    return NodeIdentity(measurement)
