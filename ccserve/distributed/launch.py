"""Run a function in N fresh processes, one per tensor-parallel rank, and wait for all of them.

This is the simple launcher of tests and benchmarks: every rank runs the same function and the call fails if
any rank fails (torch.multiprocessing.spawn then stops the others and re-raises the failing rank's
traceback). The serving engine's workers are long-lived and driven by the scheduler (docs/tp.md, phase 2).
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp

from ccserve.distributed.env import disable_multicast


def spawn(fn: Callable[..., None], size: int, *args: object) -> None:
    """Call fn(rank, size, init_method, *args) in `size` spawned processes; init_method is a file rendezvous
    private to this call (no port to collide with a neighbour's). fn must be importable (module level)."""
    disable_multicast()  # children inherit the environment: multicast is off before their first import
    with tempfile.TemporaryDirectory(prefix="ccserve-tp-") as tmp:
        init_method = (Path(tmp) / "rendezvous").as_uri()
        mp.spawn(_run, args=(fn, size, init_method, args), nprocs=size, join=True)


def _run(rank: int, fn: Callable[..., None], size: int, init_method: str, args: tuple) -> None:
    fn(rank, size, init_method, *args)
