"""Write this step's keys and values into the paged KV cache at their slots."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def store_kv_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """key/value: [T, Hk, D]; caches: [num_blocks, Hk, block_size, D]; slot -1 is skipped."""
    block_size = k_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, :, offsets] = key[keep].to(k_cache.dtype)
    v_cache[blocks, :, offsets] = value[keep].to(v_cache.dtype)


@triton.jit
def _store_kv_kernel(Key, Value, KCache, VCache, SlotMapping,
                     stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
                     stride_kcb, stride_kch, stride_kcs, stride_kcd,
                     stride_vcb, stride_vch, stride_vcs, stride_vcd,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per token: all its heads at once (Hk * D is small); padding tokens (slot -1) write nothing."""
    token = tl.program_id(0)
    slot = tl.load(SlotMapping + token)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < NUM_KV_HEADS) & (offs_d < HEAD_DIM)

    k = tl.load(Key + token * stride_kt + offs_h * stride_kh + offs_d * stride_kd, mask=mask)
    v = tl.load(Value + token * stride_vt + offs_h * stride_vh + offs_d * stride_vd, mask=mask)
    k_dst = KCache + block * stride_kcb + offset * stride_kcs + offs_h * stride_kch + offs_d * stride_kcd
    v_dst = VCache + block * stride_vcb + offset * stride_vcs + offs_h * stride_vch + offs_d * stride_vcd
    tl.store(k_dst, k.to(KCache.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(VCache.dtype.element_ty), mask=mask)


def store_kv_triton(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Same contract as store_kv_ref; key/value may be strided views (e.g. slices of a fused QKV output)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[2],
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1)


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    if key.is_cuda:
        store_kv_triton(key, value, k_cache, v_cache, slot_mapping)
    else:
        store_kv_ref(key, value, k_cache, v_cache, slot_mapping)
