"""Log checkpoints in the C2SP tlog-checkpoint format (c2sp.org/tlog-checkpoint), inside a signed note:

    <origin>
    <tree size, decimal>
    <base64 RFC 6962 root hash>

    — <key name> base64(key ID || Ed25519 signature)

A checkpoint is the log's signed promise of its whole content at one size; a client that keeps the last one it
verified can demand proof that every later one extends it (consistency), which is what makes the log
append-only for that client.
"""
from __future__ import annotations

from dataclasses import dataclass

from ccserve.attest import note
from ccserve.attest.encoding import b64decode, b64encode
from ccserve.attest.errors import MalformedEvidence
from ccserve.attest.merkle import HASH_SIZE


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root_hash: bytes

    def text(self) -> str:
        return f"{self.origin}\n{self.size}\n{b64encode(self.root_hash)}\n"

    def sign(self, signer: note.Signer) -> str:
        """The signed note. The key name must be the origin, so a checkpoint cannot pass for another log's."""
        if signer.name != self.origin:
            raise ValueError(f"the log key is named {signer.name!r} but the log's origin is {self.origin!r}")
        return note.sign(self.text(), signer)

    @classmethod
    def parse_text(cls, text: str) -> Checkpoint:
        """From verified note text (extension lines, which we never write, are refused rather than ignored)."""
        lines = text.split("\n")
        if len(lines) != 4 or lines[3] != "":
            raise MalformedEvidence("a ccserve checkpoint is exactly three lines: origin, tree size, root hash")
        origin, size, root_b64 = lines[:3]
        if not origin or not size.isdigit() or (size != "0" and size.startswith("0")):
            raise MalformedEvidence(f"checkpoint origin {origin!r} or tree size {size!r} is malformed")
        try:
            root_hash = b64decode(root_b64, "the checkpoint's root hash")
        except ValueError as exc:
            raise MalformedEvidence(str(exc)) from None
        if len(root_hash) != HASH_SIZE:
            raise MalformedEvidence(f"the checkpoint's root hash is {len(root_hash)} bytes, not {HASH_SIZE}")
        return cls(origin, int(size), root_hash)


def open_checkpoint(signed: str, verifier: note.Verifier) -> Checkpoint:
    """The checkpoint in `signed`, after its signature verified under the pinned log key, whose name must be the
    checkpoint's origin. BadSignature or MalformedEvidence otherwise."""
    checkpoint = Checkpoint.parse_text(note.open_note(signed, [verifier]))
    if checkpoint.origin != verifier.name:
        raise MalformedEvidence(f"the checkpoint is for log {checkpoint.origin!r}, but the pinned key is for "
                                f"{verifier.name!r}")
    return checkpoint
