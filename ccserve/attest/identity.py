"""A node's identity: an HPKE key pair (X25519) and an Ed25519 signing key made in memory at start, never
written anywhere, plus the measurement of what the node runs and the hardware roots the machine has.

Why fresh keys per start: a key that never leaves process memory cannot be copied off the disk by whoever runs
the machine, and a restart (a new release, a new config) gets a new identity that must be attested again.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ccserve.attest import evidence as ev
from ccserve.attest.envelope import ResponseSealer, key_id, open_request
from ccserve.attest.hardware import ConfigfsTsm, NvidiaGpu, detect_roots
from ccserve.attest.measure import Measurement, measure


class NodeIdentity:
    """Keys, measurement and hardware roots of one running node. Not picklable, and its repr shows no key."""

    def __init__(self, measurement: Measurement, roots: Sequence[ConfigfsTsm | NvidiaGpu] = ()) -> None:
        self.measurement = measurement
        self.roots = list(roots)
        self._hpke = X25519PrivateKey.generate()
        self._signing = Ed25519PrivateKey.generate()
        self.hpke_public_key = self._hpke.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.signing_public_key = self._signing.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def create(cls, config: dict, model_dir: str | Path, progress: bool = True) -> NodeIdentity:
        """Measure this installation (code, `config`, the weights in `model_dir`), detect hardware roots, make
        keys. `config` must be the dict `ccserve release` measured (see measure.measurement_config)."""
        return cls(measure(config, model_dir, progress), detect_roots())

    @property
    def key_id(self) -> bytes:
        """The 8 bytes sealed requests name this node's HPKE key by."""
        return key_id(self.hpke_public_key)

    @property
    def root(self) -> str:
        return ev.HARDWARE if self.roots else ev.SOFTWARE

    def evidence(self, nonce: bytes, now: float | None = None) -> dict:
        """Fresh evidence answering `nonce`: the signed statement and a report from every hardware root."""
        kinds = [r.kind for r in self.roots]
        payload = ev.statement(nonce, self.hpke_public_key, self.signing_public_key, self.measurement, kinds, now)
        items = [r.collect(payload) for r in self.roots]
        return ev.signed_document(payload, self._signing.sign(ev.SIGNING_CONTEXT + payload), items)

    def open_request(self, request: bytes) -> tuple[bytes, ResponseSealer]:
        """Decrypt a sealed request addressed to this node; the sealer encrypts its response."""
        return open_request(self._hpke, request)

    def sign(self, context: str, message: bytes) -> bytes:
        """Sign a node report (health, capacity) under a context line, checkable with
        evidence.verify_node_signature against the attested signing key."""
        return self._signing.sign(ev.signing_context(context) + message)

    def __repr__(self) -> str:
        return f"NodeIdentity(key_id={self.key_id.hex()}, root={self.root}, measurement={self.measurement.digest[:16]})"

    def __reduce__(self):
        raise TypeError("NodeIdentity cannot be pickled: its keys never leave process memory")


def answer_attestation(identity: NodeIdentity, nonce_hex: str | None) -> tuple[int, dict]:
    """Framework-neutral handler of `GET /attestation?nonce=HEX`: (HTTP status, JSON body)."""
    try:
        nonce = ev.parse_nonce(nonce_hex or "")
    except ValueError as exc:
        return 400, _error(str(exc), "invalid_request_error", "bad_nonce")
    try:
        return 200, identity.evidence(nonce)
    except Exception as exc:  # a hardware root that fails now must not turn into software evidence
        return 503, _error(f"a hardware root failed to report ({type(exc).__name__}); try again or restart the node",
                           "server_error", "attestation_unavailable")


def _error(message: str, kind: str, code: str) -> dict:
    """The server's OpenAI-style error body."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
