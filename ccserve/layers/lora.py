"""A linear layer with LoRA deltas of many adapters at once: y = base(x) + per token (x A_s^T) B_s^T.

LoraLinear wraps one of the model's linears after its weights are loaded (ccserve/lora/attach.py puts it there
only when adapters are configured, so a server without adapters runs exactly the plain layers). A fused linear
(q/k/v, gate/up) holds one LoraTarget per projection an adapter may train, each adding into its own columns.
The stacks are written by the GPU adapter cache (ccserve/lora/cache.py); the token -> slot map of the step is in
the LoraIndex, which the model runner owns and sets before each forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ccserve.kernels.lora import lora_expand, lora_shrink
from ccserve.layers.linear import Linear
from ccserve.layers.parallel_linear import RowParallelLinear


class LoraIndex:
    """The adapter slot of every token of the current step (-1: no adapter), in one static device buffer so a
    captured CUDA graph reads the values of the step it replays."""

    def __init__(self, max_tokens: int, device: torch.device) -> None:
        self.buffer = torch.full((max_tokens,), -1, dtype=torch.int32, device=device)
        self.token_slots = self.buffer[:0]

    def set(self, token_slots: torch.Tensor) -> None:
        n = token_slots.shape[0]
        self.buffer[:n].copy_(token_slots)
        self.token_slots = self.buffer[:n]

    def none(self, n: int) -> None:
        """n tokens without adapters (profiling, graph capture)."""
        self.buffer[:n].fill_(-1)
        self.token_slots = self.buffer[:n]

    def pad(self, n: int, padded: int) -> None:
        """A graph captured for `padded` rows replays a step of n: its padding rows take no adapter."""
        self.buffer[n:padded].fill_(-1)


@dataclass
class LoraTarget:
    """One projection adapters may train: columns [offset, offset + b.shape[1]) of its linear's output."""

    offset: int
    a: torch.Tensor     # [slots, rank, in]
    b: torch.Tensor     # [slots, out, rank], LoRA scaling folded in


class LoraLinear(nn.Module):
    """Under tensor parallelism the stacks hold this rank's slice (lora/attach.py): B's rows of a column-parallel
    linear, A's columns of a row-parallel one. A row-parallel rank's delta is then an addend like its product, so
    it is added before the all-reduce, which sums both."""

    def __init__(self, base: Linear, index: LoraIndex) -> None:
        super().__init__()
        self.base, self.index = base, index
        self.targets: list[LoraTarget] = []
        self.reduces = isinstance(base, RowParallelLinear) and base.tp.size > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base.partial(x) if self.reduces else self.base(x)
        slots = self.index.token_slots
        for t in self.targets:
            lora_expand(lora_shrink(x, t.a, slots), t.b, slots, y, t.offset)
        return self.base.tp.all_reduce(y) if self.reduces else y
