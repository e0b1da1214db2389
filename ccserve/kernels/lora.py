"""Batched LoRA for a batch that mixes adapters (S-LoRA / Punica BGMV style): y += (x A_s^T) B_s^T per token.

Every token carries the slot of its adapter in the GPU adapter cache (-1: none). The weights of all resident
adapters sit in fixed-size stacks, A: [slots, rank, in] and B: [slots, out, rank] (ranks below `rank` zero-padded,
the LoRA scaling already folded into B), so one launch of each kernel serves the whole batch whatever its mix:
  shrink  h[t] = x[t] @ A[s_t]^T       [T, in] -> [T, rank], float32
  expand  y[t, off:off+out] += h[t] @ B[s_t]^T
Why two kernels and not one: the rank is small (8-64), so the shrink is a skinny reduction over `in` and the
expand a skinny reduction over `rank`; splitting keeps each one a simple loop and lets a fused projection (q/k/v)
write each part's delta into its own column range of the fused output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 64        # input features per loop iteration of the shrink
BLOCK_N = 64        # output features per program of the expand


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """h[t] = x[t] @ a[slot_t]^T in float32; rows whose slot is -1 are zero. One matmul per adapter present
    (a gather of a per token would copy [T, rank, in])."""
    h = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    for slot in token_slots.unique().tolist():
        if slot >= 0:
            rows = token_slots == slot
            h[rows] = x[rows].float() @ a[slot].float().t()
    return h


def lora_expand_ref(h: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor, y: torch.Tensor,
                    offset: int) -> None:
    """y[t, offset:offset + out] += h[t] @ b[slot_t]^T, added in float32, in place; rows with slot -1 untouched."""
    out = b.shape[1]
    for slot in token_slots.unique().tolist():
        if slot >= 0:
            rows = token_slots == slot
            part = y[rows, offset:offset + out]
            y[rows, offset:offset + out] = (part.float() + h[rows] @ b[slot].float().t()).to(y.dtype)


@triton.jit(do_not_specialize=["num_in"])
def _shrink_kernel(X, A, Slots, H, num_in, stride_x, stride_as, stride_ar,
                   RANK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per token and block of rank rows: a dot product over the input features."""
    t = tl.program_id(0)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot = tl.load(Slots + t).to(tl.int64)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if slot >= 0:
        for k0 in range(0, num_in, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + t * stride_x + ks, mask=ks < num_in, other=0.0).to(tl.float32)
            w = tl.load(A + slot * stride_as + ranks[:, None] * stride_ar + ks[None, :],
                        mask=(ranks < RANK)[:, None] & (ks < num_in)[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
    tl.store(H + t * RANK + ranks, acc, mask=ranks < RANK)


@triton.jit(do_not_specialize=["num_out", "offset"])
def _expand_kernel(Hs, B, Slots, Y, num_out, offset, stride_y, stride_bs, stride_bn,
                   RANK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per token and block of output features: a dot product over the rank, added to y."""
    t = tl.program_id(0)
    slot = tl.load(Slots + t).to(tl.int64)
    if slot >= 0:
        ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rs = tl.arange(0, BLOCK_R)
        h = tl.load(Hs + t * RANK + rs, mask=rs < RANK, other=0.0)
        w = tl.load(B + slot * stride_bs + ns[:, None] * stride_bn + rs[None, :],
                    mask=(ns < num_out)[:, None] & (rs < RANK)[None, :], other=0.0).to(tl.float32)
        delta = tl.sum(w * h[None, :], axis=1)
        ptrs = Y + t * stride_y + offset + ns
        y = tl.load(ptrs, mask=ns < num_out, other=0.0).to(tl.float32)
        tl.store(ptrs, (y + delta).to(Y.dtype.element_ty), mask=ns < num_out)


def lora_shrink_triton(x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """Same contract as lora_shrink_ref; x [T, in] with a unit last stride, a contiguous."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    rank, num_in = a.shape[1], a.shape[2]
    h = torch.empty(x.shape[0], rank, dtype=torch.float32, device=x.device)
    if x.shape[0]:
        block_r = min(triton.next_power_of_2(rank), 16)
        grid = (x.shape[0], triton.cdiv(rank, block_r))
        _shrink_kernel[grid](x, a, token_slots, h, num_in, x.stride(0), a.stride(0), a.stride(1),
                             RANK=rank, BLOCK_R=block_r, BLOCK_K=BLOCK_K)
    return h


def lora_expand_triton(h: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor, y: torch.Tensor,
                       offset: int) -> None:
    """Same contract as lora_expand_ref; y [T, total] with a unit last stride, b contiguous."""
    rank, num_out = b.shape[2], b.shape[1]
    if h.shape[0]:
        grid = (h.shape[0], triton.cdiv(num_out, BLOCK_N))
        _expand_kernel[grid](h, b, token_slots, y, num_out, offset, y.stride(0), b.stride(0), b.stride(1),
                             RANK=rank, BLOCK_R=triton.next_power_of_2(rank), BLOCK_N=BLOCK_N)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """The Triton kernel on CUDA tensors, the PyTorch reference elsewhere."""
    if x.is_cuda:
        return lora_shrink_triton(x, a, token_slots)
    return lora_shrink_ref(x, a, token_slots)


def lora_expand(h: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor, y: torch.Tensor, offset: int) -> None:
    """The Triton kernel on CUDA tensors, the PyTorch reference elsewhere."""
    if y.is_cuda:
        lora_expand_triton(h, b, token_slots, y, offset)
    else:
        lora_expand_ref(h, b, token_slots, y, offset)
