"""Has a source buffer changed since it was pre-encrypted? A stamp taken before sealing, compared at use.

Two ways, chosen per channel:
- "version" (default, O(1)): torch bumps a tensor's version counter on every in-place write through torch (copy_,
  out=, indexing assignment, in-place ops), shared with its views. Stamp = (data pointer, size, version). Writes
  that bypass torch (a numpy view, raw pointers) are not seen; inference-mode tensors have no counter and are
  refused with a message.
- "hash" (O(n)): a 64-bit sum and xor over the bytes. It sees every write path, but costs a full read of the source
  on the critical path (docs/secure.md has the measured rate); it guards against engine bugs, not attackers: the
  source lives in trusted memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

VALIDATIONS = ("version", "hash")


@dataclass(frozen=True)
class Stamp:
    ptr: int
    nbytes: int
    mark: int | tuple[int, int]


def checksum(t: torch.Tensor) -> tuple[int, int]:
    """(sum, xor) of the bytes as little-endian uint64 words, the tail zero-padded; numpy releases the GIL."""
    flat = t.detach().reshape(-1).view(torch.uint8).numpy()
    whole = flat.size // 8 * 8
    words = flat[:whole].view(np.uint64)
    tail = int.from_bytes(flat[whole:].tobytes(), "little")
    return int(words.sum(dtype=np.uint64)) + tail, int(np.bitwise_xor.reduce(words) if words.size else 0) ^ tail


def stamp(t: torch.Tensor, validation: str) -> Stamp:
    if validation == "version":
        if t.is_inference():
            raise ValueError("inference-mode tensors have no version counter: create host buffers outside "
                             "torch.inference_mode(), or use validation='hash'")
        return Stamp(t.data_ptr(), t.nbytes, t._version)
    if validation == "hash":
        return Stamp(t.data_ptr(), t.nbytes, checksum(t))
    raise ValueError(f"validation must be one of {VALIDATIONS}, got {validation!r}")
