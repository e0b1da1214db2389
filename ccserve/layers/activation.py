"""Gated activation of the fused gate/up projection."""
from __future__ import annotations

import torch
from torch import nn

from ccserve.kernels.activation import silu_and_mul


class SiluAndMul(nn.Module):
    """[T, 2I] (gate | up) -> silu(gate) * up, [T, I]: the SwiGLU of Llama-family MLPs, applied to the output
    of one merged gate_up GEMM, in one Triton kernel on CUDA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)
