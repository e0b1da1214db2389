"""The tensor-parallel group on gloo with two real processes, the environment every process starts with, and
the checks that run before any process or GPU is touched."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ccserve.distributed.env import MULTICAST_OFF, check_visible_gpus, device_for_rank, disable_multicast
from ccserve.distributed.group import SINGLE, TensorParallelGroup, destroy_tensor_parallel, init_tensor_parallel
from ccserve.distributed.launch import spawn


def _collectives_worker(rank: int, size: int, init_method: str, out_dir: str) -> None:
    environ_at_start = {k: os.environ.get(k) for k in MULTICAST_OFF}
    tp = init_tensor_parallel(rank, size, init_method, torch.device("cpu"))
    x = torch.arange(6, dtype=torch.float32).view(2, 3) * (rank + 1)
    reduced = tp.all_reduce(x.clone())
    gathered = tp.all_gather(torch.full((2, 1), float(rank)))
    destroy_tensor_parallel(tp)
    torch.save(dict(rank=tp.rank, size=tp.size, environ=environ_at_start, reduced=reduced, gathered=gathered,
                    initialized_after=dist.is_initialized()), Path(out_dir) / f"rank{rank}.pt")


def test_two_ranks_all_reduce_and_all_gather_on_gloo(tmp_path, monkeypatch):
    for key in MULTICAST_OFF:
        monkeypatch.setenv(key, "user value")  # spawn must overwrite these before the children start
    spawn(_collectives_worker, 2, str(tmp_path))
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert (got["rank"], got["size"]) == (rank, 2)
        assert got["environ"] == MULTICAST_OFF
        torch.testing.assert_close(got["reduced"], x * 1 + x * 2, atol=0, rtol=0)
        torch.testing.assert_close(got["gathered"], torch.tensor([[0.0, 1.0], [0.0, 1.0]]), atol=0, rtol=0)
        assert not got["initialized_after"]


def _failing_worker(rank: int, size: int, init_method: str) -> None:
    if rank == 1:
        raise RuntimeError("rank 1 broke on purpose")


def test_a_failing_rank_fails_the_launch_with_its_error():
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 broke on purpose"):
        spawn(_failing_worker, 2)


def test_size_one_needs_no_process_group():
    assert init_tensor_parallel(0, 1, "file:///nonexistent", torch.device("cpu")) is SINGLE
    assert not dist.is_initialized()


@pytest.mark.parametrize("rank,size,match", [(2, 2, "outside a group of size 2"), (1, 2, "needs a process group")])
def test_group_refuses_inconsistent_ranks(rank, size, match):
    with pytest.raises(ValueError, match=match):
        TensorParallelGroup(rank, size)


def test_disable_multicast_overwrites_what_a_user_set():
    environ = {"NCCL_NVLS_ENABLE": "1", "PATH": "/bin"}
    disable_multicast(environ)
    assert environ == {"PATH": "/bin", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                       "NVSHMEM_DISABLE_NVLS": "1"}


def test_importing_ccserve_turns_multicast_off_in_a_fresh_process():
    environ = dict(os.environ, NCCL_NVLS_ENABLE="1", TORCH_SYMM_MEM_DISABLE_MULTICAST="0")
    environ.pop("NVSHMEM_DISABLE_NVLS", None)
    code = "import os, ccserve; print([os.environ.get(k) for k in ccserve.distributed.env.MULTICAST_OFF])"
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['0', '1', '1']"


def test_ranks_take_the_visible_gpus_in_order(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_for_rank(1, 2, "cuda") == torch.device("cuda", 1)
    assert device_for_rank(1, 2, "cpu") == torch.device("cpu")


def test_more_ranks_than_visible_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 needs 2 GPUs, but CUDA_VISIBLE_DEVICES='3' "
                                         r"leaves 1: lower --tensor-parallel-size"):
        check_visible_gpus(2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(ValueError, match="but 1 are visible"):
        device_for_rank(0, 2, "cuda")
