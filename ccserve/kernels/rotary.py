"""Rotary position embedding applied in place to q and k (NeoX / HF "rotate_half" layout).

In place because q and k are column slices of the fused qkv projection output: rotating them where they lie
needs no copy, and one kernel handles both (the PyTorch path takes ~8 kernels and fp32 temporaries).
The rotation runs in float32 from the float32 cos/sin cache, as the reference does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

HALF_TILE = 1024  # elements of each half (x1, x2) per program: the heads of one token are split into such tiles


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[T, H*D] (rows may be strided) or [T, H, D] as a [T, H, D] view of the same memory."""
    return x.unflatten(-1, (-1, head_dim)) if x.dim() == 2 else x


def rotary_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
               head_dim: int) -> None:
    """positions [T]; q [T, H*D], k [T, Hk*D] (or [T, H, D]); cos_sin_cache [max_position, D] float32 holding
    cos in its first D/2 columns and sin in the last. Rotates each head's (x1, x2) halves in place."""
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    for x in (q, k):
        heads = _heads(x, head_dim)
        x1, x2 = heads.float().chunk(2, dim=-1)
        heads.copy_(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1))


@triton.jit
def _token_cos_sin(CosSin, Positions, token, stride_cache, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One token's cos and sin rows [1, BLOCK_HALF] (float32), with the half-dimension offsets and their mask."""
    pos = tl.load(Positions + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    cos = tl.load(CosSin + pos * stride_cache + offs_d, mask=d_mask, other=0.0)[None, :]
    sin = tl.load(CosSin + pos * stride_cache + HALF + offs_d, mask=d_mask, other=0.0)[None, :]
    return cos, sin, offs_d, d_mask


@triton.jit
def _rotate_heads(Src, Dst, stride_src_h, stride_dst_h, num_heads, first_head, cos, sin, offs_d, d_mask,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate heads [first_head, first_head + BLOCK_H) of one token from Src into Dst (each pointing at that
    token's row; the same row rotates in place), in float32, stored in Dst's dtype."""
    heads = first_head + tl.arange(0, BLOCK_H)
    mask = (heads < num_heads)[:, None] & d_mask[None, :]
    src = Src + heads[:, None] * stride_src_h + offs_d[None, :]
    dst = Dst + heads[:, None] * stride_dst_h + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (x1 * cos - x2 * sin).to(Dst.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(Dst.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(Positions, Q, K, CosSin, num_q_heads, num_k_heads,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Grid (tokens, q head tiles + k head tiles): program (t, j) rotates one tile of BLOCK_H heads of token t,
    of q while j < cdiv(num_q_heads, BLOCK_H), else of k."""
    token = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    cos, sin, offs_d, d_mask = _token_cos_sin(CosSin, Positions, token, stride_cache, HALF, BLOCK_HALF)
    q_tiles = tl.cdiv(num_q_heads, BLOCK_H)
    if tile < q_tiles:
        row = Q + token * stride_qt
        _rotate_heads(row, row, stride_qh, stride_qh, num_q_heads, tile * BLOCK_H, cos, sin, offs_d, d_mask,
                      HALF, BLOCK_H)
    else:
        row = K + token * stride_kt
        _rotate_heads(row, row, stride_kh, stride_kh, num_k_heads, (tile - q_tiles) * BLOCK_H, cos, sin, offs_d,
                      d_mask, HALF, BLOCK_H)


def rotary_triton(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                  head_dim: int) -> None:
    """Same contract as rotary_ref; q and k may be strided views (slices of a fused qkv output).
    Positions must be < max_position: the kernel does not bounds-check the cache gather."""
    q3, k3 = _heads(q, head_dim), _heads(k, head_dim)
    if q3.stride(2) != 1 or k3.stride(2) != 1:
        raise ValueError("rotary: q and k must be contiguous along head_dim to be rotated in place")
    num_tokens = q3.shape[0]
    if num_tokens == 0:
        return
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(q3.shape[1], k3.shape[1])), max(1, HALF_TILE // block_half))
    tiles = triton.cdiv(q3.shape[1], block_h) + triton.cdiv(k3.shape[1], block_h)
    _rotary_kernel[(num_tokens, tiles)](
        positions, q3, k3, cos_sin_cache, q3.shape[1], k3.shape[1],
        q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), cos_sin_cache.stride(0),
        HALF=half, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
           head_dim: int) -> None:
    """The Triton kernel on CUDA tensors, the PyTorch reference elsewhere; both rotate q and k in place."""
    if q.is_cuda:
        rotary_triton(positions, q, k, cos_sin_cache, head_dim)
    else:
        rotary_ref(positions, q, k, cos_sin_cache, head_dim)
