"""The transparency log of releases: an append-only RFC 6962 Merkle log in a directory the operator names.

It holds release metadata only (measurement records and the configs they hash), never request data. Layout:

    log.json          {"origin": ..., "vkey": ...}: the log's name and public key (public)
    entries.jsonl     one entry per line: the canonical-JSON bytes that are the Merkle leaves, in order
    checkpoint        the latest signed checkpoint (C2SP signed note)
    configs/<sha256>.json   the configuration documents that release measurements hash, by digest
    .lock             taken while appending, so two `ccserve release` runs cannot interleave

Appends write the entry (fsync) before the new checkpoint (written to a temporary file and renamed), so a crash
leaves at worst entries the checkpoint does not cover yet; the next append signs them. The signing key is not
here: `append` takes it, from the file the operator keeps it in.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ccserve.attest import merkle
from ccserve.attest.checkpoint import Checkpoint, open_checkpoint
from ccserve.attest.note import Signer, Verifier


class TransparencyLog:
    """One log directory. Readers call `refresh` to pick up entries another process appended."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        meta_path = self.dir / "log.json"
        if not meta_path.is_file():
            raise ValueError(f"{self.dir} is not a ccserve transparency log (no log.json): create one with "
                             "`ccserve log init`")
        meta = json.loads(meta_path.read_text())
        self.origin: str = meta["origin"]
        self.verifier = Verifier.parse(meta["vkey"])
        self._entries: list[bytes] = []
        self._leaves: list[bytes] = []
        self._index: dict[bytes, int] = {}
        self._read_bytes = 0
        self.refresh()

    @classmethod
    def create(cls, directory: str | Path, signer: Signer) -> TransparencyLog:
        """A new, empty log named after the signer's key, with its size-0 checkpoint signed."""
        path = Path(directory)
        if (path / "log.json").exists():
            raise ValueError(f"{path} already holds a transparency log; `ccserve release` appends to it")
        path.mkdir(parents=True, exist_ok=True)
        (path / "configs").mkdir(exist_ok=True)
        (path / "entries.jsonl").touch()
        _write_atomic(path / "log.json", json.dumps({"origin": signer.name, "vkey": signer.verifier.encode()},
                                                    indent=1) + "\n")
        _write_atomic(path / "checkpoint", Checkpoint(signer.name, 0, merkle.EMPTY_ROOT).sign(signer))
        return cls(path)

    # -- reading -----------------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Read entries appended since the last read (only whole lines: an append in progress is skipped)."""
        with open(self.dir / "entries.jsonl", "rb") as f:
            f.seek(self._read_bytes)
            data = f.read()
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            self._add(line)
        self._read_bytes += end

    def _add(self, entry: bytes) -> None:
        h = merkle.leaf_hash(entry)
        self._index.setdefault(h, len(self._entries))
        self._entries.append(entry)
        self._leaves.append(h)

    @property
    def size(self) -> int:
        """Entries on disk (may exceed the checkpoint's size for a moment while an append is in progress)."""
        return len(self._entries)

    def signed_checkpoint(self) -> str:
        return (self.dir / "checkpoint").read_text()

    def checkpoint(self) -> Checkpoint:
        return open_checkpoint(self.signed_checkpoint(), self.verifier)

    def entry(self, index: int) -> bytes:
        return self._entries[index]

    def entries(self, start: int, end: int) -> list[bytes]:
        return self._entries[start:end]

    def index_of(self, leaf_hash: bytes) -> int | None:
        return self._index.get(leaf_hash)

    def root(self, tree_size: int) -> bytes:
        self._check_size(tree_size)
        return merkle.root(self._leaves[:tree_size])

    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]:
        self._check_size(tree_size)
        return merkle.inclusion_proof(index, self._leaves[:tree_size])

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        self._check_size(new_size)
        return merkle.consistency_proof(old_size, self._leaves[:new_size])

    def _check_size(self, tree_size: int) -> None:
        if not 0 <= tree_size <= self.size:
            raise ValueError(f"tree size {tree_size} is outside this log's 0..{self.size} entries")

    def config(self, digest_hex: str) -> bytes | None:
        """A configuration document a release measurement hashes, by its SHA-256 (hex)."""
        if len(digest_hex) != 64 or any(c not in "0123456789abcdef" for c in digest_hex):
            return None
        path = self.dir / "configs" / f"{digest_hex}.json"
        return path.read_bytes() if path.is_file() else None

    def verify(self) -> Checkpoint:
        """Check the whole log: the checkpoint's signature, and that the entries on disk hash to its root. Returns
        the checkpoint; raises (BadSignature, MalformedEvidence, ValueError) naming what disagrees."""
        checkpoint = self.checkpoint()
        if checkpoint.size > self.size:
            raise ValueError(f"the checkpoint covers {checkpoint.size} entries but the log holds {self.size}")
        if self.root(checkpoint.size) != checkpoint.root_hash:
            raise ValueError("the entries on disk do not hash to the checkpoint's root: the log was altered")
        return checkpoint

    # -- appending ---------------------------------------------------------------------------------------------

    def append(self, entry: bytes, signer: Signer, config: bytes | None = None) -> tuple[int, str]:
        """Append one entry (and the config document it hashes, if any); returns (its index, the new signed
        checkpoint). An entry already in the log is refused with its index: the log holds each release once."""
        if signer.verifier.encode() != self.verifier.encode():
            raise ValueError(f"the signing key given is not this log's key ({self.verifier.encode()})")
        if b"\n" in entry:
            raise ValueError("a log entry is one line of canonical JSON; it may not contain a newline")
        with self._lock():
            self.refresh()
            existing = self.index_of(merkle.leaf_hash(entry))
            if existing is not None:
                raise ValueError(f"this measurement is already in the log at index {existing}")
            if config is not None:
                name = hashlib.sha256(config).hexdigest()
                _write_atomic(self.dir / "configs" / f"{name}.json", config.decode())
            with open(self.dir / "entries.jsonl", "ab") as f:
                f.write(entry + b"\n")
                f.flush()
                os.fsync(f.fileno())
            self.refresh()
            signed = Checkpoint(self.origin, self.size, self.root(self.size)).sign(signer)
            _write_atomic(self.dir / "checkpoint", signed)
            return self.size - 1, signed

    @contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
