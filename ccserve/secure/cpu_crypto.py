"""AES-256-GCM on host threads: a message's chunks spread over a worker pool, urgent work first.

OpenSSL releases the GIL inside `encrypt_into`/`decrypt_into`, so Python threads scale with cores (no GIL-bound
loops: a job is one call per chunk). Jobs carry a priority: a transfer the engine is waiting for (urgent) runs
before speculative pre-encryption, which therefore never delays the critical path by more than one job.
"""
from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ccserve.kernels.aes_gcm import num_chunks, open_chunks, seal_chunks
from ccserve.secure.keys import SecretKey

JOB_BYTES = 1 << 20          # chunks per job: about this many bytes, so a job is ~0.1-0.2 ms of one core
INLINE_BYTES = 256 << 10     # messages this small are sealed on the calling thread (a hand-off costs more)


class WorkerPool:
    """Daemon threads serving a priority queue of jobs; lower priority value runs first, FIFO within one."""

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._workers = [threading.Thread(target=self._serve, daemon=True, name=f"ccserve-crypto-{i}")
                         for i in range(threads)]
        for w in self._workers:
            w.start()

    def submit(self, fn: Callable[[], object], urgent: bool) -> Future:
        fut: Future = Future()
        self._jobs.put((0 if urgent else 1, next(self._seq), fn, fut))
        return fut

    def _serve(self) -> None:
        while True:
            _, _, fn, fut = self._jobs.get()
            if fn is None:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except Exception as e:  # handed to the waiter, who re-raises
                fut.set_exception(e)

    def close(self) -> None:
        for _ in self._workers:
            self._jobs.put((2, next(self._seq), None, None))
        for w in self._workers:
            w.join()


def _job_ranges(nchunks: int, chunk_bytes: int, threads: int) -> list[range]:
    per = max(1, min(-(-nchunks // threads), -(-JOB_BYTES // chunk_bytes)))
    return [range(i, min(i + per, nchunks)) for i in range(0, nchunks, per)]


class CpuCipher:
    """One key's AES-256-GCM on the pool, over the chunked wire layout of `ccserve.kernels.aes_gcm`."""

    def __init__(self, key: SecretKey, pool: WorkerPool) -> None:
        self._aead: AESGCM | None = AESGCM(key.material())
        self.pool = pool

    @property
    def aead(self) -> AESGCM:
        if self._aead is None:
            raise RuntimeError("cipher was zeroized")
        return self._aead

    def seal_async(self, plain: np.ndarray, wire: np.ndarray, nbytes: int, chunk_bytes: int, lane: int,
                   counter: int, urgent: bool, cancel: threading.Event | None = None) -> list[Future]:
        """Queue sealing jobs; a job finding `cancel` set does nothing (its IVs stay burned, never reused)."""
        aead = self.aead

        def job(chunks: range) -> bool:
            if cancel is not None and cancel.is_set():
                return False
            seal_chunks(aead, plain, wire, nbytes, chunk_bytes, lane, counter, chunks)
            return True

        ranges = _job_ranges(num_chunks(nbytes, chunk_bytes), chunk_bytes, self.pool.threads)
        return [self.pool.submit(lambda r=r: job(r), urgent) for r in ranges]

    def seal(self, plain: np.ndarray, wire: np.ndarray, nbytes: int, chunk_bytes: int, lane: int,
             counter: int) -> None:
        """Seal now, on the critical path (inline when small, else urgent jobs on every thread)."""
        if nbytes <= INLINE_BYTES:
            seal_chunks(self.aead, plain, wire, nbytes, chunk_bytes, lane, counter,
                        range(num_chunks(nbytes, chunk_bytes)))
            return
        for f in self.seal_async(plain, wire, nbytes, chunk_bytes, lane, counter, urgent=True):
            f.result()

    def open(self, wire: np.ndarray, plain: np.ndarray, nbytes: int, chunk_bytes: int, lane: int,
             counter: int) -> bool:
        """Decrypt and verify; False if any chunk failed (failed chunks are zeroed)."""
        aead = self.aead
        ranges = _job_ranges(num_chunks(nbytes, chunk_bytes), chunk_bytes, self.pool.threads)
        if nbytes <= INLINE_BYTES:
            return all(all(open_chunks(aead, wire, plain, nbytes, chunk_bytes, lane, counter, r)) for r in ranges)
        futs = [self.pool.submit(lambda r=r: all(open_chunks(aead, wire, plain, nbytes, chunk_bytes, lane, counter,
                                                             r)), True) for r in ranges]
        results = [f.result() for f in futs]  # every job, not the first failure: none may still be writing
        return all(results)

    def zeroize(self) -> None:
        self._aead = None
