"""What ranks 1..N-1 of a tensor-parallel group run: a ModelRunner of their own, driven by rank 0.

Each worker builds the same runner as rank 0 (its slice of the model, its slice of the KV cache, the same graphs
in the same order), then repeats whatever rank 0 runs, so that every collective pairs up: one command per step,
read from the pipe to rank 0. A worker never sees a Sequence, a prompt or a text: only the step's host arrays.

A worker must never outlive the server: it asks the kernel to kill it when its parent dies (PR_SET_PDEATHSIG,
Linux), and it ends on EOF of its pipe (the parent closed it or died). It ignores SIGINT: a Ctrl-C in the
terminal reaches the whole process group, and it is rank 0 that decides to stop the group.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
from multiprocessing.connection import Connection

import torch

from ccserve.config import EngineConfig
from ccserve.distributed.env import device_for_rank
from ccserve.distributed.group import TensorParallelGroup, destroy_tensor_parallel, init_tensor_parallel
from ccserve.distributed.sealed import SealedTensorParallelGroup
from ccserve.engine.model_runner import ModelRunner

PR_SET_PDEATHSIG = 1
STARTED = b"started"


def run_worker(rank: int, size: int, init_method: str, config: EngineConfig, conn: Connection, parent_pid: int,
               harden: bool) -> None:
    """The worker process's main function (the target rank 0 spawns). harden: the parent runs hardened (pcc:
    undumpable, no core files), which a child does not inherit through exec, so the worker hardens itself."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if harden:
        from ccserve.privacy.hardening import harden_process
        harden_process()
    if config.torch_device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // size))  # the ranks share the host's cores
    conn.send_bytes(STARTED)
    tp = join_group(rank, size, init_method, config)
    runner: ModelRunner | None = None
    try:
        runner = ModelRunner(config, tp)
        serve(runner, conn)
    except Exception as exc:  # noqa: BLE001 - the type only: a message could quote what the step carried
        print(f"tensor-parallel worker rank {rank} failed: {type(exc).__name__}", file=sys.stderr)
        sys.exit(1)
    finally:
        if runner is not None:
            runner.drop_graphs()    # before the group goes: see ModelRunner.drop_graphs
            if runner.swapper is not None:
                runner.swapper.close()
        destroy_tensor_parallel(tp)


def join_group(rank: int, size: int, init_method: str, config: EngineConfig
               ) -> TensorParallelGroup | SealedTensorParallelGroup:
    """Join the group as `rank` (every rank, rank 0 included, joins through here): under --cc its collectives carry
    only sealed payloads between the GPUs (docs/tp.md, phase 3), and every rank agrees on the link keys now."""
    device = device_for_rank(rank, size, config.torch_device.type)
    tp = init_tensor_parallel(rank, size, init_method, device, config.tp_all_reduce)
    return SealedTensorParallelGroup(tp, device) if config.cc != "off" else tp


def serve(runner: ModelRunner, conn: Connection) -> None:
    """Run rank 0's commands until it says shutdown or its end of the pipe closes."""
    tail: tuple[torch.Tensor, torch.Tensor] | None = None  # the last decode window's last tokens and positions
    while True:
        try:
            command, *args = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        if command == "execute":
            runner.run_step(*args)
        elif command == "decodes":
            # Rank 0 only ever continues the window it enqueued last, so this worker's last window is the one.
            outputs, positions = runner.run_decodes(*args, tail=tail)
            tail = (outputs[-1].token_ids, positions)
        elif command == "adapters":
            runner.load_adapters(*args)
        elif command in ("swap_out", "swap_in", "prefetch_swaps", "end_swap"):
            getattr(runner, command)(*args)
        elif command == "scrub":
            runner.scrub(*args)
        elif command == "scrub_idle":
            tail = None
            runner.scrub_idle()
        elif command == "shutdown":
            return
        else:
            raise ValueError(f"unknown tensor-parallel command {command!r}")


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies; exit now if it already has (it may have died
    before the request was made, and then no signal comes)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)
