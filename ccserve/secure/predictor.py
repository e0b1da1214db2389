"""What will cross the boundary next? Predictors for the patterns LLM serving has, behind one interface.

The engine feeds hints (what it knows: the layer order, a block it swapped out, the adapter schedule); the channel
reports every transfer it makes (`observe`) and asks for the next keys (`predict`). Keys are any hashable naming a
transfer: the channel's default is (host data pointer, byte size), as PipeLLM keys on (pointer, size).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class Cycle:
    """Transfers repeat in this order (weights streamed layer by layer, every step)."""
    keys: tuple


@dataclass(frozen=True)
class SwapOut:
    """This key left the GPU and will come back, in FIFO order with other swapped-out keys (KV preemption)."""
    key: Hashable


@dataclass(frozen=True)
class Schedule:
    """These transfers come next, in this order (adapters of the next batches); replaces the previous schedule."""
    keys: tuple


@dataclass(frozen=True)
class Forget:
    """This key will not be transferred again (its owner ended, the block was freed)."""
    key: Hashable


Hint = Cycle | SwapOut | Schedule | Forget


class Predictor:
    """The interface. Subclasses override what they use; unknown hints are ignored, so any mix can be fed."""

    def observe(self, key: Hashable) -> None:
        """A transfer of `key` just happened."""

    def hint(self, hint: Hint) -> None:
        """The engine's knowledge about upcoming transfers."""

    def predict(self, n: int) -> list:
        """Up to n keys expected next, soonest first."""
        return []


class CyclicPredictor(Predictor):
    """Weight streaming: the layer order repeats. Learns the period when no Cycle hint is given.

    Learning as PipeLLM does: once the latest `period` keys equal the `period` before them, that is the cycle.
    A key outside the cycle, or out of turn, re-synchronizes to where it sits in the cycle.
    """

    def __init__(self, max_period: int = 4096) -> None:
        self.max_period = max_period
        self.cycle: list = []
        self.pos = 0
        self._history: deque = deque(maxlen=2 * max_period)

    def hint(self, hint: Hint) -> None:
        if isinstance(hint, Cycle):
            self.cycle, self.pos = list(hint.keys), 0

    def observe(self, key: Hashable) -> None:
        self._history.append(key)
        if self.cycle and self.cycle[self.pos % len(self.cycle)] == key:
            self.pos = (self.pos + 1) % len(self.cycle)
        elif key in self.cycle:
            self.pos = (self.cycle.index(key) + 1) % len(self.cycle)
        else:
            self._learn()

    def _learn(self) -> None:
        h = list(self._history)
        for p in range(1, min(self.max_period, len(h) // 2) + 1):
            if h[-1 - p] == h[-1] and h[-p:] == h[-2 * p:-p]:
                self.cycle, self.pos = h[-p:], 0
                return
        self.cycle = []

    def predict(self, n: int) -> list:
        if not self.cycle:
            return []
        return [self.cycle[(self.pos + i) % len(self.cycle)] for i in range(min(n, len(self.cycle)))]


class FifoPredictor(Predictor):
    """KV swapping: blocks come back in the order they left (vLLM swaps in its oldest preempted request first)."""

    def __init__(self) -> None:
        self.queue: deque = deque()

    def hint(self, hint: Hint) -> None:
        if isinstance(hint, SwapOut):
            self._drop(hint.key)
            self.queue.append(hint.key)
        elif isinstance(hint, Forget):
            self._drop(hint.key)

    def observe(self, key: Hashable) -> None:
        self._drop(key)

    def _drop(self, key: Hashable) -> None:
        try:
            self.queue.remove(key)
        except ValueError:
            pass

    def predict(self, n: int) -> list:
        return [self.queue[i] for i in range(min(n, len(self.queue)))]


class SchedulePredictor(Predictor):
    """Multi-LoRA: the scheduler knows which adapters the next batches load; transfers consume the schedule."""

    def __init__(self) -> None:
        self.upcoming: deque = deque()

    def hint(self, hint: Hint) -> None:
        if isinstance(hint, Schedule):
            self.upcoming = deque(hint.keys)
        elif isinstance(hint, Forget):
            self.upcoming = deque(k for k in self.upcoming if k != hint.key)

    def observe(self, key: Hashable) -> None:
        if key in self.upcoming:
            while self.upcoming.popleft() != key:
                pass

    def predict(self, n: int) -> list:
        return [self.upcoming[i] for i in range(min(n, len(self.upcoming)))]
