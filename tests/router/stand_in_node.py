"""A stand-in for a ccserve node, for router tests: it registers through the real NodeAgent (signed reports,
heartbeats) and answers every request with bytes naming itself, a digest of the body it got and the headers it
got, so a test can see where each request went and what crossed the gateway. The real node's body is sealed
to the client; to the router both are opaque bytes.

As a process:  python -m tests.router.stand_in_node --router URL --name NAME --capacity N
(its Ed25519 signing key, hex, in the environment variable NODE_SIGNING_KEY), prints `ready URL` once
registered.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import threading

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ccserve.router.node_agent import NodeAgent
from ccserve.router.serve import BackgroundServer


def node_app(name: str, chunks: int = 4, delay: float = 0.0) -> Starlette:
    async def serve(request: Request):
        body = await request.body()
        digest = hashlib.sha256(body).hexdigest()[:16]
        if request.headers.get("accept") == "text/event-stream":
            async def events():
                for i in range(chunks):
                    if delay:
                        await asyncio.sleep(delay)
                    yield f"data: {name} {i} {digest}\n\n".encode()
            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({"node": name, "sha256": digest, "path": request.url.path,
                             "headers": sorted(request.headers.keys())})

    return Starlette(routes=[Route("/{path:path}", serve, methods=["POST", "GET"])])


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def private_hex(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()).hex()


class StandInNode:
    def __init__(self, router_url: str, name: str, capacity: int, key: Ed25519PrivateKey | None = None,
                 chunks: int = 4, delay: float = 0.0, interval: float = 0.5) -> None:
        self.name, self.key = name, key or Ed25519PrivateKey.generate()
        self.server = BackgroundServer(node_app(name, chunks, delay))
        self.agent = NodeAgent(router_url, self.server.url, capacity, os.urandom(32), self.key, interval)

    def start(self) -> StandInNode:
        self.server.start()
        self.agent.start()
        return self

    def stop(self) -> None:
        self.agent.stop()
        self.server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--router", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--capacity", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(os.environ["NODE_SIGNING_KEY"]))
    node = StandInNode(args.router, args.name, args.capacity, key, args.chunks, args.delay).start()
    print(f"ready {node.server.url}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    node.stop()


if __name__ == "__main__":
    main()
