"""Gated activation of the fused gate/up projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """[T, 2I] (gate | up) -> silu(gate) * up, [T, I]: the SwiGLU of Llama-family MLPs, applied to the output
    of one merged gate_up GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
