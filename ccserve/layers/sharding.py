"""What the weight loader asks of a tensor-parallel layer: the part of a full checkpoint tensor this rank keeps.

Checkpoints store every tensor whole; rank_slice gets either a tensor or the loader's CheckpointTensor (a shape
and a narrow() that reads only the part asked for), so each rank reads just its slice, and the loader and the
checkpoint format know nothing of tensor parallelism beyond this one method.
"""
from __future__ import annotations

import torch

from ccserve.distributed.group import TensorParallelGroup


class Sharded:
    """Mixin of layers whose parameters hold one rank's part of the checkpoint's tensors."""

    tp: TensorParallelGroup

    def rank_slice(self, param_name: str, tensor: torch.Tensor, shard: int | None) -> torch.Tensor:
        """The part of the checkpoint tensor for `param_name` ("weight" or "bias"; `shard` as in MergedLinear)
        that this rank keeps. Raises ValueError when the tensor's size along the split dimension is not the
        model's."""
        raise NotImplementedError

    def full_shape(self, shard: int | None) -> tuple[int, int]:
        """(out, in) of the checkpoint's weight (projection `shard` of a fused layer): the whole model's sizes,
        which a LoRA adapter of the base model must match (lora/attach.py)."""
        raise NotImplementedError


def split(total: int, size: int, what: str) -> int:
    """total / size, or an error naming what does not divide (a model dimension and the TP size)."""
    if total % size:
        raise ValueError(f"tensor_parallel_size {size} does not divide {what} ({total}): choose a size that "
                         f"divides it ({', '.join(str(d) for d in range(1, 17) if total % d == 0)}, ...)")
    return total // size


def narrow_checked(tensor: torch.Tensor, dim: int, full: int, start: int, length: int) -> torch.Tensor:
    """tensor.narrow(dim, start, length) after checking that the checkpoint's dimension is the model's."""
    if tensor.shape[dim] != full:
        raise ValueError(f"has shape {tuple(tensor.shape)}, but the model expects {full} along dimension {dim}: "
                         "config.json does not match the weights")
    return tensor.narrow(dim, start, length)
