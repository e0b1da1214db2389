"""Put LoRA into a loaded model: find the linear (and the columns of it) behind each projection the adapters
train, check every adapter's shapes against it, and wrap those linears in LoraLinear with zeroed weight stacks.
Under tensor parallelism each rank keeps its slice of every adapter, cut by the linear's own `rank_slice` (the
weight loader's rule): B's rows of a column-parallel projection, A's columns of a row-parallel one.

The model's own checkpoint-name mapping (`_param_for`, which the weight loader uses) says where an HF projection
lives, so fused q/k/v and gate/up need no LoRA-specific code in the model files. Only linears some configured
adapter trains are wrapped: the others keep running their plain GEMM.
"""
from __future__ import annotations

import torch
from torch import nn

from ccserve.layers.linear import Linear, MergedLinear
from ccserve.layers.lora import LoraIndex, LoraLinear, LoraTarget
from ccserve.layers.parallel_linear import RowParallelLinear
from ccserve.layers.sharding import Sharded
from ccserve.lora.adapter import LoraAdapter


def attach_lora(model: nn.Module, adapters: list[LoraAdapter], slots: int, index: LoraIndex,
                device: torch.device, dtype: torch.dtype) -> dict[str, LoraTarget]:
    """Wrap the trained linears; returns each trained projection's target (its weight stacks, `slots` deep and
    as wide as the largest adapter rank). Under tensor parallelism the adapters' weights are replaced by this
    rank's slices."""
    rank = max(a.rank for a in adapters)
    targets: dict[str, LoraTarget] = {}
    for module_name in sorted({m for a in adapters for m in a.weights}):
        linear_name, linear, offset, out, shard = _locate(model, module_name, adapters)
        for adapter in adapters:
            _check_shapes(adapter, module_name, *_full_shape(linear, shard, out))
            _slice_for_rank(adapter, module_name, linear, shard)
        wrapper = _wrap(model, linear_name, linear, index)
        a = torch.zeros(slots, rank, linear.weight.shape[1], dtype=dtype, device=device)
        b = torch.zeros(slots, out, rank, dtype=dtype, device=device)
        target = LoraTarget(offset, a, b)
        wrapper.targets.append(target)
        targets[module_name] = target
    return targets


def _locate(model: nn.Module, module_name: str, adapters: list[LoraAdapter]
            ) -> tuple[str, Linear, int, int, int | None]:
    """(our linear's name, the linear, first output column, output columns, projection index within a fused
    linear or None) of an HF projection: columns of this rank's slice under tensor parallelism."""
    mapped = model._param_for(module_name + ".weight")
    owner = mapped[0].rpartition(".")[0] if mapped else ""
    try:
        linear = model.get_submodule(owner) if owner else None
    except AttributeError:
        linear = None
    if isinstance(linear, LoraLinear):
        linear = linear.base
    if not isinstance(linear, Linear):
        users = ", ".join(repr(a.name) for a in adapters if module_name in a.weights)
        raise ValueError(f"LoRA adapter {users} trains {module_name!r}, which is not a linear projection of the "
                         "served model: an adapter of another base model, or of a module ccserve does not adapt "
                         "(embeddings, lm_head)")
    shard = mapped[1]
    if shard is None:
        return owner, linear, 0, linear.weight.shape[0], None
    assert isinstance(linear, MergedLinear)
    return owner, linear, sum(linear.output_sizes[:shard]), linear.output_sizes[shard], shard


def _full_shape(linear: Linear, shard: int | None, out: int) -> tuple[int, int]:
    """(input, output) features of the whole projection, as an adapter of the base model has them (a tensor-
    parallel linear holds a slice; it knows the whole)."""
    if isinstance(linear, Sharded):
        full_out, full_in = linear.full_shape(shard)
        return full_in, full_out
    return linear.weight.shape[1], out


def _slice_for_rank(adapter: LoraAdapter, module_name: str, linear: Linear, shard: int | None) -> None:
    """Keep this rank's slice of the adapter's matrices for `module_name` (no-op outside tensor parallelism)."""
    if module_name not in adapter.weights or not isinstance(linear, Sharded):
        return
    a, b = adapter.weights[module_name]
    if isinstance(linear, RowParallelLinear):
        a = linear.rank_slice("weight", a, None)       # A: [rank, in] -> this rank's input columns
    else:
        b = linear.rank_slice("weight", b, shard)      # B: [out, rank] -> this rank's output rows
    adapter.weights[module_name] = (a.contiguous(), b.contiguous())


def _check_shapes(adapter: LoraAdapter, module_name: str, num_in: int, num_out: int) -> None:
    if module_name not in adapter.weights:
        return
    a, b = adapter.weights[module_name]
    if a.shape[1] != num_in or b.shape[0] != num_out:
        raise ValueError(f"LoRA adapter {adapter.name!r} does not fit the served model: its {module_name} maps "
                         f"{a.shape[1]} -> {b.shape[0]} features, the model's {num_in} -> {num_out} (an adapter "
                         "of another base model)")


def _wrap(model: nn.Module, name: str, linear: Linear, index: LoraIndex) -> LoraLinear:
    """The LoraLinear at `name`, put in place of the plain linear on first use."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    current = getattr(parent, attr)
    if isinstance(current, LoraLinear):
        return current
    wrapper = LoraLinear(linear, index)
    setattr(parent, attr, wrapper)
    return wrapper
