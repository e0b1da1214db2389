"""Linear layers whose parameters the weight loader fills, and fused projections that share one GEMM."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ccserve.kernels.skinny_gemm import skinny_gemm_triton

# Which GEMMs take the Triton skinny GEMM instead of cuBLAS: decode batches of at most SKINNY_MAX_ROWS rows, on
# weights of at most SKINNY_MAX_WEIGHT elements. cuBLAS's GEMV-like kernels stream Llama-3-8B's gate_up
# (117M elements) at ~94% of copy bandwidth already, but o_proj at ~50% and qkv/down through split-K plus a
# reduce launch. bench/gpu_gemv.py times both on the GPU and prints the values to put here; on the H100
# (bench/results/gpu_gemv-h100.json) Triton won for qkv and o_proj up to 4 rows (o_proj 16.6 -> 15.6 us at
# 1 row) and lost or tied on down and gate_up.
SKINNY_MAX_ROWS = 4
SKINNY_MAX_WEIGHT = 24 << 20
SKINNY_DTYPES = (torch.bfloat16, torch.float16)


def use_skinny_gemm(rows: int, out_features: int, in_features: int) -> bool:
    """Whether a [rows, in_features] x [out_features, in_features]^T GEMM runs the Triton skinny kernel. Shapes
    only, never values: a captured CUDA graph must replay the path it recorded."""
    return 0 < rows <= SKINNY_MAX_ROWS and out_features * in_features <= SKINNY_MAX_WEIGHT


class Linear(nn.Module):
    """y = x W^T + b. Parameters start uninitialized: the loader overwrites them with the checkpoint or with
    dummy values, so building an 8B model on the GPU spends no time on an initialization nobody uses."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._skinny(x):
            return skinny_gemm_triton(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def _skinny(self, x: torch.Tensor) -> bool:
        """The Triton path needs CUDA, bf16/fp16 activations in the weight's dtype, a row-major weight, and a
        shape the rule above picks."""
        w = self.weight
        return (x.is_cuda and x.dtype in SKINNY_DTYPES and w.dtype == x.dtype and w.is_contiguous()
                and x.shape[-1] > 0 and use_skinny_gemm(x.numel() // x.shape[-1], *w.shape))


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dimension (q/k/v, gate/up): one GEMM
    reads the activations once instead of two or three times. Checkpoints store the projections apart;
    shard() is where the i-th of them goes."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = output_sizes

    def shard(self, param: torch.Tensor, index: int) -> torch.Tensor:
        """The rows of `param` (this layer's weight or bias) that belong to projection `index`."""
        return param.narrow(0, sum(self.output_sizes[:index]), self.output_sizes[index])
