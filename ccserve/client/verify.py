"""Verify a node before sending it anything: its evidence (signature, freshness, hardware), and that what it
measures is a release in the transparency log, seen through a log view consistent with every earlier one this
client saw (kept in its state directory). The checks themselves are ccserve.attest.verify's, shared with the
router; this module adds where the evidence comes from and the client's memory of the log.

Only a VerifiedNode's `hpke_public_key` may be sealed to.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

import httpx

from ccserve.attest.checkpoint import Checkpoint
from ccserve.attest.errors import MalformedEvidence
from ccserve.attest.evidence import Evidence
from ccserve.attest.hardware import HardwareVerifier
from ccserve.attest.logclient import LogClient
from ccserve.attest.measure import Measurement
from ccserve.attest.note import Verifier
from ccserve.attest.verify import check_evidence, check_included, next_checkpoint
from ccserve.client.state import CheckpointStore

DEFAULT_MAX_AGE = 120.0
NONCE_LEN = 32


@dataclass(frozen=True)
class VerifiedNode:
    """A node that passed every check. Seal requests to `hpke_public_key` only."""

    url: str
    hpke_public_key: bytes
    signing_key: bytes
    measurement: Measurement
    root: str
    hardware_verified: tuple[str, ...]
    log_index: int
    checkpoint: Checkpoint


class NodeVerifier:
    """One client's verifier: the log it pinned, its saved checkpoints, what it requires of the evidence."""

    def __init__(self, log_url: str, log_key: str, state_dir: str, http: httpx.Client, *,
                 require_hardware: bool = False, hardware_verifiers: dict[str, HardwareVerifier] | None = None,
                 max_age: float = DEFAULT_MAX_AGE) -> None:
        self.log = LogClient(log_url, Verifier.parse(log_key), http)
        self.store = CheckpointStore(state_dir)
        self.require_hardware, self.hardware_verifiers = require_hardware, hardware_verifiers or {}
        self.max_age = max_age

    def verify(self, url: str, evidence: Evidence, nonce: bytes) -> VerifiedNode:
        """Check `evidence`, which the node at `url` gave in answer to `nonce` (however it travelled)."""
        kinds = check_evidence(evidence, nonce, self.max_age, self.require_hardware, self.hardware_verifiers)
        checkpoint = advance_checkpoint(self.log, self.store)
        index = check_included(self.log, evidence.measurement, checkpoint)
        return VerifiedNode(url.rstrip("/"), evidence.hpke_public_key, evidence.signing_key, evidence.measurement,
                            evidence.root, tuple(kinds), index, checkpoint)


def verify_node(url: str, log_url: str, state_dir: str, *, log_key: str, require_hardware: bool = False,
                hardware_verifiers: dict[str, HardwareVerifier] | None = None, max_age: float = DEFAULT_MAX_AGE,
                http: httpx.Client | None = None) -> VerifiedNode:
    """Fetch `url`'s evidence with a fresh nonce and verify it end to end against the log at `log_url`, whose
    verifier key `log_key` (name+keyid+base64) the caller pinned out of band. Raises a VerificationError subclass
    naming what failed: BadSignature, StaleEvidence, UnknownMeasurement, LogForked, LogRolledBack,
    HardwareRequired, MalformedEvidence."""
    own = http is None
    http = http or httpx.Client(timeout=30)
    try:
        verifier = NodeVerifier(log_url, log_key, state_dir, http, require_hardware=require_hardware,
                                hardware_verifiers=hardware_verifiers, max_age=max_age)
        nonce = secrets.token_bytes(NONCE_LEN)
        return verifier.verify(url, fetch_evidence(http, url, nonce), nonce)
    finally:
        if own:
            http.close()


def fetch_evidence(http: httpx.Client, url: str, nonce: bytes) -> Evidence:
    try:
        r = http.get(url.rstrip("/") + "/attestation", params={"nonce": nonce.hex()})
    except httpx.HTTPError as exc:
        raise MalformedEvidence(f"the node at {url} cannot be reached ({exc})") from None
    return parse_evidence_response(r.status_code, r.content, url)


def parse_evidence_response(status: int, content: bytes, where: str) -> Evidence:
    """Evidence from the body of an answer to GET /attestation; MalformedEvidence for anything else."""
    if status != 200:
        raise MalformedEvidence(f"the node at {where} answered {status} to /attestation: "
                                f"{content[:200].decode(errors='replace')}")
    try:
        doc = json.loads(content)
    except ValueError:
        raise MalformedEvidence(f"the node at {where} answered /attestation with something other than JSON") from None
    return Evidence.parse(doc)


def advance_checkpoint(log: LogClient, store: CheckpointStore) -> Checkpoint:
    """The log's current checkpoint, once proven to extend the one saved last (then saved in its place)."""
    with store.locked(log.verifier.name):
        old = store.load(log.verifier)
        new, signed = next_checkpoint(log, old)
        if old is None or new.size > old.size:
            store.save(log.verifier, signed)
        return new
