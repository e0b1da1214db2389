"""What a client remembers between runs: the last checkpoint it verified from each log, so that the next one must
extend it. Without this memory a log could show every client a different history (a fork) and none would know.

The state directory holds public data only (signed checkpoints); each file is re-verified with the pinned log
key when read, so a tampered state file is refused rather than trusted. A lock file per log serializes
clients sharing the directory: two that advance the checkpoint at once cannot lose one of the updates.
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from ccserve.attest.checkpoint import Checkpoint, open_checkpoint
from ccserve.attest.errors import VerificationError
from ccserve.attest.note import Verifier


class CheckpointStore:
    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir) / "checkpoints"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, origin: str) -> Path:
        return self.dir / (quote(origin, safe="") + ".note")

    @contextmanager
    def locked(self, origin: str) -> Iterator[None]:
        """Hold while reading, checking and saving a log's checkpoint."""
        with open(self._path(origin).with_suffix(".lock"), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def load(self, verifier: Verifier) -> Checkpoint | None:
        """The last checkpoint verified from the log `verifier` signs, or None on first contact."""
        path = self._path(verifier.name)
        if not path.is_file():
            return None
        try:
            return open_checkpoint(path.read_text(), verifier)
        except VerificationError as exc:
            raise VerificationError(f"the saved checkpoint {path} no longer verifies under the pinned log key "
                                    f"({exc}): the state directory was altered, or the pinned key changed") from None

    def save(self, verifier: Verifier, signed: str) -> None:
        path = self._path(verifier.name)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(signed)
        os.replace(tmp, path)
