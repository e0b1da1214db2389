"""A whole oblivious path in this process (issuer, transparency log, gateway/router, relay, stand-in nodes on
loopback threads), for tests that need real HTTP between the parts but not separate processes (test_loopback.py
has those). The stand-in nodes attest for real: their measurement is a release in a real log, which the router
checks their evidence against."""
from __future__ import annotations

import contextlib
import os
import random
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import ccserve
from ccserve.attest.identity import NodeIdentity
from ccserve.attest.log_http import build_log_app
from ccserve.attest.measure import Measurement
from ccserve.attest.note import Signer
from ccserve.attest.tlog import TransparencyLog
from ccserve.router import bhttp, gateway, relay, tokens
from ccserve.router.attestation import EvidenceAttestor
from ccserve.router.issuer import Issuer, credential_digest, fetch_tokens, issuer_app
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


def stand_in_measurement() -> Measurement:
    """The measurement of a release the stand-in nodes "run" (digests of nothing in particular)."""
    return Measurement(os.urandom(32).hex(), os.urandom(32).hex(), os.urandom(32).hex(), ccserve.__version__)


@dataclass
class ReleaseLog:
    """A transparency log holding one release, served on loopback."""
    directory: Path
    signer: Signer
    measurement: Measurement
    server: BackgroundServer

    @classmethod
    def start(cls, directory: Path) -> ReleaseLog:
        signer = Signer.generate("router-tests.example/releases")
        measurement = stand_in_measurement()
        TransparencyLog.create(directory, signer).append(measurement.entry(), signer)
        return cls(directory, signer, measurement, BackgroundServer(build_log_app(directory)).start())

    @property
    def vkey(self) -> str:
        return self.signer.verifier.encode()


@dataclass
class Deployment:
    gateway: gateway.Gateway
    gateway_url: str
    relay_url: str
    nodes: list[StandInNode]
    http: httpx.Client
    client: ObliviousClient
    unspent: list[tokens.Token]
    log: ReleaseLog

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
    tmp = tempfile.TemporaryDirectory()
    log = ReleaseLog.start(Path(tmp.name) / "log")
    http = httpx.Client(timeout=30)
    attestor = EvidenceAttestor(log.server.url, log.vkey, http)
    gw, gw_app = gateway.build(issuer_url, attestor, report_ttl=5.0, rng=random.Random(11))
    servers = [log.server, BackgroundServer(gw_app).start()]
    _, relay_app = relay.build(servers[1].url)
    servers.append(BackgroundServer(relay_app).start())
    nodes = [StandInNode(servers[1].url, f"node{i}", c, NodeIdentity(log.measurement)).start()
             for i, c in enumerate(CAPACITIES)]
    try:
        yield Deployment(gw, servers[1].url, servers[2].url, nodes, http, ObliviousClient(servers[2].url, http),
                         fetch_tokens(issuer_url, CREDENTIAL, n_tokens, http), log)
    finally:
        stop_all([node.stop for node in nodes] + [server.stop for server in servers])
        http.close()
        tmp.cleanup()


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
