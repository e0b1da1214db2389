"""SiLU-and-mul (SwiGLU) of the fused gate/up projection output in one pass: read [T, 2I], write [T, I].

The kernel rounds silu(gate) to the input dtype before the multiply, as F.silu(gate) * up does, so results
match the reference to the last bit wherever exp does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK = 1024  # output columns per program


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] (gate | up) -> silu(gate) * up, [..., I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(X, Out, width, stride_x, BLOCK: tl.constexpr):
    """Grid (rows, cdiv(I, BLOCK)): one tile of one row; gate at column c, up at column I + c."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + width + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * width + cols, (act * up).to(Out.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Same contract as silu_and_mul_ref; rows of x may be strided (the last dim must be contiguous)."""
    width = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device)
    rows = x.reshape(-1, x.shape[-1]) if x.stride(-1) == 1 else x.contiguous().view(-1, x.shape[-1])
    if rows.shape[0] > 0 and width > 0:
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(width, BLOCK))](
            rows, out, width, rows.stride(0), BLOCK=BLOCK, num_warps=4)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """The Triton kernel on CUDA tensors, the PyTorch reference elsewhere."""
    if x.is_cuda:
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)
