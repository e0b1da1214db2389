"""RMSNorm with the residual add fused in: one read and one write per tensor instead of ~7 fp32 passes.

Semantics are HF Llama's exactly: the residual add rounds to the model dtype, the norm runs in float32, the
normalized value rounds to the model dtype before the weight multiplies it. The kernel keeps those roundings,
so on a GPU it differs from the reference only by the order of the sum of squares.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 2048  # elements per program when rows are short (per-head q/k norms): several rows share one program


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim; with residual, normalizes x + residual and also
    returns that sum (the new residual stream)."""
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, residual)


@triton.jit(do_not_specialize=["num_rows"])
def _rmsnorm_kernel(X, Residual, Weight, Out, ResidualOut, num_rows, inner_rows, width, eps,
                    stride_xa, stride_xb, stride_ra, stride_rb,
                    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """BLOCK_M rows per program. Row r of the [A, B, N] input sits at (r // B) * stride_a + (r % B) * stride_b,
    so 2-D views with a row stride and per-head [T, H, D] views of a fused qkv output need no copy.
    ResidualOut's dtype is the dtype the normalized value rounds to (X itself is passed when there is none)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < num_rows)[:, None] & (cols < width)[None, :]
    outer, inner = rows // inner_rows, rows % inner_rows
    x = tl.load(X + (outer * stride_xa + inner * stride_xb)[:, None] + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(Residual + (outer * stride_ra + inner * stride_rb)[:, None] + cols[None, :], mask=mask, other=0.0)
        x = (x + r.to(tl.float32)).to(ResidualOut.dtype.element_ty)
        tl.store(ResidualOut + rows[:, None] * width + cols[None, :], x, mask=mask)
        x = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / width + eps)
    h = (x * inv_rms[:, None]).to(ResidualOut.dtype.element_ty).to(tl.float32)
    w = tl.load(Weight + cols, mask=cols < width, other=0.0).to(tl.float32)
    tl.store(Out + rows[:, None] * width + cols[None, :], (w[None, :] * h).to(Out.dtype.element_ty), mask=mask)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as an [A, B, N] view with unit stride along N: [T, N] -> [T, 1, N]; [T, H, D] stays as it is."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() <= 2:
        return x.reshape(-1, 1, x.shape[-1])
    return x.flatten(0, -3)


def _launch_config(num_rows: int, width: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): whole rows per program, enough of them to fill TILE elements."""
    block_n = triton.next_power_of_2(width)
    block_m = min(triton.next_power_of_2(num_rows), max(1, TILE // block_n))
    tile = block_m * block_n
    num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16
    return block_m, block_n, num_warps


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as rmsnorm_ref. x (and residual, same shape) may be strided views whose last dim is
    contiguous; outputs are new contiguous tensors, inputs are left untouched."""
    width = x.shape[-1]
    norm_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, norm_dtype), device=x.device)
    new_residual = None if residual is None else torch.empty(x.shape, dtype=norm_dtype, device=x.device)
    x3 = _as_rows(x)
    r3 = x3 if residual is None else _as_rows(residual)
    num_rows = x3.shape[0] * x3.shape[1]
    if num_rows > 0:
        block_m, block_n, num_warps = _launch_config(num_rows, width)
        _rmsnorm_kernel[(triton.cdiv(num_rows, block_m),)](
            x3, r3, weight, out, x3 if new_residual is None else new_residual, num_rows, x3.shape[1], width, eps,
            x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1),
            HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return out if residual is None else (out, new_residual)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
            ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel on CUDA tensors, the PyTorch reference elsewhere."""
    if x.is_cuda:
        return rmsnorm_triton(x, weight, eps, residual)
    return rmsnorm_ref(x, weight, eps, residual)
