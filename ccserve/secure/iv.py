"""96-bit GCM IVs: a 32-bit lane field and a 64-bit counter, handed out once and accepted in lock-step.

The sender takes fresh counters from an IVSequence, which only moves forward, so no IV is ever used twice under a
key, whatever happens to the ciphertext made with it. The receiver does not read IVs from the wire: it decrypts
with the next counter of its own IVCursor, so a replayed, reordered or dropped message fails authentication.
Jumping a cursor forward (over IVs burned by a relinquished speculation) is a trusted command from the host, never
something the wire can cause.
"""
from __future__ import annotations

import threading
from enum import IntEnum

COUNTER_LIMIT = 1 << 64


class Lane(IntEnum):
    """Independent IV spaces: direct H2D transfers, speculative (pre-encrypted) H2D transfers, D2H, host storage,
    tensor-parallel links."""

    H2D_DIRECT = 0x48320001
    H2D_SPECULATIVE = 0x48320002
    D2H = 0x44480001
    HOST_STORE = 0x53540001
    TP_LINK = 0x54500001    # GPU-to-GPU messages of a tensor-parallel group (each directed link has its own key)


class IVSequence:
    """Sender side: hands out counter ranges that were never handed out before."""

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self._next = 0
        self._lock = threading.Lock()

    @property
    def next(self) -> int:
        return self._next

    def take(self, n: int) -> int:
        """Reserve n consecutive counters; returns the first."""
        if n < 1:
            raise ValueError(f"take needs n >= 1, got {n}")
        with self._lock:
            start = self._next
            if start + n > COUNTER_LIMIT:
                raise RuntimeError(f"IV space of lane {self.lane.name} exhausted: rotate the session key")
            self._next = start + n
            return start


class IVCursor:
    """Receiver side: the counter the next message on this lane must have been sealed with."""

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.expected = 0

    def accept(self, n: int) -> int:
        """The counters the receiver uses for the next n-chunk message; they are consumed even if it fails."""
        start = self.expected
        self.expected = start + n
        return start

    def skip_to(self, counter: int) -> None:
        """Jump forward over burned counters (trusted host command); moving back would allow replays."""
        if counter < self.expected:
            raise ValueError(f"IV cursor of lane {self.lane.name} may only move forward ({counter} < {self.expected})")
        self.expected = counter
