"""Rank 0's side of a tensor-parallel group: start ranks 1..N-1, hand them every step, watch them, end them.

The engine's process is rank 0: its own ModelRunner samples where the scheduler needs the tokens. The other ranks
are spawned processes (engine/tp_worker.py), one per GPU, each reading commands from a pipe. Commands are pickled
host arrays (a step's token ids, positions, slots, block tables, sampling settings), a few kilobytes per step.

Lifetime: a monitor thread waits on the workers' exit sentinels. A worker that exits while the group is in use
makes the group lost: the failure names the rank and its exit code, the other workers are terminated (SIGTERM,
then SIGKILL after a grace period), rank 0's NCCL communicators are aborted, and every later command raises
WorkerExited, so that the engine fails its requests with that sentence instead of hanging. Why the abort: a gloo
collective fails at once when a peer's connection drops, but an NCCL collective whose peer died spins on the GPU
until the watchdog's timeout (10 minutes) kills the whole process; aborting the communicator ends it now, as an
error the engine's step raises. Workers also end by themselves when this process dies
(tp_worker.die_with_parent, EOF on the pipe), and `close` (or garbage collection, or interpreter exit) ends them.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import tempfile
import threading
import weakref
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch.distributed as dist

from ccserve.config import EngineConfig
from ccserve.distributed.env import disable_multicast
from ccserve.distributed.group import TensorParallelGroup, destroy_tensor_parallel
from ccserve.distributed.sealed import SealedTensorParallelGroup
from ccserve.engine.tp_worker import STARTED, join_group, run_worker

logger = logging.getLogger(__name__)

TERMINATE_GRACE_S = 5.0


class WorkerExited(RuntimeError):
    """A rank of the tensor-parallel group is gone: the group cannot compute any more steps."""


class WorkerGroup:
    """Ranks 1..N-1 of the group, and rank 0's membership in it (`tp`)."""

    def __init__(self, config: EngineConfig) -> None:
        """Start the workers, wait until each runs, then join the group as rank 0 (which returns once all have
        joined). A worker that dies while starting fails this call with its rank and exit code."""
        size = config.tensor_parallel_size
        disable_multicast()  # children inherit the environment: multicast is off before their first import
        self._rendezvous = tempfile.TemporaryDirectory(prefix="ccserve-tp-")
        init_method = (Path(self._rendezvous.name) / "rendezvous").as_uri()
        self.failure: str | None = None
        self._closing = False
        self._ending = threading.Event()   # set before workers are ended on purpose: their exits are no failure
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        ctx = mp.get_context("spawn")
        harden = _is_hardened()
        for rank in range(1, size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=run_worker, name=f"ccserve-tp-rank{rank}", daemon=True,
                               args=(rank, size, init_method, config, theirs, os.getpid(), harden))
            proc.start()
            theirs.close()  # the worker holds the only other end: its death shows here as EOF
            self.procs.append(proc)
            self.conns.append(ours)
        self._finalizer = weakref.finalize(self, _end, list(self.procs), self._ending)
        try:
            self._wait_started()
            self.tp: TensorParallelGroup | SealedTensorParallelGroup = join_group(0, size, init_method, config)
        except BaseException:
            self._finalizer()
            raise
        self._monitor = threading.Thread(target=self._watch, name="ccserve-tp-monitor", daemon=True)
        self._monitor.start()

    @property
    def alive(self) -> bool:
        return self.failure is None and not self._closing

    def send(self, command: tuple) -> None:
        """Hand a command to every worker (they run it in order with rank 0); raises WorkerExited when the group
        is lost."""
        if self.failure is not None:
            raise WorkerExited(self.failure)
        data = pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for conn in self.conns:
                conn.send_bytes(data)
        except OSError as exc:  # a worker's end closed: it is exiting, the monitor is about to say how
            raise WorkerExited(self.lost_reason() or "a tensor-parallel worker closed its pipe") from exc

    def lost_reason(self) -> str | None:
        """Why the group is lost (waiting a moment for the monitor to record a worker that has exited), or None
        while every worker runs."""
        if self.failure is None and wait([p.sentinel for p in self.procs], timeout=0):
            self._monitor.join(TERMINATE_GRACE_S)
        return self.failure

    def lose(self, reason: str) -> None:
        """End a group that can no longer step (a rank failed): later commands raise WorkerExited(reason)."""
        if self.failure is None:
            self.failure = reason
        self.close()

    def close(self) -> None:
        """Stop the workers (shutdown command, then terminate what is left) and leave the group. Idempotent."""
        if self._closing:
            return
        self._closing = True
        self._ending.set()
        data = pickle.dumps(("shutdown",))
        for conn in self.conns:
            try:
                conn.send_bytes(data)
            except OSError:
                pass
        for proc in self.procs:
            wait([proc.sentinel], timeout=TERMINATE_GRACE_S)
        # The monitor returns at the first exit, after ending the others if that exit was a failure; only then
        # may this thread reap the workers (two threads reaping one child race).
        self._monitor.join(TERMINATE_GRACE_S)
        self._finalizer()
        for conn in self.conns:
            conn.close()
        destroy_tensor_parallel(self.tp)
        self._rendezvous.cleanup()

    def _wait_started(self) -> None:
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            wait([conn, proc.sentinel])
            try:
                started = conn.poll() and conn.recv_bytes() == STARTED
            except EOFError:
                started = False
            if not started:
                proc.join()
                raise WorkerExited(f"tensor-parallel worker rank {rank} exited with code {proc.exitcode} "
                                   "while starting")

    def _watch(self) -> None:
        """Wait for any worker to exit; unless the group is closing, record why and end the others."""
        sentinels = {proc.sentinel: rank for rank, proc in enumerate(self.procs, start=1)}
        first = wait(list(sentinels))[0]
        if self._ending.is_set():   # close(), garbage collection or interpreter exit ended them
            return
        rank = sentinels[first]
        proc = self.procs[rank - 1]
        proc.join()
        self.failure = f"tensor-parallel worker rank {rank} exited with code {proc.exitcode}"
        logger.error("%s; stopping the other workers", self.failure)
        _terminate(self.procs)
        _abort_nccl(self.tp.group)


def _abort_nccl(group: dist.ProcessGroup | None) -> None:
    """Abort an NCCL group's communicators, so that a collective rank 0 is waiting in returns with an error
    instead of waiting for a dead peer (gloo's fail by themselves). The group cannot be used afterwards: the
    engine's next step raises WorkerExited."""
    if group is None or not dist.is_initialized():
        return
    try:
        if dist.get_backend(group) != "nccl":   # raises once the group is destroyed (a close raced the monitor)
            return
        dist.distributed_c10d._abort_process_group(group)
    except Exception:   # aborting is a best effort on a group already lost; the failure itself is recorded
        logger.exception("aborting the NCCL communicators of a lost tensor-parallel group failed")


def _end(procs: list[BaseProcess], ending: threading.Event) -> None:
    """The finalizer (garbage collection, interpreter exit): say the exits are on purpose, then end the workers."""
    ending.set()
    _terminate(procs)


def _terminate(procs: list[BaseProcess]) -> None:
    """SIGTERM every live worker, then SIGKILL those still alive after the grace period."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(TERMINATE_GRACE_S)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _is_hardened() -> bool:
    """Whether this process runs hardened (pcc: not dumpable); its workers then harden themselves too."""
    from ccserve.privacy.hardening import is_dumpable
    return not is_dumpable()
