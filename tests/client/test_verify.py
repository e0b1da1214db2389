"""verify_node against real nodes and logs on loopback: it accepts an honest node and refuses, with its own error
class, each way a node or a log can lie."""
import base64
import json
import shutil

import pytest
from fastapi import FastAPI

from ccserve.attest.errors import (BadSignature, HardwareRequired, LogForked, LogRolledBack, MalformedEvidence,
                                   StaleEvidence, UnknownMeasurement, VerificationError)
from ccserve.attest.encoding import b64encode
from ccserve.attest.identity import NodeIdentity
from ccserve.attest.log_http import build_log_app
from ccserve.attest.measure import measure
from ccserve.attest.note import Signer
from ccserve.attest.tlog import TransparencyLog
from ccserve.client import verify_node
from tests.attest.live import CONFIG, make_log, make_model_dir, node_app, openai_app, released_identity, serve


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    model = make_model_dir(tmp / "model")
    log, signer = make_log(tmp / "log")
    log.append(b'{"earlier":"release"}', signer)
    identity = released_identity(model, log, signer)
    servers = {"node": serve(node_app(identity)), "log": serve(build_log_app(tmp / "log"))}
    yield dict(tmp=tmp, model=model, log=log, signer=signer, identity=identity, servers=servers,
               node=servers["node"].url, log_url=servers["log"].url, vkey=signer.verifier.encode())
    for s in servers.values():
        s.stop()


def verify(w, state, node=None, log_url=None, **kw):
    return verify_node(node or w["node"], log_url or w["log_url"], str(state), log_key=w["vkey"], **kw)


def test_an_honest_node_verifies(world, tmp_path):
    node = verify(world, tmp_path)
    assert node.hpke_public_key == world["identity"].hpke_public_key
    assert node.measurement == world["identity"].measurement and node.log_index == 1
    assert node.root == "software" and node.hardware_verified == ()
    assert verify(world, tmp_path).checkpoint == node.checkpoint  # again, from saved state


def test_a_node_running_an_unpublished_release_is_refused(world, tmp_path):
    rogue = NodeIdentity(measure({**CONFIG, "public_prefixes": ["unpublished"]}, world["model"], progress=False))
    server = serve(node_app(rogue))
    try:
        with pytest.raises(UnknownMeasurement, match="not among"):
            verify(world, tmp_path, node=server.url)
    finally:
        server.stop()


def evidence_altering_app(identity: NodeIdentity, alter) -> FastAPI:
    """A node whose /attestation answer passes through `alter(evidence doc, nonce)`: a man in the middle."""
    app = openai_app()

    @app.get("/attestation")
    def attestation(nonce: str) -> dict:
        return alter(identity.evidence(bytes.fromhex(nonce)), nonce)

    return app


def run_altered(world, tmp_path, alter, **kw):
    server = serve(evidence_altering_app(world["identity"], alter))
    try:
        return verify(world, tmp_path, node=server.url, **kw)
    finally:
        server.stop()


def test_evidence_with_a_wrong_signature_is_refused(world, tmp_path):
    def swap_key(doc, nonce):
        statement = json.loads(base64.b64decode(doc["payload"]))
        statement["hpke"]["public_key"] = b64encode(b"\x42" * 32)  # the attacker's key, the node's signature
        return {**doc, "payload": b64encode(json.dumps(statement).encode())}

    with pytest.raises(BadSignature):
        run_altered(world, tmp_path, swap_key)


def test_replayed_evidence_is_refused(world, tmp_path):
    recorded = world["identity"].evidence(b"\x00" * 32)
    with pytest.raises(StaleEvidence, match="different nonce"):
        run_altered(world, tmp_path, lambda doc, nonce: recorded)


def test_old_evidence_is_refused(world, tmp_path):
    identity = world["identity"]
    with pytest.raises(StaleEvidence, match="old"):
        run_altered(world, tmp_path, lambda doc, nonce: identity.evidence(bytes.fromhex(nonce), now=1_000_000))


def test_software_evidence_is_refused_where_hardware_is_required(world, tmp_path):
    with pytest.raises(HardwareRequired, match="software root"):
        verify(world, tmp_path, require_hardware=True)


def test_a_node_that_is_not_a_ccserve_node(world, tmp_path):
    with pytest.raises(MalformedEvidence):
        verify(world, tmp_path, node=world["log_url"])
    with pytest.raises(MalformedEvidence, match="cannot be reached"):
        verify(world, tmp_path, node="http://127.0.0.1:9")


def test_a_log_signed_by_another_key_is_refused(world, tmp_path):
    impostor = Signer.generate(world["signer"].name)  # same name, its own key
    TransparencyLog.create(tmp_path / "impostor", impostor).append(world["identity"].measurement.entry(), impostor)
    server = serve(build_log_app(tmp_path / "impostor"))
    try:
        with pytest.raises(BadSignature, match="pinned"):
            verify(world, tmp_path / "state", log_url=server.url)
    finally:
        server.stop()


def rewritten_log(world, path, entries: list[bytes]) -> str:
    """A log with the same name and key but the given history: what a compromised log operator can sign."""
    log = TransparencyLog.create(path, world["signer"])
    for e in entries:
        log.append(e, world["signer"])
    return path


def serve_log(path):
    return serve(build_log_app(path))


def test_forked_rolled_back_and_dropped_entry_logs_are_refused(world, tmp_path):
    state = tmp_path / "state"
    seen = world["log"].entries(0, world["log"].size)  # [earlier, node release]
    verify(world, state)  # the client has now seen a 2-entry log
    cases = [
        (LogRolledBack, [seen[1]]),  # an older, smaller view (dropped the first entry)
        (LogForked, [b'{"other":"history"}', seen[1]]),  # same size, different tree
        (LogForked, [seen[1], b'{"extra":1}', seen[0]]),  # grew, but not by appending to what was seen
        (LogForked, [seen[0], b'{"inserted":1}', seen[1]]),  # an entry slipped in before the node's
    ]
    for i, (error, entries) in enumerate(cases):
        server = serve_log(rewritten_log(world, tmp_path / f"log{i}", entries))
        try:
            with pytest.raises(error):
                verify(world, state, log_url=server.url)
        finally:
            server.stop()
    verify(world, state)  # the honest log still verifies: refusals saved nothing


def test_an_honest_log_that_grew_verifies_and_is_then_never_rolled_back(world, tmp_path):
    state = tmp_path / "state"
    old = tmp_path / "old"
    shutil.copytree(world["tmp"] / "log", old)
    verify(world, state)
    world["log"].append(b'{"later":"release"}', world["signer"])
    assert verify(world, state).checkpoint.size == world["log"].size  # consistency proof checked
    server = serve_log(old)  # the log's earlier state, replayed
    try:
        with pytest.raises(LogRolledBack):
            verify(world, state, log_url=server.url)
    finally:
        server.stop()


def test_a_tampered_state_directory_is_refused(world, tmp_path):
    verify(world, tmp_path)
    saved = next((tmp_path / "checkpoints").glob("*.note"))
    saved.write_text(saved.read_text().replace("\n2\n", "\n1\n").replace("\n3\n", "\n1\n"))
    with pytest.raises(VerificationError, match="state directory"):
        verify(world, tmp_path)


def test_concurrent_clients_share_one_state_directory(world, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(8) as pool:
        nodes = list(pool.map(lambda _: verify(world, tmp_path), range(16)))
    assert len({n.hpke_public_key for n in nodes}) == 1
    assert len(list((tmp_path / "checkpoints").glob("*.note"))) == 1


class SyntheticTdx:
    """A stand-in TDX root: a quote-shaped blob carrying the right REPORTDATA but no Intel signature, which is
    exactly what the client must not accept without a verifier of the chain."""

    kind = "tdx"

    def collect(self, payload: bytes) -> dict:
        from ccserve.attest.hardware import report_data
        blob = (4).to_bytes(2, "little") + bytes(566) + report_data(payload) + bytes(64)
        return {"kind": "tdx", "provider": "tdx_guest", "report": b64encode(blob)}


def test_hardware_evidence_needs_a_verifier_of_its_chain(world, tmp_path):
    identity = NodeIdentity(world["identity"].measurement, roots=[SyntheticTdx()])
    server = serve(node_app(identity))
    try:
        node = verify(world, tmp_path, node=server.url)  # not required: accepted, but nothing counted as verified
        assert node.root == "hardware" and node.hardware_verified == ()
        with pytest.raises(HardwareRequired, match="no verifier"):
            verify(world, tmp_path, node=server.url, require_hardware=True)
        seen = []
        node = verify(world, tmp_path, node=server.url, require_hardware=True,
                      hardware_verifiers={"tdx": lambda item, expected: seen.append(expected)})
        assert node.hardware_verified == ("tdx",) and len(seen) == 1 and len(seen[0]) == 64

        def refuse(item, expected):
            raise HardwareRequired("the quote's PCK chain does not lead to Intel's root")
        with pytest.raises(HardwareRequired, match="PCK"):
            verify(world, tmp_path, node=server.url, require_hardware=True, hardware_verifiers={"tdx": refuse})
    finally:
        server.stop()
