"""A stand-in for a ccserve node, for router tests: a real NodeIdentity (in-memory keys, evidence for the router's
nonce) registered through the real NodeAgent (signed reports, heartbeats), in front of an app that answers every
request with bytes naming itself, a digest of the body it got and the headers it got, so a test can see where
each request went and what crossed the gateway. The real node's body is sealed to the client; to the router both
are opaque bytes. (tests/test_deployment.py runs real `ccserve serve --attest` nodes.)

As a process:  python -m tests.router.stand_in_node --router URL --name NAME --capacity N
(the measurement record it claims, JSON, in the environment variable NODE_MEASUREMENT), prints `ready URL` once
registered.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import threading

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ccserve.attest.identity import NodeIdentity, answer_attestation
from ccserve.attest.measure import Measurement
from ccserve.router.node_agent import NodeAgent
from ccserve.router.serve import BackgroundServer


def node_app(name: str, identity: NodeIdentity, chunks: int = 4, delay: float = 0.0) -> Starlette:
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

    async def attestation(request: Request):
        status, body = answer_attestation(identity, request.query_params.get("nonce"))
        return JSONResponse(body, status_code=status)

    return Starlette(routes=[Route("/attestation", attestation),
                             Route("/{path:path}", serve, methods=["POST", "GET"])])


class StandInNode:
    def __init__(self, router_url: str, name: str, capacity: int, identity: NodeIdentity, chunks: int = 4,
                 delay: float = 0.0, interval: float = 0.5) -> None:
        self.name, self.identity = name, identity
        self.server = BackgroundServer(node_app(name, identity, chunks, delay))
        self.agent = NodeAgent(router_url, self.server.url, capacity, identity, interval)

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
    identity = NodeIdentity(Measurement.from_record(json.loads(os.environ["NODE_MEASUREMENT"])))
    node = StandInNode(args.router, args.name, args.capacity, identity, args.chunks, args.delay).start()
    print(f"ready {node.server.url}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    node.stop()


if __name__ == "__main__":
    main()
