"""The router's own check of a node's evidence, against a real transparency log on loopback: a node is attested
only with evidence for a nonce this router issued, signed by the key its report names, binding the report's HPKE
key, fresh, and naming a release in the log as the router has seen it grow. Each refusal names its check."""
import argparse

import httpx
import pytest

from ccserve.attest.identity import NodeIdentity
from ccserve.attest.log_http import build_log_app
from ccserve.attest.tlog import TransparencyLog
from ccserve.router.attestation import AcceptUnattested, EvidenceAttestor
from ccserve.router.commands import attestor_of
from ccserve.router.errors import NodeRefused
from ccserve.router.nodes import NodeReport
from ccserve.router.serve import BackgroundServer
from tests.router.conftest import ReleaseLog, stand_in_measurement


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    release_log = ReleaseLog.start(tmp_path_factory.mktemp("attestation") / "log")
    yield release_log
    release_log.server.stop()


@pytest.fixture
def attestor(log):
    with httpx.Client(timeout=10) as http:
        yield EvidenceAttestor(log.server.url, log.vkey, http)


def report_of(node: NodeIdentity, hpke: bytes | None = None) -> NodeReport:
    return NodeReport("http://node.test:1", 10, hpke or node.hpke_public_key, node.signing_public_key, 0.0)


def test_an_honest_node_is_attested_for_its_keys_only(log, attestor):
    node = NodeIdentity(log.measurement)
    assert not attestor.is_attested(report_of(node))
    attestor.verify(report_of(node), node.evidence(attestor.challenge()))
    assert attestor.is_attested(report_of(node))
    assert not attestor.is_attested(report_of(node, hpke=b"\x01" * 32))   # same signer, an unattested HPKE key


def test_refusals_name_the_failed_check(log, attestor):
    node = NodeIdentity(log.measurement)
    nonce = attestor.challenge()
    evidence = node.evidence(nonce)
    attestor.verify(report_of(node), evidence)
    with pytest.raises(NodeRefused, match="StaleEvidence.*already"):          # the same nonce twice: replayed
        attestor.verify(report_of(node), evidence)
    with pytest.raises(NodeRefused, match="StaleEvidence"):                   # a nonce the router never issued
        attestor.verify(report_of(node), node.evidence(b"\x07" * 32))
    with pytest.raises(NodeRefused, match="StaleEvidence.*old"):
        attestor.verify(report_of(node), node.evidence(attestor.challenge(), now=1_000_000))
    other = NodeIdentity(log.measurement)                                      # evidence of another node's keys
    with pytest.raises(NodeRefused, match="other keys"):
        attestor.verify(report_of(node), other.evidence(attestor.challenge()))
    rogue = NodeIdentity(stand_in_measurement())                               # an unpublished release
    with pytest.raises(NodeRefused, match="UnknownMeasurement"):
        attestor.verify(report_of(rogue), rogue.evidence(attestor.challenge()))
    forged = node.evidence(attestor.challenge())
    forged["signature"] = other.evidence(b"\x00" * 32)["signature"]
    with pytest.raises(NodeRefused, match="BadSignature"):
        attestor.verify(report_of(node), forged)
    with pytest.raises(NodeRefused, match="MalformedEvidence"):
        attestor.verify(report_of(node), {"not": "evidence"})
    assert not attestor.is_attested(report_of(rogue)) and not attestor.is_attested(report_of(other))


def test_a_log_that_forks_after_the_router_saw_it_is_refused(log, attestor, tmp_path):
    node = NodeIdentity(log.measurement)
    attestor.verify(report_of(node), node.evidence(attestor.challenge()))      # the router has seen the log
    fork = TransparencyLog.create(tmp_path / "fork", log.signer)   # same key and origin, another history that
    fork.append(b'{"other":"history"}', log.signer)                # also holds the release, but does not extend
    fork.append(log.measurement.entry(), log.signer)                # what the router saw
    with BackgroundServer(build_log_app(tmp_path / "fork")) as server:
        attestor.log.url = server.url
        with pytest.raises(NodeRefused, match="LogForked"):
            attestor.verify(report_of(node), node.evidence(attestor.challenge()))


def test_only_open_may_accept_unattested_nodes():
    def args(**kw):
        base = dict(insecure_accept_unattested_nodes=True, privacy="pcc", log_url=None, log_key=None,
                    evidence_max_age=60.0)
        return argparse.Namespace(**{**base, **kw})

    with pytest.raises(ValueError, match="pcc privacy policy refuses"):
        attestor_of(args(), None)
    assert isinstance(attestor_of(args(privacy="open"), None), AcceptUnattested)
