"""The transparency log served read-only over HTTP (`ccserve log serve`). Only GET routes exist; nothing here
can append (appending is `ccserve release`, with the log key, on the operator's machine).

    GET /checkpoint                                   text/plain: the latest signed checkpoint (C2SP note)
    GET /vkey                                         text/plain: the log's verifier key (pin it out of band!)
    GET /entries?start=I&end=J                        {"entries": [{"index": i, "data": base64}]} (<= 1000)
    GET /proof/inclusion?leaf_hash=HEX&tree_size=N    {"leaf_index": i, "tree_size": N, "proof": [base64]}
    GET /proof/consistency?old_size=M&new_size=N      {"old_size": M, "new_size": N, "proof": [base64]}
    GET /configs/{sha256 hex}.json                    a configuration document a release measured

Each request first picks up entries another process appended (a cheap read of the file's new bytes).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ccserve.attest.encoding import b64encode, hexdecode
from ccserve.attest.tlog import TransparencyLog

MAX_ENTRIES = 1000


def build_log_app(directory: str | Path) -> FastAPI:
    log = TransparencyLog(directory)
    lock = threading.Lock()
    app = FastAPI(title="ccserve transparency log", docs_url=None, redoc_url=None, openapi_url=None)

    def read(f: Callable[[], object]) -> object:
        with lock:
            log.refresh()
            try:
                return f()
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from None

    @app.get("/checkpoint")
    def checkpoint() -> Response:
        return PlainTextResponse(read(log.signed_checkpoint), headers={"Cache-Control": "no-store"})

    @app.get("/vkey")
    def vkey() -> Response:
        return PlainTextResponse(log.verifier.encode() + "\n")

    @app.get("/entries")
    def entries(start: int = 0, end: int | None = None) -> Response:
        def page() -> list[dict]:
            stop = min(log.size if end is None else end, start + MAX_ENTRIES, log.size)
            if start < 0 or stop < start:
                raise ValueError(f"entries start={start} end={end} is not a range within 0..{log.size}")
            return [{"index": i, "data": b64encode(e)} for i, e in enumerate(log.entries(start, stop), start)]
        return JSONResponse({"entries": read(page)})

    @app.get("/proof/inclusion")
    def inclusion(leaf_hash: str, tree_size: int) -> Response:
        def proof() -> dict:
            index = log.index_of(hexdecode(leaf_hash, "leaf_hash"))
            if index is None or index >= tree_size:
                raise LookupError
            return {"leaf_index": index, "tree_size": tree_size,
                    "proof": [b64encode(h) for h in log.inclusion_proof(index, tree_size)]}
        try:
            return JSONResponse(read(proof))
        except LookupError:
            raise HTTPException(404, f"no entry with this leaf hash in the first {tree_size} entries") from None

    @app.get("/proof/consistency")
    def consistency(old_size: int, new_size: int) -> Response:
        return JSONResponse(read(lambda: {"old_size": old_size, "new_size": new_size, "proof": [
            b64encode(h) for h in log.consistency_proof(old_size, new_size)]}))

    @app.get("/configs/{name}")
    def config(name: str) -> Response:
        data = log.config(name.removesuffix(".json"))
        if data is None:
            raise HTTPException(404, "no configuration document with this digest")
        return Response(data, media_type="application/json")

    return app
