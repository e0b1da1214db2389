"""RelayedClient against a whole path in this process, over real HTTP on loopback: issuer, transparency log, gateway
(checking evidence), relay, and attested nodes (the sealing middleware around an echoing OpenAI-shaped app) that
register through the real NodeAgent. The node set changing under the client, a gateway that has no node, and the
client's verification of what the router lists. (tests/test_deployment.py runs the real processes.)"""
import random
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from ccserve.attest.identity import NodeIdentity
from ccserve.attest.log_http import build_log_app
from ccserve.attest.measure import measure
from ccserve.client import GatewayError, NoVerifiedNode, RelayedClient, UnknownMeasurement
from ccserve.router import gateway, relay
from ccserve.router.attestation import AcceptUnattested, EvidenceAttestor
from ccserve.router.issuer import Issuer, credential_digest, issuer_app
from ccserve.router.node_agent import NodeAgent
from ccserve.router.serve import BackgroundServer
from tests.attest.live import CONFIG, make_log, make_model_dir, node_app, released_identity, serve

CREDENTIAL = "relayed-client-test"
MESSAGES = [{"role": "user", "content": "the secret plan is ready"}]


@dataclass
class Path_:
    gateway: gateway.Gateway
    gateway_url: str
    relay_url: str
    servers: list


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("relayed")
    log, signer = make_log(tmp / "log")
    model = make_model_dir(tmp / "model")
    identity = released_identity(model, log, signer)
    issuer = BackgroundServer(issuer_app(Issuer.generate({credential_digest(CREDENTIAL)}, quota=10**6))).start()
    log_server = BackgroundServer(build_log_app(tmp / "log")).start()
    http = httpx.Client(timeout=30)
    yield dict(tmp=tmp, model=model, identity=identity, log_url=log_server.url, vkey=signer.verifier.encode(),
               issuer_url=issuer.url, http=http)
    http.close()
    log_server.stop()
    issuer.stop()


def make_path(world, attestor) -> Path_:
    gw, app = gateway.build(world["issuer_url"], attestor, report_ttl=30, rng=random.Random(5))
    gateway_server = BackgroundServer(app).start()
    _, relay_app = relay.build(gateway_server.url)
    relay_server = BackgroundServer(relay_app).start()
    return Path_(gw, gateway_server.url, relay_server.url, [relay_server, gateway_server])


def add_node(path: Path_, identity: NodeIdentity, capacity: int):
    server = serve(node_app(identity))
    agent = NodeAgent(path.gateway_url, server.url, capacity, identity, interval=60).start()
    path.servers[:0] = [agent, server]
    return agent


@pytest.fixture
def checked_path(world) -> Iterator[Path_]:
    path = make_path(world, EvidenceAttestor(world["log_url"], world["vkey"], world["http"]))
    yield path
    for server in path.servers:
        server.stop()


def client(world, path: Path_, tmp_path) -> RelayedClient:
    return RelayedClient(path.relay_url, issuer_url=world["issuer_url"], credential=CREDENTIAL,
                         log_url=world["log_url"], log_key=world["vkey"], state_dir=tmp_path, token_batch=3)


def test_whole_and_streamed_through_the_relay(world, checked_path, tmp_path):
    nodes = [NodeIdentity(world["identity"].measurement) for _ in range(2)]
    for node in nodes:
        add_node(checked_path, node, 10)
    with client(world, checked_path, tmp_path) as c:
        reply = c.chat.completions.create(model="m", messages=MESSAGES)
        assert reply["choices"][0]["message"]["content"] == "the secret plan is ready"
        words = [e["choices"][0]["delta"]["content"]
                 for e in c.chat.completions.create(model="m", messages=MESSAGES, stream=True)]
        assert words == ["the", "secret", "plan", "is", "ready"]
        assert {n.hpke_public_key for n in c.nodes} == {n.hpke_public_key for n in nodes}
    stats = checked_path.gateway.stats.snapshot()
    assert stats["served"] == 2 and stats["directory"] == 3 and checked_path.gateway.verifier.spent_count() == 2


def test_a_node_set_that_changed_after_sealing_is_caught_up_with(world, checked_path, tmp_path):
    """The client sealed to A; the router now has only B, which cannot open the request and says so unopened:
    the client fetches the list again, verifies B, and resends with a fresh token."""
    a, b = NodeIdentity(world["identity"].measurement), NodeIdentity(world["identity"].measurement)
    add_node(checked_path, a, 10)
    with client(world, checked_path, tmp_path) as c:
        assert [n.hpke_public_key for n in c.refresh()] == [a.hpke_public_key]
        add_node(checked_path, b, 10)
        checked_path.gateway.registry.mark_failed(a.signing_public_key.hex())
        reply = c.chat.completions.create(model="m", messages=MESSAGES)
        assert reply["choices"][0]["message"]["content"] == "the secret plan is ready"
        assert [n.hpke_public_key for n in c.nodes] == [b.hpke_public_key]
    assert checked_path.gateway.verifier.spent_count() == 2                 # the refused try cost its token


def test_no_node_is_a_gateway_error(world, checked_path, tmp_path):
    node = NodeIdentity(world["identity"].measurement)
    add_node(checked_path, node, 10)
    with client(world, checked_path, tmp_path) as c:
        c.refresh()
        checked_path.gateway.registry.mark_failed(node.signing_public_key.hex())
        with pytest.raises(GatewayError, match="503"):
            c.chat.completions.create(model="m", messages=MESSAGES)
        with pytest.raises(NoVerifiedNode, match="start attested nodes"):
            c.refresh()


def test_the_client_leaves_out_what_an_unchecking_router_lists(world, tmp_path):
    """Behind a router that checks nothing, a node running an unpublished release is listed; the client refuses
    it, seals only to the verified node, and every request is served there."""
    path = make_path(world, AcceptUnattested())
    try:
        honest = NodeIdentity(world["identity"].measurement)
        rogue = NodeIdentity(measure({**CONFIG, "public_prefixes": ["unpublished"]}, world["model"], progress=False))
        add_node(path, honest, 10)
        add_node(path, rogue, 1)
        with client(world, path, tmp_path) as c:
            assert [n.hpke_public_key for n in c.refresh()] == [honest.hpke_public_key]
            assert isinstance(c.refused[rogue.signing_public_key.hex()], UnknownMeasurement)
            reply = c.chat.completions.create(model="m", messages=MESSAGES)      # drawn: honest, or the rogue,
            assert reply["choices"][0]["message"]["content"] == "the secret plan is ready"  # which cannot open it
            path.gateway.registry.mark_failed(honest.signing_public_key.hex())   # only the rogue is left to draw:
            with pytest.raises(NoVerifiedNode, match="UnknownMeasurement"):      # it refuses the sealed request,
                c.chat.completions.create(model="m", messages=MESSAGES)          # and the client sends it nothing
        assert path.gateway.stats.snapshot()["served"] >= 2                      # both tries ended at a node
    finally:
        for server in path.servers:
            server.stop()
