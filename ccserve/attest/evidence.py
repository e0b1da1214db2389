"""The evidence format: what a node says about itself in answer to a verifier's nonce, and how its signature
and freshness are checked. Node and client both use this module, so the two can never disagree on the bytes.

    GET /attestation?nonce=<hex, 16..64 bytes>  ->  application/json

    {"payload":   base64(canonical JSON of the statement below),
     "signature": base64(Ed25519(signing key, "ccserve-evidence/v1\\n" || payload)),
     "hardware":  [hardware evidence items, each bound to the payload (see hardware.py)]}

    statement = {"format": "ccserve-evidence/v1", "nonce": hex, "timestamp": unix seconds,
                 "hpke": {"kem": 32, "kdf": 1, "aead": 1, "public_key": base64(X25519 public key)},
                 "signing_key": base64(Ed25519 public key),
                 "measurement": {the measurement record, see measure.py},
                 "root": "software" | "hardware", "hardware_kinds": ["tdx" | "sev-snp" | "nvidia-gpu", ...]}

What the signature proves: whoever holds the signing key binds that HPKE key to that measurement for that nonce.
Both keys are made fresh in memory at every node start, so with a `software` root nothing ties them to the code
that was measured: a modified node can claim any published measurement. Only a hardware root (a TEE quote or
GPU report over the same payload, checked by a verifier of its chain) makes the claim mean something; the
software root is said plainly so a client that needs more refuses it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ccserve.attest.encoding import b64decode, b64encode, canonical_json, hexdecode
from ccserve.attest.envelope import AEAD_ID, KDF_ID, KEM_ID
from ccserve.attest.errors import BadSignature, MalformedEvidence, StaleEvidence
from ccserve.attest.measure import Measurement

FORMAT = "ccserve-evidence/v1"
SIGNING_CONTEXT = FORMAT.encode() + b"\n"
MIN_NONCE, MAX_NONCE = 16, 64
SOFTWARE, HARDWARE = "software", "hardware"


def statement(nonce: bytes, hpke_public_key: bytes, signing_key: bytes, measurement: Measurement,
              hardware_kinds: list[str], now: float | None = None) -> bytes:
    """The canonical payload bytes a node signs (and binds into hardware reports)."""
    return canonical_json(dict(
        format=FORMAT, nonce=nonce.hex(), timestamp=int(time.time() if now is None else now),
        hpke=dict(kem=KEM_ID.value, kdf=KDF_ID.value, aead=AEAD_ID.value, public_key=b64encode(hpke_public_key)),
        signing_key=b64encode(signing_key), measurement=measurement.record(),
        root=HARDWARE if hardware_kinds else SOFTWARE, hardware_kinds=list(hardware_kinds)))


def parse_nonce(nonce_hex: str) -> bytes:
    """The verifier's nonce from the query string; ValueError saying what a valid one is."""
    try:
        nonce = hexdecode(nonce_hex, "the nonce")
    except ValueError:
        nonce = b""
    if not MIN_NONCE <= len(nonce) <= MAX_NONCE:
        raise ValueError(f"nonce must be {MIN_NONCE} to {MAX_NONCE} random bytes in hex (e.g. 64 hex digits)")
    return nonce


@dataclass(frozen=True)
class Evidence:
    """Parsed evidence; nothing in it is trusted until `check_signature` and the freshness checks pass."""

    payload: bytes
    signature: bytes
    hardware: list
    nonce: bytes
    timestamp: int
    hpke_public_key: bytes
    signing_key: bytes
    measurement: Measurement
    root: str
    hardware_kinds: list[str]

    @classmethod
    def parse(cls, doc: object) -> Evidence:
        """From the JSON a node served; MalformedEvidence naming the part that is wrong."""
        try:
            payload = b64decode(doc["payload"], "the evidence payload")
            signature = b64decode(doc["signature"], "the evidence signature")
            hardware = doc.get("hardware", [])
            s = json.loads(payload)
            if s["format"] != FORMAT:
                raise MalformedEvidence(f"evidence format {s['format']!r} is not {FORMAT}")
            hpke = s["hpke"]
            if (hpke["kem"], hpke["kdf"], hpke["aead"]) != (KEM_ID.value, KDF_ID.value, AEAD_ID.value):
                raise MalformedEvidence("the node's HPKE suite is not X25519 / HKDF-SHA256 / AES-128-GCM")
            ev = cls(payload=payload, signature=signature, hardware=list(hardware),
                     nonce=hexdecode(s["nonce"], "the evidence nonce"), timestamp=int(s["timestamp"]),
                     hpke_public_key=b64decode(hpke["public_key"], "the HPKE public key"),
                     signing_key=b64decode(s["signing_key"], "the signing key"),
                     measurement=Measurement.from_record(s["measurement"]), root=s["root"],
                     hardware_kinds=list(s["hardware_kinds"]))
        except MalformedEvidence:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MalformedEvidence(f"the node's answer is not {FORMAT} evidence ({exc}): is the URL a ccserve "
                                    "node started with attestation?") from None
        if ev.root not in (SOFTWARE, HARDWARE) or (ev.root == HARDWARE) != bool(ev.hardware_kinds):
            raise MalformedEvidence(f"evidence root {ev.root!r} does not match its hardware kinds {ev.hardware_kinds}")
        if len(ev.hpke_public_key) != 32 or len(ev.signing_key) != 32:
            raise MalformedEvidence("the node's HPKE or signing public key is not 32 bytes")
        return ev

    def check_signature(self) -> None:
        """BadSignature unless the payload is signed by the signing key it names."""
        try:
            Ed25519PublicKey.from_public_bytes(self.signing_key).verify(self.signature, SIGNING_CONTEXT + self.payload)
        except InvalidSignature:
            raise BadSignature("the evidence signature does not verify: the evidence was altered") from None

    def check_fresh(self, nonce: bytes, max_age: float, now: float | None = None, skew: float = 30) -> None:
        """StaleEvidence unless it answers exactly `nonce` and was made within `max_age` seconds (allowing `skew`
        seconds of clock difference into the future)."""
        if self.nonce != nonce:
            raise StaleEvidence("the evidence answers a different nonce: it is replayed, not made for this request")
        now = time.time() if now is None else now
        if self.timestamp > now + skew:
            raise StaleEvidence(f"the evidence is dated {self.timestamp - now:.0f} s in the future: check the "
                                "node's clock")
        if now - self.timestamp > max_age:
            raise StaleEvidence(f"the evidence is {now - self.timestamp:.0f} s old (limit {max_age:.0f} s)")


def signed_document(payload: bytes, signature: bytes, hardware: list[dict]) -> dict:
    return {"payload": b64encode(payload), "signature": b64encode(signature), "hardware": hardware}


def verify_node_signature(signing_key: bytes, context: str, message: bytes, signature: bytes) -> None:
    """Check a message an attested node signed with NodeIdentity.sign (health and capacity reports): BadSignature
    unless the key from verified evidence signed exactly `message` under `context`."""
    try:
        Ed25519PublicKey.from_public_bytes(signing_key).verify(signature, signing_context(context) + message)
    except (InvalidSignature, ValueError):
        raise BadSignature(f"the {context} signature does not verify under the node's attested key") from None


def signing_context(context: str) -> bytes:
    """The prefix of a node report signature: a context line, never the evidence format (domain separation)."""
    if not context or "\n" in context or context == FORMAT:
        raise ValueError("a signing context is a non-empty line other than the evidence format")
    return context.encode() + b"\n"
