"""Evidence made by a real NodeIdentity: it verifies, and every alteration, replay or stale copy is refused;
hardware roots: detection falls back to software plainly, and report bindings are checked byte for byte."""
import base64
import hashlib
import json
import pickle

import pytest

from ccserve.attest import evidence as ev
from ccserve.attest.encoding import b64encode
from ccserve.attest.errors import BadSignature, HardwareRequired, MalformedEvidence, StaleEvidence
from ccserve.attest.hardware import (ConfigfsTsm, detect_roots, gpu_nonce, quote_report_data, report_data,
                                     verify_hardware)
from ccserve.attest.identity import NodeIdentity, answer_attestation
from ccserve.attest.measure import measure
from tests.attest.live import CONFIG, make_model_dir


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    return NodeIdentity(measure(CONFIG, make_model_dir(tmp_path_factory.mktemp("m")), progress=False))


def test_evidence_binds_keys_measurement_and_nonce(identity):
    nonce = bytes(range(32))
    e = ev.Evidence.parse(identity.evidence(nonce))
    e.check_signature()
    e.check_fresh(nonce, max_age=60)
    assert e.hpke_public_key == identity.hpke_public_key and e.signing_key == identity.signing_public_key
    assert e.measurement == identity.measurement
    assert e.root == "software" and e.hardware_kinds == [] and e.hardware == []


def test_an_altered_statement_fails_its_signature(identity):
    doc = identity.evidence(bytes(32))
    statement = json.loads(base64.b64decode(doc["payload"]))
    statement["measurement"]["weights"] = "0" * 64
    doc["payload"] = b64encode(json.dumps(statement).encode())
    with pytest.raises(BadSignature):
        ev.Evidence.parse(doc).check_signature()


def test_a_substituted_hpke_key_fails_the_signature(identity):
    """The attack the signature exists for: swap in the attacker's key, keep the node's signature."""
    doc = identity.evidence(bytes(32))
    statement = json.loads(base64.b64decode(doc["payload"]))
    statement["hpke"]["public_key"] = b64encode(b"\x07" * 32)
    doc["payload"] = b64encode(ev.canonical_json(statement))
    with pytest.raises(BadSignature):
        ev.Evidence.parse(doc).check_signature()


def test_replayed_and_stale_evidence_is_refused(identity):
    e = ev.Evidence.parse(identity.evidence(b"\x01" * 32, now=1_000_000))
    e.check_signature()
    with pytest.raises(StaleEvidence, match="different nonce"):
        e.check_fresh(b"\x02" * 32, max_age=60, now=1_000_000)
    with pytest.raises(StaleEvidence, match="old"):
        e.check_fresh(b"\x01" * 32, max_age=60, now=1_000_061)
    with pytest.raises(StaleEvidence, match="future"):
        e.check_fresh(b"\x01" * 32, max_age=60, now=1_000_000 - 31)


def test_malformed_evidence_names_the_problem(identity):
    doc = identity.evidence(bytes(32))
    for bad in ({}, {**doc, "payload": "!!"}, {**doc, "payload": b64encode(b"{}")}, []):
        with pytest.raises(MalformedEvidence):
            ev.Evidence.parse(bad)
    statement = json.loads(base64.b64decode(doc["payload"]))
    statement["root"] = "hardware"  # claims hardware, names no kind
    with pytest.raises(MalformedEvidence, match="root"):
        ev.Evidence.parse({**doc, "payload": b64encode(ev.canonical_json(statement))})


def test_attestation_handler(identity):
    status, body = answer_attestation(identity, "zz")
    assert status == 400 and body["error"]["code"] == "bad_nonce"
    assert answer_attestation(identity, "00" * 8)[0] == 400  # 8 bytes: too short to be fresh
    status, body = answer_attestation(identity, "ab" * 32)
    assert status == 200 and ev.Evidence.parse(body).nonce == b"\xab" * 32


def test_node_reports_are_signed_under_a_context(identity):
    sig = identity.sign("ccserve-node-report/v1", b"capacity=8")
    ev.verify_node_signature(identity.signing_public_key, "ccserve-node-report/v1", b"capacity=8", sig)
    with pytest.raises(BadSignature):
        ev.verify_node_signature(identity.signing_public_key, "ccserve-node-report/v1", b"capacity=9", sig)
    with pytest.raises(BadSignature):
        ev.verify_node_signature(identity.signing_public_key, "other/v1", b"capacity=8", sig)
    with pytest.raises(ValueError):
        identity.sign(ev.FORMAT, b"a forged evidence payload")  # reports can never pass for evidence


def test_keys_never_leave_memory(identity):
    with pytest.raises(TypeError):
        pickle.dumps(identity)
    assert identity.hpke_public_key.hex() not in repr(identity)


def test_no_hardware_here_means_software_said_plainly(tmp_path):
    assert detect_roots(tmp_path / "absent") == []  # no configfs-tsm, and nv-attestation-sdk is not installed
    (tmp_path / "tsm").mkdir()  # configfs-tsm present but without a quote provider: mkdir makes no outblob
    assert detect_roots(tmp_path / "tsm") == []
    assert ConfigfsTsm(tmp_path / "tsm").available()


def tdx_quote(rd: bytes, version: int = 4) -> dict:
    offset = 568 if version == 4 else 574
    blob = version.to_bytes(2, "little") + bytes(offset - 2) + rd + bytes(100)
    return {"kind": "tdx", "provider": "tdx_guest", "report": b64encode(blob)}


def snp_report(rd: bytes) -> dict:
    return {"kind": "sev-snp", "provider": "sev_guest", "report": b64encode(bytes(0x50) + rd + bytes(1000))}


def test_hardware_report_data_is_found_and_checked():
    payload = b'{"format":"ccserve-evidence/v1"}'
    rd = report_data(payload)
    assert rd == hashlib.sha512(b"ccserve-evidence/v1 hardware-binding\n" + payload).digest()
    for item in (tdx_quote(rd), tdx_quote(rd, 5), snp_report(rd)):
        assert quote_report_data(item) == rd
    calls = []
    verifiers = {"tdx": lambda item, expected: calls.append(expected)}
    assert verify_hardware([tdx_quote(rd)], payload, verifiers) == ["tdx"] and calls == [rd]
    assert verify_hardware([snp_report(rd)], payload, verifiers) == []  # no sev-snp verifier: proves nothing
    with pytest.raises(HardwareRequired, match="REPORTDATA"):
        verify_hardware([tdx_quote(report_data(b"other payload"))], payload, verifiers)
    gpu = {"kind": "nvidia-gpu", "nonce": gpu_nonce(payload).hex(), "evidence": []}
    assert verify_hardware([gpu], payload, {}) == []
    with pytest.raises(HardwareRequired, match="nonce"):
        verify_hardware([{**gpu, "nonce": "00" * 32}], payload, {})
    with pytest.raises(MalformedEvidence):
        quote_report_data({"kind": "tdx", "report": b64encode(b"\x04\x00short")})
