"""The node registry: only signed, attested, fresh reports; capacity capped; failed nodes avoided."""
import dataclasses
import os

import pytest

from ccserve.attest.identity import NodeIdentity
from ccserve.router.errors import NodeRefused, NotAttested
from ccserve.router.nodes import REPORT_CONTEXT, NodeRegistry, NodeReport, SignedReport, sign_report
from tests.router.conftest import stand_in_measurement


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def report(node: NodeIdentity, clock, url="http://node-a:8000", capacity=10) -> SignedReport:
    return sign_report(NodeReport(url, capacity, node.hpke_public_key, node.signing_public_key, clock()), node)


@pytest.fixture
def setup():
    """Three nodes; the first two are attested (as router/attestation.py would remember them)."""
    keys = [NodeIdentity(stand_in_measurement()) for _ in range(3)]
    attested = {(k.signing_public_key, k.hpke_public_key) for k in keys[:2]}
    clock = Clock()
    registry = NodeRegistry(lambda r: (r.signing_public_key, r.hpke_public_key) in attested, max_capacity=100,
                            report_ttl=30, max_skew=30, clock=clock)
    return keys, clock, registry


def test_valid_report_roundtrips_through_json(setup):
    keys, clock, registry = setup
    signed = SignedReport.from_json(report(keys[0], clock).to_json())
    node = registry.register(signed)
    assert registry.healthy() == [node] and node.capacity == 10
    listing = node.listing()
    assert listing["url"] == "http://node-a:8000" and listing["signed_report"] == signed.to_json()


def test_refusals(setup):
    keys, clock, registry = setup
    good = report(keys[0], clock)
    with pytest.raises(NodeRefused, match="signature"):          # altered after signing
        registry.register(SignedReport(dataclasses.replace(good.report, capacity=99), good.signature))
    with pytest.raises(NodeRefused, match="signature"):          # signed by another key than it names
        registry.register(SignedReport(good.report, keys[1].sign(REPORT_CONTEXT, good.report.body_bytes())))
    with pytest.raises(NotAttested, match="not attested"):
        registry.register(report(keys[2], clock, url="http://node-c:8000"))
    swapped = dataclasses.replace(good.report, hpke_public_key=os.urandom(32))   # an attested signer, another key
    with pytest.raises(NotAttested):
        registry.register(sign_report(swapped, keys[0]))
    clock.now += 100
    with pytest.raises(NodeRefused, match="timestamp"):          # stale
        registry.register(good)
    registry.register(report(keys[0], clock))
    with pytest.raises(NodeRefused, match="replayed"):
        registry.register(report(keys[0], Clock(clock.now - 1)))
    with pytest.raises(NodeRefused, match="URL"):                # another key claiming a live node's URL
        registry.register(report(keys[1], clock))
    for bad in ({"url": "ftp://x", "capacity": 1}, {"capacity": 0}, {"capacity": True}, {"timestamp": "now"},
                {"hpke_public_key": "AAAA"}, {"extra": 1}):
        data = {**report(keys[0], clock).to_json()["report"], **bad}
        with pytest.raises(NodeRefused):
            SignedReport.from_json({"report": data, "signature": "AAAA"})


def test_capacity_is_capped(setup):
    keys, clock, registry = setup
    assert registry.register(report(keys[0], clock, capacity=10**9)).capacity == 100


def test_expiry_failure_and_recovery(setup):
    keys, clock, registry = setup
    a = registry.register(report(keys[0], clock, url="http://a"))
    b = registry.register(report(keys[1], clock, url="http://b"))
    assert [n.node_id for n in registry.healthy()] == sorted([a.node_id, b.node_id])
    registry.mark_failed(a.node_id)
    assert [n.node_id for n in registry.healthy()] == [b.node_id]
    clock.now += 1
    registry.register(report(keys[0], clock, url="http://a"))     # a newer report brings it back
    assert len(registry.healthy()) == 2
    clock.now += 31                                                # no report within the TTL: both expire
    assert registry.healthy() == []
    registry.register(report(keys[1], clock, url="http://a"))     # a's URL is free once a has expired
    assert [n.url for n in registry.healthy()] == ["http://a"]
