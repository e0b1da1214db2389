"""C2SP signed notes (c2sp.org/signed-note) with Ed25519 signatures: the envelope our log checkpoints travel in.

A signed note is a text ending in a newline, a blank line, then lines `— <key name> base64(key ID || sig)`.
Key ID = SHA-256(name || 0x0A || 0x01 || Ed25519 public key)[:4]. Keys are written as Go's
golang.org/x/mod/sumdb/note writes them, so its tools (and other C2SP implementations) read ours:

    verifier key: <name>+<hex key ID>+base64(0x01 || 32-byte public key)
    signer key:   PRIVATE+KEY+<name>+<hex key ID>+base64(0x01 || 32-byte seed)

The signer key is the one secret `ccserve release` needs; it lives only where the operator puts it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, PublicFormat, NoEncryption

from ccserve.attest.encoding import b64decode, b64encode
from ccserve.attest.errors import BadSignature, MalformedEvidence

ED25519 = 0x01
SIG_PREFIX = "\u2014 "  # em dash, space
MAX_SIGNATURES = 100


def key_id(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([ED25519]) + public_key).digest()[:4]


def _check_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise ValueError(f"key name {name!r} must be non-empty, without spaces or '+'")


@dataclass(frozen=True)
class Verifier:
    """A pinned public key that signed notes are checked against."""

    name: str
    public_key: Ed25519PublicKey

    @property
    def raw(self) -> bytes:
        return self.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.raw)

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        """From `name+keyid+base64`; a ValueError says which part is wrong."""
        parts = vkey.strip().split("+", 2)  # base64 may itself contain "+"
        if len(parts) != 3:
            raise ValueError(f"verifier key {vkey!r} is not name+keyid+base64(0x01 || public key)")
        name, hex_id, b64 = parts
        _check_name(name)
        raw = b64decode(b64, "the verifier key's public key")
        if len(raw) != 33 or raw[0] != ED25519:
            raise ValueError(f"verifier key {vkey!r} is not an Ed25519 key (type byte 0x01 and 32 bytes)")
        if key_id(name, raw[1:]).hex() != hex_id:
            raise ValueError(f"verifier key {vkey!r} has key ID {hex_id}, which does not match its name and key")
        return cls(name, Ed25519PublicKey.from_public_bytes(raw[1:]))

    def encode(self) -> str:
        return f"{self.name}+{self.key_id.hex()}+{b64encode(bytes([ED25519]) + self.raw)}"


@dataclass(frozen=True)
class Signer:
    """A note-signing key (the log's). Never printed; `encode` is for writing it to the operator's key file."""

    name: str
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls, name: str) -> Signer:
        _check_name(name)
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def parse(cls, skey: str) -> Signer:
        parts = skey.strip().split("+", 4)  # base64 may itself contain "+"
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise ValueError("the signer key is not PRIVATE+KEY+name+keyid+base64(0x01 || seed)")
        name, hex_id, b64 = parts[2:]
        _check_name(name)
        raw = b64decode(b64, "the signer key's seed")
        if len(raw) != 33 or raw[0] != ED25519:
            raise ValueError("the signer key is not an Ed25519 key (type byte 0x01 and a 32-byte seed)")
        signer = cls(name, Ed25519PrivateKey.from_private_bytes(raw[1:]))
        if signer.verifier.key_id.hex() != hex_id:
            raise ValueError("the signer key's key ID does not match its name and key")
        return signer

    @property
    def verifier(self) -> Verifier:
        return Verifier(self.name, self.private_key.public_key())

    def encode(self) -> str:
        seed = self.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return f"PRIVATE+KEY+{self.name}+{self.verifier.key_id.hex()}+{b64encode(bytes([ED25519]) + seed)}"

    def __repr__(self) -> str:
        return f"Signer({self.name!r}, <private>)"


def sign(text: str, signer: Signer) -> str:
    """The signed note of `text` (which must end in a newline) under one key."""
    _check_text(text)
    sig = signer.private_key.sign(text.encode())
    return f"{text}\n{SIG_PREFIX}{signer.name} {b64encode(signer.verifier.key_id + sig)}\n"


def open_note(note: str, verifiers: list[Verifier]) -> str:
    """The verified text of `note`. BadSignature unless a known key signed it and no known key's signature
    fails; signatures from unknown keys are ignored, as the spec requires (they may be witnesses')."""
    text, sig_lines = _split(note)
    known = {(v.name, v.key_id): v for v in verifiers}
    verified = False
    for line in sig_lines:
        name, blob = line[len(SIG_PREFIX):].split(" ", 1)
        raw = b64decode(blob, f"the signature by {name!r}")
        if len(raw) < 4:
            raise MalformedEvidence(f"the signature by {name!r} is too short to hold a key ID")
        v = known.get((name, raw[:4]))
        if v is None:
            continue
        try:
            v.public_key.verify(raw[4:], text.encode())
        except InvalidSignature:
            raise BadSignature(f"the signature by {name} does not verify: the note was altered") from None
        verified = True
    if not verified:
        names = ", ".join(sorted({v.name for v in verifiers})) or "none"
        raise BadSignature(f"the note carries no signature by a pinned key (pinned: {names})")
    return text


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise ValueError("a note's text must end in a newline")
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise ValueError("a note's text may contain no control characters other than newline")


def _split(note: str) -> tuple[str, list[str]]:
    """(text, signature lines) of a note; MalformedEvidence when it is not the C2SP shape."""
    if not note.endswith("\n") or any(ord(c) < 0x20 and c != "\n" for c in note):
        raise MalformedEvidence("a signed note must end in a newline and contain no other control characters")
    cut = note.rfind("\n\n")
    if cut < 0:
        raise MalformedEvidence("the note has no blank line before its signatures")
    text, sigs = note[:cut + 1], note[cut + 2:]
    lines = sigs.splitlines()
    if not lines or len(lines) > MAX_SIGNATURES:
        raise MalformedEvidence(f"a signed note needs 1 to {MAX_SIGNATURES} signature lines, has {len(lines)}")
    for line in lines:
        if not line.startswith(SIG_PREFIX) or len(line[len(SIG_PREFIX):].split(" ")) != 2:
            raise MalformedEvidence(f"{line[:60]!r} is not a signature line ('— <name> <base64>')")
    return text, lines
