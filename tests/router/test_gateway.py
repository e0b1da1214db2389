"""The gateway/router over real HTTP on loopback: requests served through the relay, streamed or whole; tokens
spent once; tampering refused; only attested nodes registered; a dead node avoided."""
import base64
import hashlib
import json
import os

import httpx
import pytest

from ccserve.attest.identity import NodeIdentity
from ccserve.router import bhttp, ohttp
from ccserve.router.errors import NodeRefused
from ccserve.router.issuer import Issuer, credential_digest, fetch_tokens, issuer_app
from ccserve.router.nodes import SignedReport
from ccserve.router.oblivious import ObliviousClient, RelayRefused
from ccserve.router.serve import BackgroundServer
from tests.router.conftest import stand_in_measurement
from tests.router.stand_in_node import StandInNode

NODE_VISIBLE_HEADERS = {"host", "content-length", "content-type", "accept"}


def served_by(response: bhttp.Response) -> str:
    return json.loads(response.content)["node"]


class Counts:
    """The gateway's counters from now on (the deployment is shared by this module's tests)."""

    def __init__(self, gateway) -> None:
        self.gateway, self.before = gateway, gateway.stats.snapshot()

    def __getitem__(self, outcome: str) -> int:
        return self.gateway.stats.snapshot()[outcome] - self.before[outcome]


def test_whole_request_through_the_relay(deployment):
    body, counts = os.urandom(50_000), Counts(deployment.gateway)
    response = deployment.client.send(deployment.request(body, extra=[("x-client-trace", "secret")]))
    assert response.status == 200 and response.header("content-type") == "application/json"
    answer = json.loads(response.content)
    assert answer["sha256"] == hashlib.sha256(body).hexdigest()[:16]     # the opaque body arrived untouched
    assert answer["path"] == "/v1/chat/completions"
    assert set(answer["headers"]) <= NODE_VISIBLE_HEADERS                 # no token, no client header
    assert counts["served"] == 1


def test_streamed_request_through_the_relay(deployment):
    body = b"x" * 1000
    events = list(deployment.client.stream(deployment.request(body, stream=True)))
    head, chunks, trailers = events[0], [e for e in events if isinstance(e, bytes)], events[-1]
    assert isinstance(head, bhttp.Head) and head.status == 200
    assert head.header("content-type").startswith("text/event-stream")
    lines = b"".join(chunks).decode().split("\n\n")[:-1]
    node = lines[0].split()[1]
    digest = hashlib.sha256(body).hexdigest()[:16]
    assert lines == [f"data: {node} {i} {digest}" for i in range(4)]
    assert isinstance(trailers, bhttp.Trailers) and trailers.get("ccserve-error") is None


def test_token_is_spent_once_and_required(deployment):
    token, counts = deployment.token(), Counts(deployment.gateway)
    assert deployment.client.send(deployment.request(token=token)).status == 200
    again = deployment.client.send(deployment.request(token=token))
    assert again.status == 401 and b"already spent" in again.content
    missing = deployment.client.send(bhttp.Request("POST", "/v1/completions", content=b"x"))
    assert missing.status == 401
    streamed = list(deployment.client.stream(deployment.request(token=token, stream=True)))
    assert streamed[0].status == 401
    assert counts["token_refused"] == 3 and counts["served"] == 1


def test_relay_altering_a_ciphertext_byte_is_refused(deployment):
    """A relay that flips one bit of the encapsulated request gets a plain 400, and the token inside is not
    spent: the honest retry succeeds."""
    config, counts = deployment.client.key_config(), Counts(deployment.gateway)
    token = deployment.token()
    encoded = bhttp.encode_request(deployment.request(token=token))
    enc_request, _ = ohttp.encapsulate_request(config, encoded)
    for index in (0, 10, len(enc_request) // 2, len(enc_request) - 1):
        tampered = bytearray(enc_request)
        tampered[index] ^= 0x80
        reply = deployment.http.post(deployment.gateway_url + "/gateway", content=bytes(tampered),
                                     headers={"content-type": ohttp.REQUEST_MEDIA_TYPE})
        assert reply.status_code == 400 and reply.headers["content-type"] == "application/problem+json"
    assert counts["served"] == 0 and counts["decrypt_failed"] + counts["unknown_key"] == 4
    assert deployment.client.send(bhttp.decode_request(encoded)).status == 200     # the token still works
    # through the relay the client is told plainly, not handed something that looks like an answer
    reply = deployment.http.post(deployment.relay_url + "/", content=enc_request[:-1],
                                 headers={"content-type": ohttp.REQUEST_MEDIA_TYPE})
    assert reply.status_code == 400


def test_nodes_listing_is_verifiable(deployment):
    listing = deployment.http.get(deployment.gateway_url + "/nodes").json()["nodes"]
    assert sorted(n["capacity"] for n in listing) == [10, 30, 60]
    for entry in listing:
        signed = SignedReport.from_json(entry["signed_report"])
        signed.verify()
        assert signed.report.url == entry["url"] and len(signed.report.hpke_public_key) == 32
    keys = deployment.http.get(deployment.relay_url + "/ohttp-keys")
    assert keys.headers["content-type"] == ohttp.KEYS_MEDIA_TYPE
    assert ohttp.decode_key_configs(keys.content) == [deployment.gateway.key.config]


def test_a_node_running_an_unpublished_release_cannot_register(deployment):
    intruder = StandInNode(deployment.gateway_url, "intruder", 1000, NodeIdentity(stand_in_measurement()))
    intruder.server.start()
    try:
        with pytest.raises(NodeRefused, match="UnknownMeasurement"):
            intruder.agent.start()
        report = intruder.agent.report().to_json()       # and without evidence it is not attested either
        reply = deployment.http.post(deployment.gateway_url + "/nodes/register", json=report)
        assert reply.status_code == 403 and reply.json()["code"] == "attestation_required"
    finally:
        intruder.server.stop()
    assert len(deployment.http.get(deployment.gateway_url + "/nodes").json()["nodes"]) == 3


def test_a_router_that_forgot_its_nodes_gets_their_evidence_again(fresh_deployment):
    """A restarted router knows no node: the agents' next heartbeat is told so, and they attest again."""
    deployment = fresh_deployment
    attestor = deployment.gateway.attestor
    forgotten = dict(attestor._attested)
    attestor._attested.clear()
    assert deployment.gateway.registry.healthy() == []
    with httpx.Client(timeout=30) as http:
        for node in deployment.nodes:
            node.agent.send_once(http)                    # a plain heartbeat, answered attestation_required
    assert attestor._attested == forgotten and len(deployment.gateway.registry.healthy()) == 3


def test_the_directory_answers_through_the_relay_without_a_token(deployment):
    """The node list and a node's evidence for the client's own nonce, as inner requests the gateway answers."""
    counts = Counts(deployment.gateway)
    listing = deployment.client.send(bhttp.Request("GET", "/nodes"))
    assert listing.status == 200
    nodes = json.loads(listing.content)["nodes"]
    assert len(nodes) == 3
    nonce = os.urandom(32).hex()
    reply = deployment.client.send(bhttp.Request("GET", f"/nodes/{nodes[0]['node_id']}/attestation?nonce={nonce}"))
    assert reply.status == 200
    statement = json.loads(base64.b64decode(json.loads(reply.content)["payload"]))
    assert statement["nonce"] == nonce and statement["signing_key"] == nodes[0]["signing_public_key"]
    for path in (f"/nodes/{'0' * 64}/attestation?nonce={nonce}", f"/nodes/{nodes[0]['node_id']}/other",
                 f"/nodes/{nodes[0]['node_id']}/attestation?nonce=zz"):
        assert deployment.client.send(bhttp.Request("GET", path)).status == 404
    assert deployment.client.send(bhttp.Request("POST", "/nodes", content=b"x")).status == 405
    assert counts["directory"] == 6 and counts["token_refused"] == 0 and counts["served"] == 0


def test_dead_node_fails_cleanly_and_is_avoided(fresh_deployment):
    deployment = fresh_deployment
    dead = deployment.nodes[2]            # the largest: 60 of 100
    dead.stop()                           # heartbeats stop, connections are refused
    results = [deployment.client.send(deployment.request()) for _ in range(25)]
    failed = [r for r in results if r.status == 502]
    assert len(failed) == 1 and b"could not be reached" in failed[0].content
    after = results[results.index(failed[0]) + 1:]
    assert after and all(r.status == 200 and served_by(r) != dead.name for r in after)
    listing = deployment.http.get(deployment.gateway_url + "/nodes").json()["nodes"]
    assert dead.name not in {n["url"] for n in listing} and len(listing) == 2
    assert deployment.gateway.stats.snapshot()["node_failed"] == 1


def test_gateway_refuses_other_media_types_and_stale_keys(deployment):
    counts = Counts(deployment.gateway)
    reply = deployment.http.post(deployment.gateway_url + "/gateway", content=b"{}",
                                 headers={"content-type": "application/json"})
    assert reply.status_code == 415
    stale = ohttp.KeyConfig((deployment.gateway.key.key_id + 1) % 256, ohttp.KEM_X25519_SHA256,
                            ohttp.GatewayKey.generate().config.public_key, ohttp.DEFAULT_SUITES)
    client = ObliviousClient(deployment.relay_url, deployment.http, stale)
    with pytest.raises(RelayRefused, match="400"):
        client.send(deployment.request())
    client.forget_key_config()                    # what a client does then: fetch the configuration again
    assert client.send(deployment.request()).status == 200
    reply = deployment.http.post(deployment.gateway_url + "/nodes/register", content=b"not json")
    assert reply.status_code == 400
    assert counts["unknown_key"] == 1 and counts["unsupported_media_type"] == 1
    assert httpx.get(deployment.gateway_url + "/stats").json()["unknown_key"] >= 1


def test_inner_request_cannot_steer_to_another_host(deployment):
    """The inner path is appended to the chosen node's URL; a path that would change the host is refused, and
    so is any method but GET and POST. The token of a refused request is not spent."""
    counts = Counts(deployment.gateway)
    token = deployment.token()
    for path in ("@127.0.0.1:9/v1/x", "http://127.0.0.1:9/", ""):
        reply = deployment.client.send(bhttp.Request("POST", path or "x", headers=[("ccserve-token", token)]))
        assert reply.status == 400
    reply = deployment.client.send(bhttp.Request("DELETE", "/v1/x", headers=[("ccserve-token", token)]))
    assert reply.status == 400
    assert counts["bad_request"] == 4 and counts["served"] == 0
    assert deployment.client.send(deployment.request(token=token)).status == 200


def test_new_issuer_key_is_fetched_when_a_token_names_it(deployment):
    """The issuer restarted with a new in-memory key: the gateway fetches it when the first such token arrives."""
    restarted = Issuer.generate({credential_digest("c2")})
    keys = deployment.gateway.issuer_keys
    with BackgroundServer(issuer_app(restarted)) as server:
        old_url, keys.url, keys._last = keys.url, server.url + "/token-key", -1e9
        try:
            token = fetch_tokens(server.url, "c2", 1, deployment.http)[0].header_value()
            assert deployment.client.send(deployment.request(token=token)).status == 200
        finally:
            keys.url = old_url
    assert deployment.client.send(deployment.request()).status == 200     # the first issuer's tokens still work
