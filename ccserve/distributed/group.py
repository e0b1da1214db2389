"""The tensor-parallel group: which rank this process is, how many there are, and the two collectives the
model needs (all-reduce after row-parallel layers, all-gather of vocabulary-parallel logits).

One TensorParallelGroup is created per process and passed explicitly to every layer that shards; nothing reads
a global rank. At size 1 there is no process group at all, and the layers never call a collective, so a
single-GPU server runs exactly the code it ran before tensor parallelism existed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ccserve.distributed.env import disable_multicast
from ccserve.distributed.peer_reduce import PeerAllReduce


@dataclass(frozen=True)
class TensorParallelGroup:
    """This process's place in a tensor-parallel group. group is None at size 1 (no communication). peer: the
    one-shot all-reduce over peer memory for the messages it takes (--tp-all-reduce peer), else NCCL's."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None
    peer: PeerAllReduce | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside a group of size {self.size}")
        if self.size > 1 and self.group is None:
            raise ValueError("a tensor-parallel group of size > 1 needs a process group: use init_tensor_parallel")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (both ways are capturable in a CUDA graph)."""
        if self.peer is not None and self.peer.fits(x):
            return self.peer.all_reduce(x)
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's x along the last dimension, in rank order: [..., n] -> [..., size * n]."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def checkpoint(self) -> None:
        """Nothing to snapshot (see SealedTensorParallelGroup.checkpoint)."""

    def verify(self, check: None = None) -> None:
        """Nothing to check: plain collectives carry no authentication (the sealed group's verify raises when a
        message failed)."""

    def close(self) -> None:
        """Nothing to release: plain collectives hold no keys (the sealed group zeroizes its own)."""

    def min_over_ranks(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's `value` (each rank sizes its own KV cache; the group uses the smallest,
        since every rank holds a slice of the same blocks). device: this rank's (NCCL reduces GPU tensors)."""
        if self.size == 1:
            return value
        x = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(x, op=dist.ReduceOp.MIN, group=self.group)
        return int(x.item())


SINGLE = TensorParallelGroup(rank=0, size=1)


def init_tensor_parallel(rank: int, size: int, init_method: str, device: torch.device,
                         all_reduce: str = "nccl") -> TensorParallelGroup:
    """Join a group of `size` processes (NCCL on CUDA, gloo on the CPU) through init_method (a "tcp://host:port"
    or "file://path" rendezvous that all ranks share). Size 1 joins nothing. The process's CUDA device must be
    set first (device_for_rank), so that NCCL binds the right GPU. all_reduce "peer": small all-reduces go
    through peer memory (distributed/peer_reduce.py; 2 ranks on CUDA)."""
    if size == 1:
        return SINGLE
    disable_multicast()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            device_id=device if device.type == "cuda" else None)
    peer = PeerAllReduce(dist.group.WORLD, device) if all_reduce == "peer" else None
    return TensorParallelGroup(rank, size, dist.group.WORLD, peer)


def destroy_tensor_parallel(tp: TensorParallelGroup) -> None:
    """Leave the group (frees NCCL communicators, so a worker exits without leaking them; a sealed group zeroizes
    its link keys first)."""
    tp.close()
    if tp.group is not None and dist.is_initialized():
        dist.destroy_process_group()
