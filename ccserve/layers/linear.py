"""Linear layers whose parameters the weight loader fills, and fused projections that share one GEMM."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T + b. Parameters start uninitialized: the loader overwrites them with the checkpoint or with
    dummy values, so building an 8B model on the GPU spends no time on an initialization nobody uses."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


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
