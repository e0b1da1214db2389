"""Why a node, a log or a sealed message was refused. One class per way verification fails, so a client can
tell an attack (a forked log) from a misconfiguration (no hardware verifier) and the operator can act on it.

Every error means the same thing to a caller: do not send request data to this node.
"""
from __future__ import annotations


class VerificationError(Exception):
    """A node, its evidence, the transparency log or a sealed message could not be verified."""


class MalformedEvidence(VerificationError):
    """Evidence, a checkpoint or a proof that does not parse: a wrong URL, an old or foreign server."""


class BadSignature(VerificationError):
    """A signature does not verify: the evidence or the log checkpoint was altered, or the key is not the one
    pinned."""


class UnknownMeasurement(VerificationError):
    """The node runs code, config or weights whose measurement the transparency log does not contain (or whose
    inclusion proof does not verify): it runs an unpublished release."""


class StaleEvidence(VerificationError):
    """The evidence does not answer this verifier's fresh nonce, or is too old: it is replayed or cached."""


class LogInconsistent(VerificationError):
    """The log presented a view that contradicts one this client saw before."""


class LogForked(LogInconsistent):
    """The log's new checkpoint is not an append-only extension of the last one seen (an entry was dropped or
    rewritten, or different clients are shown different logs)."""


class LogRolledBack(LogInconsistent):
    """The log's checkpoint is smaller than the last one this client verified: an older view is being replayed."""


class HardwareRequired(VerificationError):
    """The verifier requires a hardware root of trust, and the evidence has only a software root (or hardware
    evidence that no configured verifier can check)."""


class InvalidProof(VerificationError):
    """A Merkle inclusion or consistency proof does not verify against the given roots."""


class SealedMessageError(VerificationError):
    """A sealed (HPKE) request or response failed to open: altered, reordered, dropped, truncated or addressed to
    another key."""
