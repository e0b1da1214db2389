"""A whole oblivious path in this process (issuer, gateway/router, relay, stand-in nodes on loopback threads),
for tests that need real HTTP between the parts but not separate processes (test_loopback.py has those)."""
from __future__ import annotations

import contextlib
import random
import threading
from dataclasses import dataclass

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ccserve.router import bhttp, gateway, relay, tokens
from ccserve.router.issuer import Issuer, credential_digest, fetch_tokens, issuer_app
from ccserve.router.nodes import AllowList
from ccserve.router.oblivious import ObliviousClient
from ccserve.router.serve import BackgroundServer
from tests.router.stand_in_node import StandInNode

CREDENTIAL = "test-client-credential"
CAPACITIES = (10, 30, 60)


@pytest.fixture(scope="session")
def issuer() -> Issuer:
    return Issuer.generate({credential_digest(CREDENTIAL)}, quota=10**6)


@pytest.fixture(scope="session")
def issuer_url(issuer):
    with BackgroundServer(issuer_app(issuer)) as server:
        yield server.url


@dataclass
class Deployment:
    gateway: gateway.Gateway
    gateway_url: str
    relay_url: str
    nodes: list[StandInNode]
    http: httpx.Client
    client: ObliviousClient
    unspent: list[tokens.Token]

    def token(self) -> str:
        return self.unspent.pop().header_value()

    def request(self, body: bytes = b"sealed-for-the-nodes", stream: bool = False, token: str | None = None,
                path: str = "/v1/chat/completions", extra: list | None = None) -> bhttp.Request:
        headers = [("content-type", "application/octet-stream"), ("ccserve-token", token or self.token())]
        if stream:
            headers.append(("accept", "text/event-stream"))
        return bhttp.Request("POST", path, headers=headers + (extra or []), content=body)


@contextlib.contextmanager
def make_deployment(issuer_url: str, n_tokens: int):
    keys = [Ed25519PrivateKey.generate() for _ in CAPACITIES]
    allow = AllowList({k.public_key().public_bytes_raw() for k in keys})
    gw, gw_app = gateway.build(issuer_url, allow, report_ttl=5.0, rng=random.Random(11))
    servers = [BackgroundServer(gw_app).start()]
    _, relay_app = relay.build(servers[0].url)
    servers.append(BackgroundServer(relay_app).start())
    nodes = [StandInNode(servers[0].url, f"node{i}", c, k).start() for i, (c, k) in enumerate(zip(CAPACITIES, keys))]
    http = httpx.Client(timeout=30)
    try:
        yield Deployment(gw, servers[0].url, servers[1].url, nodes, http, ObliviousClient(servers[1].url, http),
                         fetch_tokens(issuer_url, CREDENTIAL, n_tokens, http))
    finally:
        http.close()
        stop_all([node.stop for node in nodes] + [server.stop for server in servers])


@pytest.fixture(scope="module")
def deployment(issuer_url):
    """Shared by a module's tests: they use their own tokens and look at differences in the counters."""
    with make_deployment(issuer_url, 200) as d:
        yield d


@pytest.fixture
def fresh_deployment(issuer_url):
    """For a test that changes the deployment (stops a node)."""
    with make_deployment(issuer_url, 40) as d:
        yield d


def stop_all(stops) -> None:
    """Stop servers side by side (each takes ~0.2 s to notice)."""
    threads = [threading.Thread(target=stop) for stop in stops]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
