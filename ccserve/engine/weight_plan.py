"""Which decoder layers stay on the GPU and which stream from host memory, given --gpu-weight-budget.

Why a plan of its own: the budget arithmetic decides memory on two machines (GPU and host) and is the one place a
user's number can be wrong, so it is a pure function with its own tests and one error message that says what
budget works. Everything else (embedding, LM head, norms, buffers) is always resident.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 1 << 30
RING_SLOTS = 2      # GPU buffers streamed layers rotate through: one computing, one arriving


@dataclass(frozen=True)
class StreamPlan:
    """streamed: indices of the decoder layers that live on the host, in layer order (spread evenly, so each
    transfer overlaps the compute of the layers before it); ring: GPU slots they rotate through."""

    streamed: tuple[int, ...]
    ring: int
    slot_bytes: int

    @property
    def streaming(self) -> bool:
        return bool(self.streamed)


def plan_stream(layer_bytes: list[int], resident_bytes: int, budget_gib: float, cc: bool) -> StreamPlan:
    """Keep as many decoder layers resident as the budget allows after the ring; stream the rest.

    The ring costs RING_SLOTS layer buffers, plus one more under cc: the channel's device-side copy of the
    ciphertext of the layer in flight. Raises ValueError naming --gpu-weight-budget and the smallest budget
    that works when not even the resident parts and the ring fit.
    """
    if budget_gib <= 0:
        raise ValueError(f"--gpu-weight-budget must be a positive number of GiB, got {budget_gib}")
    budget = int(budget_gib * GIB)
    n = len(layer_bytes)
    if resident_bytes + sum(layer_bytes) <= budget:
        return StreamPlan((), 0, 0)
    slot = _align(max(layer_bytes))
    ring_bytes = (RING_SLOTS + int(cc)) * slot
    if resident_bytes + ring_bytes > budget:
        raise ValueError(
            f"--gpu-weight-budget {budget_gib:g} GiB is too small: the embedding, LM head and norms take "
            f"{resident_bytes / GIB:.4g} GiB and the ring of streamed layers {ring_bytes / GIB:.4g} GiB "
            f"({RING_SLOTS} layer buffers{' plus the encrypted transfer in flight' if cc else ''}); pass at least "
            f"{_gib_up(resident_bytes + ring_bytes)} GiB, or {_gib_up(resident_bytes + sum(layer_bytes))} GiB "
            "to keep every layer on the GPU")
    room = budget - resident_bytes - ring_bytes
    resident_layers = 0
    for size in sorted(layer_bytes):
        if size > room:
            break
        room -= size
        resident_layers += 1
    s = n - resident_layers
    if s % RING_SLOTS and s < n:
        s += 1      # a multiple of the ring keeps the slot rotation in step across passes (no bubble at the wrap)
    streamed = tuple((j + 1) * n // s - 1 for j in range(s))
    return StreamPlan(streamed, min(RING_SLOTS, s), slot)


def _gib_up(nbytes: int) -> float:
    """Bytes as GiB with 4 significant digits, rounded up, so the number printed is a budget that works."""
    v = nbytes / GIB
    scale = 10 ** (3 - math.floor(math.log10(v)))
    return math.ceil(v * scale) / scale


def _align(nbytes: int, to: int = 256) -> int:
    return -(-nbytes // to) * to
