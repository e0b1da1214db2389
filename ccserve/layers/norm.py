"""RMSNorm with the residual add fused in, as decoder layers use it."""
from __future__ import annotations

import torch
from torch import nn

from ccserve.kernels.rmsnorm import rmsnorm


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in float32 like HF so bf16 results match its rounding.

    norm(x) normalizes; norm(x, residual) first adds the residual and returns (normalized, new residual), so a
    decoder layer carries one residual stream without separate add kernels. x may be a per-head [T, H, D] view
    (Qwen3's q/k norms): the kernel reads it in place. On CUDA one Triton kernel does it all.
    """

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return rmsnorm(x, self.weight, self.eps, residual)
