"""Rotary embedding and the KV-cache write of one step in one kernel (model-dtype caches).

At small batches a decoder layer is a chain of launch-bound kernels; rotating q and k (kernels/rotary.py) and
then writing k and v to the cache (kernels/kv_store.py) are two launches of a few microseconds each for a few KB
of data. Here one launch does both: q is rotated in place (attention reads it next), k is rotated on its way to
the cache (nothing reads the un-cached k again), v is copied. Quantized caches keep the two-kernel path, since
their stores need whole groups of tokens or channels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ccserve.kernels.kv_store import store_kv_ref
from ccserve.kernels.rotary import HALF_TILE, _rotate_heads, _token_cos_sin, rotary_ref


def rotary_store_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    """q [T, H, D] rotated in place; k [T, Hk, D] rotated (in place, here) and stored with v [T, Hk, D] at the
    slots (-1: skipped) of caches [num_blocks, Hk, block_size, D]."""
    rotary_ref(positions, q, k, cos_sin_cache, q.shape[-1])
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping)


@triton.jit
def _rotary_store_kernel(Positions, Q, Key, Value, KCache, VCache, SlotMapping, CosSin, num_q_heads,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs, stride_cache,
                         NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Grid (tokens, q head tiles + 1): program (t, j) rotates tile j of token t's query heads, and the last
    program of the token rotates its keys into the cache and copies its values there (slot -1: nothing)."""
    token = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    cos, sin, offs_d, d_mask = _token_cos_sin(CosSin, Positions, token, stride_cache, HALF, BLOCK_HALF)
    if tile < tl.num_programs(1) - 1:
        row = Q + token * stride_qt
        _rotate_heads(row, row, stride_qh, stride_qh, num_q_heads, tile * BLOCK_H, cos, sin, offs_d, d_mask,
                      HALF, BLOCK_H)
    else:
        slot = tl.load(SlotMapping + token)
        if slot >= 0:
            block = slot // BLOCK_SIZE
            offset = slot % BLOCK_SIZE
            _rotate_heads(Key + token * stride_kt, KCache + block * stride_kcb + offset * stride_kcs, stride_kh,
                          stride_kch, NUM_KV_HEADS, 0, cos, sin, offs_d, d_mask, HALF, BLOCK_HK)
            heads = tl.arange(0, BLOCK_HK)[:, None]
            mask = (heads < NUM_KV_HEADS) & d_mask[None, :]
            src = Value + token * stride_vt + heads * stride_vh + offs_d[None, :]
            dst = VCache + block * stride_vcb + offset * stride_vcs + heads * stride_vch + offs_d[None, :]
            tl.store(dst, tl.load(src, mask=mask).to(VCache.dtype.element_ty), mask=mask)
            tl.store(dst + HALF, tl.load(src + HALF, mask=mask).to(VCache.dtype.element_ty), mask=mask)

def rotary_store_triton(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    """Same contract as rotary_store_ref, except that k is left as it was (only its rotated copy is stored).
    q, k, v may be strided views of a fused qkv output; head_dim must be contiguous."""
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("rotary_store: q, k, v and the caches must be contiguous along head_dim")
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(num_heads), max(1, HALF_TILE // block_half))
    num_kv_heads = k.shape[1]
    _rotary_store_kernel[(num_tokens, triton.cdiv(num_heads, block_h) + 1)](
        positions, q, k, v, k_cache, v_cache, slot_mapping, cos_sin_cache, num_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), cos_sin_cache.stride(0),
        NUM_KV_HEADS=num_kv_heads, HALF=half, BLOCK_SIZE=k_cache.shape[2], BLOCK_H=block_h,
        BLOCK_HK=triton.next_power_of_2(num_kv_heads), BLOCK_HALF=block_half, num_warps=4)


def rotary_store(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    if q.is_cuda:
        rotary_store_triton(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping)
    else:
        rotary_store_ref(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping)
