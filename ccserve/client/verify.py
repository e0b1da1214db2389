"""Verify a node before sending it anything: its evidence (signature, freshness, hardware), and that what it
measures is a release in the transparency log, seen through a log view consistent with every earlier one.

Order matters: the evidence is checked first (cheap, and it names the measurement), then the log's checkpoint
against the pinned key and against the checkpoint this client saved last (rollback, fork), then the inclusion
of the measurement under that checkpoint. Only then is the node's HPKE key returned, the one key requests may be
sealed to.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import httpx

from ccserve.attest import merkle
from ccserve.attest.checkpoint import Checkpoint
from ccserve.attest.errors import (HardwareRequired, InvalidProof, LogForked, LogRolledBack, MalformedEvidence,
                                   UnknownMeasurement)
from ccserve.attest.evidence import Evidence
from ccserve.attest.hardware import HardwareVerifier, verify_hardware
from ccserve.attest.measure import Measurement
from ccserve.attest.note import Verifier
from ccserve.client.logclient import LogClient
from ccserve.client.state import CheckpointStore

DEFAULT_MAX_AGE = 120.0


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
        verifier = Verifier.parse(log_key)
        nonce = secrets.token_bytes(32)
        evidence = fetch_evidence(http, url, nonce)
        evidence.check_signature()
        evidence.check_fresh(nonce, max_age)
        kinds = check_root(evidence, require_hardware, hardware_verifiers or {})
        log = LogClient(log_url, verifier, http)
        checkpoint = advance_checkpoint(log, CheckpointStore(state_dir))
        index = check_included(log, evidence.measurement, checkpoint)
        return VerifiedNode(url.rstrip("/"), evidence.hpke_public_key, evidence.signing_key, evidence.measurement,
                            evidence.root, tuple(kinds), index, checkpoint)
    finally:
        if own:
            http.close()


def fetch_evidence(http: httpx.Client, url: str, nonce: bytes) -> Evidence:
    try:
        r = http.get(url.rstrip("/") + "/attestation", params={"nonce": nonce.hex()})
    except httpx.HTTPError as exc:
        raise MalformedEvidence(f"the node at {url} cannot be reached ({exc})") from None
    if r.status_code != 200:
        raise MalformedEvidence(f"the node at {url} answered {r.status_code} to /attestation: {r.text[:200]}")
    try:
        doc = r.json()
    except ValueError:
        raise MalformedEvidence(f"the node at {url} answered /attestation with something other than JSON") from None
    return Evidence.parse(doc)


def check_root(evidence: Evidence, require_hardware: bool, verifiers: dict[str, HardwareVerifier]) -> list[str]:
    """The hardware kinds verified. With `require_hardware`, software evidence is refused, and so is hardware
    evidence unless every claimed kind was checked by a configured verifier."""
    if evidence.root == "software" or not evidence.hardware_kinds:
        if require_hardware:
            raise HardwareRequired("the node's evidence has a software root only (no TEE or GPU attestation): it "
                                   "proves nothing about the code that holds the key, and hardware is required")
        return []
    if sorted(i.get("kind") for i in evidence.hardware if isinstance(i, dict)) != sorted(evidence.hardware_kinds):
        raise MalformedEvidence("the hardware reports do not match the kinds the signed statement claims")
    kinds = verify_hardware(evidence.hardware, evidence.payload, verifiers)
    if require_hardware and sorted(kinds) != sorted(evidence.hardware_kinds):
        missing = sorted(set(evidence.hardware_kinds) - set(kinds))
        raise HardwareRequired(f"no verifier is configured for the node's {', '.join(missing)} evidence, so its "
                               "hardware signature chain cannot be checked: pass hardware_verifiers")
    return kinds


def advance_checkpoint(log: LogClient, store: CheckpointStore) -> Checkpoint:
    """The log's current checkpoint, once proven to extend the one saved last (then saved in its place)."""
    with store.locked(log.verifier.name):
        new, signed = log.checkpoint()
        old = store.load(log.verifier)
        if old is not None:
            check_consistent(log, old, new)
        if old is None or new.size > old.size:
            store.save(log.verifier, signed)
        return new


def check_consistent(log: LogClient, old: Checkpoint, new: Checkpoint) -> None:
    if new.size < old.size:
        raise LogRolledBack(f"log {new.origin} now shows {new.size} entries, but this client already verified "
                            f"{old.size}: an old view of the log is being replayed")
    if new.size == old.size:
        if new.root_hash != old.root_hash:
            raise LogForked(f"log {new.origin} shows two different trees of {new.size} entries: it forked")
        return
    if old.size == 0:
        return
    try:
        merkle.verify_consistency(old.size, new.size, old.root_hash, new.root_hash,
                                  log.consistency(old.size, new.size))
    except InvalidProof as exc:
        raise LogForked(f"log {new.origin} at {new.size} entries does not extend the {old.size} this client "
                        f"verified before ({exc}): an entry was dropped or rewritten") from None


def check_included(log: LogClient, measurement: Measurement, checkpoint: Checkpoint) -> int:
    """The log index of `measurement`, proven against `checkpoint`; UnknownMeasurement otherwise."""
    if checkpoint.size == 0:
        raise UnknownMeasurement(f"log {checkpoint.origin} is empty: no release has been published")
    index, proof = log.inclusion(measurement.leaf_hash, checkpoint.size)
    try:
        merkle.verify_inclusion(index, checkpoint.size, measurement.leaf_hash, proof, checkpoint.root_hash)
    except InvalidProof as exc:
        raise UnknownMeasurement(f"the log's inclusion proof for the node's measurement does not verify against "
                                 f"its signed checkpoint ({exc})") from None
    return index
