"""The checks a verifier runs on a node's evidence and on the transparency log, shared by the client SDK (before it
seals a request to a node) and the router (before it counts a node as attested), so the two can never disagree.

Order matters: the evidence is checked first (cheap, and it names the measurement), then the log's checkpoint
against the pinned key and against the last one this verifier saw (rollback, fork), then the inclusion of the
measurement under that checkpoint. Each check raises its own VerificationError subclass, naming what failed.
"""
from __future__ import annotations

from ccserve.attest import merkle
from ccserve.attest.checkpoint import Checkpoint
from ccserve.attest.errors import (HardwareRequired, InvalidProof, LogForked, LogRolledBack, MalformedEvidence,
                                   UnknownMeasurement)
from ccserve.attest.evidence import Evidence
from ccserve.attest.hardware import HardwareVerifier, verify_hardware
from ccserve.attest.logclient import LogClient
from ccserve.attest.measure import Measurement


def check_evidence(evidence: Evidence, nonce: bytes, max_age: float, require_hardware: bool = False,
                   verifiers: dict[str, HardwareVerifier] | None = None) -> list[str]:
    """Signature, freshness (it answers `nonce`, made within `max_age` s) and root of trust; returns the hardware
    kinds whose chains a verifier accepted."""
    evidence.check_signature()
    evidence.check_fresh(nonce, max_age)
    return check_root(evidence, require_hardware, verifiers or {})


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


def next_checkpoint(log: LogClient, last: Checkpoint | None) -> tuple[Checkpoint, str]:
    """The log's current checkpoint (and its signed text), proven to extend `last`, the one this verifier saw
    before (None on first contact)."""
    new, signed = log.checkpoint()
    if last is not None:
        check_consistent(log, last, new)
    return new, signed


def check_consistent(log: LogClient, old: Checkpoint, new: Checkpoint) -> None:
    if new.size < old.size:
        raise LogRolledBack(f"log {new.origin} now shows {new.size} entries, but this verifier already saw "
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
        raise LogForked(f"log {new.origin} at {new.size} entries does not extend the {old.size} this verifier "
                        f"saw before ({exc}): an entry was dropped or rewritten") from None


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
