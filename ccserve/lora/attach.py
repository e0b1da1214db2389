"""Put LoRA into a loaded model: find the linear (and the columns of it) behind each projection the adapters
train, check every adapter's shapes against it, and wrap those linears in LoraLinear with zeroed weight stacks.

The model's own checkpoint-name mapping (`_param_for`, which the weight loader uses) says where an HF projection
lives, so fused q/k/v and gate/up need no LoRA-specific code in the model files. Only linears some configured
adapter trains are wrapped: the others keep running their plain GEMM.
"""
from __future__ import annotations

import torch
from torch import nn

from ccserve.layers.linear import Linear, MergedLinear
from ccserve.layers.lora import LoraIndex, LoraLinear, LoraTarget
from ccserve.lora.adapter import LoraAdapter


def attach_lora(model: nn.Module, adapters: list[LoraAdapter], slots: int, index: LoraIndex,
                device: torch.device, dtype: torch.dtype) -> dict[str, LoraTarget]:
    """Wrap the trained linears; returns each trained projection's target (its weight stacks, `slots` deep and
    as wide as the largest adapter rank)."""
    rank = max(a.rank for a in adapters)
    targets: dict[str, LoraTarget] = {}
    for module_name in sorted({m for a in adapters for m in a.weights}):
        linear_name, linear, offset, out = _locate(model, module_name, adapters)
        for adapter in adapters:
            _check_shapes(adapter, module_name, linear.weight.shape[1], out)
        wrapper = _wrap(model, linear_name, linear, index)
        a = torch.zeros(slots, rank, linear.weight.shape[1], dtype=dtype, device=device)
        b = torch.zeros(slots, out, rank, dtype=dtype, device=device)
        target = LoraTarget(offset, a, b)
        wrapper.targets.append(target)
        targets[module_name] = target
    return targets


def _locate(model: nn.Module, module_name: str, adapters: list[LoraAdapter]) -> tuple[str, Linear, int, int]:
    """(our linear's name, the linear, first output column, output columns) of an HF projection."""
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
        return owner, linear, 0, linear.weight.shape[0]
    assert isinstance(linear, MergedLinear)
    return owner, linear, sum(linear.output_sizes[:shard]), linear.output_sizes[shard]


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
