"""The environment every ccserve process runs under, and which device each tensor-parallel rank uses.

NVLink multicast (NVLS) stays off: on shared multi-GPU hosts, multicast objects can take GPUs out of service
for every tenant of the host, and tensor parallelism on one node does not need them (ring / tree all-reduce over
NVLink is what we measure). The variables must be in the environment before NCCL, torch's symmetric memory or
NVSHMEM initialize: `import ccserve` sets them (ccserve/__init__.py), so does creating a process group, and
spawned workers inherit them from their parent's environment. This module imports torch only inside the
functions that need it, so the package's import stays light.
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def disable_multicast(environ: MutableMapping[str, str] = os.environ) -> None:
    """Force NVLink multicast off in `environ` (this process's environment by default). Values a user set
    otherwise are overwritten: the rule is for the host's sake, not a preference."""
    environ.update(MULTICAST_OFF)


def device_for_rank(rank: int, size: int, device_type: str) -> torch.device:
    """Rank r uses the r-th GPU that CUDA_VISIBLE_DEVICES leaves visible (CUDA numbers visible devices from 0),
    so restricting a server to some GPUs restricts its workers too; on the CPU every rank uses the CPU."""
    import torch

    if device_type == "cpu":
        return torch.device("cpu")
    check_visible_gpus(size)
    return torch.device("cuda", rank)


def check_visible_gpus(size: int) -> None:
    """Refuse a tensor-parallel size larger than the visible GPUs, before any GPU memory is taken."""
    import torch

    visible = torch.cuda.device_count()
    if size > visible:
        mask = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f"CUDA_VISIBLE_DEVICES={mask!r} leaves {visible}" if mask is not None else f"{visible} are visible"
        raise ValueError(f"tensor_parallel_size {size} needs {size} GPUs, but {where}: lower "
                         "--tensor-parallel-size or make more GPUs visible")
