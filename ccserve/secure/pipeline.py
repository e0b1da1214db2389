"""Speculative pipelined encryption: predicted H2D transfers are sealed ahead, on worker threads, in IV order.

Each speculation reserves the IVs it will be sent with on the speculative lane (from the lane's IVSequence) when it
is planned, so the ciphertext is final the moment its jobs finish. At use, `claim` checks that the transfer is the
one predicted and that its source is unchanged since sealing began (a stamp, see stamp.py); then the channel sends
the ready ciphertext, jumping the receiver's cursor over any IVs burned before it.

Relinquishing (a speculation bypassed because a later one was claimed first, or found stale, or forgotten):
- "skip" (default): cancel its unstarted jobs and burn its IVs; the receiver cursor jumps over them with one
  trusted command. O(1), and no IV is ever used twice.
- "drain": finish sealing it and deliver it to a sink so the receiver consumes its IVs in order: what a protocol
  without a skip command must do (PipeLLM fills gaps with NOP copies; with pre-sealed IVs those would reuse IVs).
  It costs the bypassed bytes in CPU, PCIe and GPU time; kept to measure that cost against "skip".
Transfers that were not predicted at all never disturb this lane: they go on the direct lane (see channel.py).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ccserve.kernels.aes_gcm import alloc_wire, num_chunks
from ccserve.secure.cpu_crypto import CpuCipher
from ccserve.secure.iv import IVSequence
from ccserve.secure.stamp import Stamp, stamp

RELINQUISH = ("skip", "drain")


@dataclass
class Speculation:
    """One pre-sealed transfer. Holds its source, so the stamped pointer cannot be freed and reused meanwhile."""

    key: Hashable
    src: torch.Tensor
    wire: torch.Tensor
    counter: int
    cancel: threading.Event
    stamp: Stamp | None = None
    jobs: list[Future] | Future = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.src.nbytes

    def wait(self) -> bool:
        """Block until sealed; False if jobs were cancelled (the ciphertext is incomplete)."""
        jobs = self.jobs.result() if isinstance(self.jobs, Future) else self.jobs
        results = [f.result() for f in jobs]  # every job: none may still be writing into the wire
        return all(results)


@dataclass
class PipelineStats:
    speculated: int = 0         # predicted transfers sealed ahead (started)
    hits: int = 0
    misses: int = 0
    stale: int = 0
    relinquished: int = 0
    relinquished_bytes: int = 0
    wait_s: float = 0.0         # critical-path time spent waiting for a claimed speculation to finish sealing


class Pipeline:
    """The speculation queue of one channel: pending speculations in IV order, plus burned ones still to drain."""

    def __init__(self, cipher: CpuCipher, ivs: IVSequence, chunk_bytes: int, budget_bytes: int, validation: str,
                 relinquish: str, pin: bool) -> None:
        if relinquish not in RELINQUISH:
            raise ValueError(f"relinquish must be one of {RELINQUISH}, got {relinquish!r}")
        if budget_bytes < 1:
            raise ValueError(f"budget_bytes must be >= 1, got {budget_bytes}")
        self.cipher, self.ivs, self.chunk_bytes = cipher, ivs, chunk_bytes
        self.budget_bytes, self.validation, self.relinquish, self.pin = budget_bytes, validation, relinquish, pin
        self.pending: OrderedDict[Hashable, Speculation] = OrderedDict()
        self.burned: list[Speculation] = []
        self.stats = PipelineStats()

    @property
    def inflight_bytes(self) -> int:
        return sum(s.nbytes for s in self.pending.values()) + sum(s.nbytes for s in self.burned)

    def plan(self, wanted: Iterable[tuple[Hashable, torch.Tensor]]) -> None:
        """Start sealing predicted transfers (soonest first) that are not pending yet, within the byte budget."""
        for key, src in wanted:
            if key in self.pending or src.nbytes == 0:
                continue
            if (self.pending or self.burned) and self.inflight_bytes + src.nbytes > self.budget_bytes:
                return
            self.pending[key] = self._start(key, src)
            self.stats.speculated += 1

    def _start(self, key: Hashable, src: torch.Tensor) -> Speculation:
        nbytes = src.nbytes
        spec = Speculation(key, src, alloc_wire(nbytes, self.chunk_bytes, "cpu", self.pin),
                           self.ivs.take(num_chunks(nbytes, self.chunk_bytes)), threading.Event())
        plain = src.detach().reshape(-1).view(torch.uint8).numpy()

        def seal() -> list[Future]:
            return self.cipher.seal_async(plain, spec.wire.numpy(), nbytes, self.chunk_bytes, self.ivs.lane,
                                          spec.counter, urgent=False, cancel=spec.cancel)

        if self.validation == "version":
            spec.stamp = stamp(src, "version")
            spec.jobs = seal()
        else:  # the checksum must be read before any chunk is, so sealing jobs start from the checksum job
            def checksum_then_seal() -> list[Future]:
                spec.stamp = stamp(src, "hash")
                return seal()
            spec.jobs = self.cipher.pool.submit(checksum_then_seal, urgent=False)
        return spec

    def claim(self, key: Hashable, src: torch.Tensor) -> Speculation | None:
        """The sealed speculation for this transfer, if predicted and still valid; None means seal it directly.

        Speculations planned before it were bypassed (the prediction skipped them) and are relinquished.
        """
        if key not in self.pending:
            self.stats.misses += 1
            return None
        while True:
            spec = self.pending.popitem(last=False)[1]
            if spec.key == key:
                break
            self._retire(spec)
        t0 = time.perf_counter()
        sealed = spec.wait()
        self.stats.wait_s += time.perf_counter() - t0
        if not sealed or spec.src is not src or stamp(src, self.validation) != spec.stamp:
            self.stats.stale += 1
            self._retire(spec)
            return None
        self.stats.hits += 1
        return spec

    def discard(self, key: Hashable) -> None:
        """The engine says this key will not come: relinquish its speculation now, freeing budget."""
        spec = self.pending.pop(key, None)
        if spec is not None:
            self._retire(spec)

    def _retire(self, spec: Speculation) -> None:
        self.stats.relinquished += 1
        self.stats.relinquished_bytes += spec.nbytes
        if self.relinquish == "skip":
            spec.cancel.set()
        else:
            self.burned.append(spec)

    def take_burned(self, before: int) -> list[Speculation]:
        """Relinquished speculations to deliver ("drain") ahead of the one sealed at counter `before`, in IV order."""
        due = sorted((s for s in self.burned if s.counter < before), key=lambda s: s.counter)
        self.burned = [s for s in self.burned if s.counter >= before]
        return due

    def close(self) -> None:
        for spec in list(self.pending.values()) + self.burned:
            spec.cancel.set()
        self.pending.clear()
        self.burned = []
