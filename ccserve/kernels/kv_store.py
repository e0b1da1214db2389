"""Write this step's keys and values into the paged KV cache at their slots, quantizing on the way in.

A cache in the model's dtype (a plain tensor) takes one fused K+V kernel, as before quantization existed. A
quantized operand (kv_quant.PagedCache) takes its own launch: token-axis formats one program per token (all its
heads), channel-axis formats one program per run of the step's tokens that fall into one channel group (the
run's first token leads; the others return at once), which re-encodes the group (see kv_quant).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ccserve.kernels.kv_quant import (FP8_MAX, KINDS, PagedCache, pack_codes, round_to_e4m3,
                                      store_quantized_ref)

FP8_LIMIT = tl.constexpr(FP8_MAX)     # a kernel may read module globals only as constexprs


def _store_plain_ref(x: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    block_size = cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    cache[slots // block_size, :, slots % block_size] = x[keep].to(cache.dtype)


def store_kv_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor | PagedCache,
                 v_cache: torch.Tensor | PagedCache, slot_mapping: torch.Tensor) -> None:
    """key/value: [T, Hk, D]; caches: [num_blocks, Hk, block_size, D] tensors or PagedCache; slot -1 is skipped."""
    for x, cache in ((key, k_cache), (value, v_cache)):
        if isinstance(cache, torch.Tensor):
            _store_plain_ref(x, cache, slot_mapping)
        else:
            store_quantized_ref(x, cache, slot_mapping)


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


@triton.jit
def _store_token_quant_kernel(X, Data, Scale, Zero, SlotMapping,
                              stride_xt, stride_xh, stride_xd, stride_b, stride_h, stride_s, stride_d,
                              stride_sb, stride_sh, stride_ss, stride_sc,
                              NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                              BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                              KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr):
    """One program per token: quantize all its heads in groups of GROUP channels (as quantize_tokens_ref)."""
    token = tl.program_id(0)
    slot = tl.load(SlotMapping + token)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < NUM_KV_HEADS) & (offs_d < HEAD_DIM)
    x = tl.load(X + token * stride_xt + offs_h * stride_xh + offs_d * stride_xd, mask=mask, other=0.0)
    xg = tl.reshape(x.to(tl.float32), [BLOCK_H, BLOCK_D // GROUP, GROUP])
    mg = tl.reshape(mask, [BLOCK_H, BLOCK_D // GROUP, GROUP])
    offs_g = tl.arange(0, BLOCK_D // GROUP)[None, :]
    s_off = block * stride_sb + offset * stride_ss + offs_h * stride_sh + offs_g * stride_sc
    s_mask = (offs_h < NUM_KV_HEADS) & (offs_g < HEAD_DIM // GROUP)
    dst = Data + block * stride_b + offset * stride_s + offs_h * stride_h
    if KIND == 1:
        scale = (tl.max(tl.where(mg, tl.abs(xg), 0.0), 2) / FP8_LIMIT).to(tl.float16)
        s = scale.to(tl.float32)
        inv = tl.where(s > 0, 1.0 / tl.where(s > 0, s, 1.0), 0.0)      # 0 for a constant group
        y = tl.clamp(xg * inv[:, :, None], -FP8_LIMIT, FP8_LIMIT)
        y = tl.reshape(round_to_e4m3(y), [BLOCK_H, BLOCK_D])
        tl.store(dst + offs_d * stride_d, y.to(Data.dtype.element_ty), mask=mask)
    else:
        levels = (1 << BITS) - 1
        lo = tl.min(tl.where(mg, xg, float("inf")), 2)
        hi = tl.max(tl.where(mg, xg, float("-inf")), 2)
        scale = ((hi - lo) / levels).to(tl.float16)
        zero = lo.to(tl.float16)
        s = scale.to(tl.float32)
        inv = tl.where(s > 0, 1.0 / tl.where(s > 0, s, 1.0), 0.0)      # 0 for a constant group
        q = tl.floor((xg - zero.to(tl.float32)[:, :, None]) * inv[:, :, None] + 0.5)
        q = tl.reshape(tl.clamp(q, 0.0, levels * 1.0), [BLOCK_H, BLOCK_D]).to(tl.int32)
        packed = pack_codes(q, BLOCK_H, BLOCK_D, BITS)
        offs_p = tl.arange(0, BLOCK_D * BITS // 8)[None, :]
        tl.store(dst + offs_p * stride_d, packed,
                 mask=(offs_h < NUM_KV_HEADS) & (offs_p < HEAD_DIM * BITS // 8))
        tl.store(Zero + s_off, zero, mask=s_mask)
    tl.store(Scale + s_off, scale, mask=s_mask)


@triton.jit(do_not_specialize=["num_tokens"])
def _store_channel_quant_kernel(X, Data, Scale, Zero, SlotMapping, num_tokens,
                                stride_xt, stride_xh, stride_xd, stride_b, stride_h, stride_s, stride_d,
                                stride_sb, stride_sh, stride_ss, stride_sc,
                                NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                                BLOCK_D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr):
    """One program per token; the first token of each run in one channel group re-encodes the group for every
    head (as store_channel_group_ref): old rows dequantized, new rows read, range per channel kept or grown."""
    token = tl.program_id(0)
    slot = tl.load(SlotMapping + token)
    prev = tl.load(SlotMapping + token - 1, mask=token > 0, other=-2)
    follower = (prev == slot - 1) & (slot % GROUP != 0)
    if (slot < 0) | follower:
        return
    levels = (1 << BITS) - 1
    rows = tl.arange(0, GROUP)
    off = slot % GROUP
    nxt = tl.load(SlotMapping + token + rows, mask=token + rows < num_tokens, other=-2)
    in_run = (nxt == slot + rows) & (off + rows < GROUP)
    n = tl.min(tl.where(in_run, GROUP, rows), 0)              # the first token past the run
    block = slot // BLOCK_SIZE
    first_row = slot % BLOCK_SIZE - off                      # the group's first row in the block
    old = (rows < off)[:, None]
    new = ((rows >= off) & (rows < off + n))[:, None]
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = (offs_d < HEAD_DIM)[None, :]
    if BITS < 8:
        col = offs_d // (8 // BITS)
        shift = ((offs_d % (8 // BITS)) * BITS)[None, :]
    else:
        col = offs_d
        shift = (offs_d * 0)[None, :]
    offs_p = tl.arange(0, BLOCK_D * BITS // 8)[None, :]
    src_tokens = (token + rows - off).to(tl.int64)[:, None]
    for h in range(NUM_KV_HEADS):
        codes_at = Data + block * stride_b + h * stride_h + (first_row + rows)[:, None] * stride_s
        s_at = Scale + block * stride_sb + h * stride_sh + (first_row // GROUP) * stride_ss + offs_d * stride_sc
        z_at = Zero + block * stride_sb + h * stride_sh + (first_row // GROUP) * stride_ss + offs_d * stride_sc
        old_codes = (tl.load(codes_at + col[None, :] * stride_d, mask=old & d_mask, other=0).to(tl.int32)
                     >> shift) & levels
        s_old_h = tl.load(s_at, mask=offs_d < HEAD_DIM, other=0.0)
        z_old_h = tl.load(z_at, mask=offs_d < HEAD_DIM, other=0.0)
        s_old, z_old = s_old_h.to(tl.float32), z_old_h.to(tl.float32)
        x_old = old_codes.to(tl.float32) * s_old[None, :] + z_old[None, :]
        x_new = tl.load(X + src_tokens * stride_xt + h * stride_xh + offs_d[None, :] * stride_xd,
                        mask=new & d_mask, other=0.0).to(tl.float32)
        lo_new = tl.min(tl.where(new, x_new, float("inf")), 0)
        hi_new = tl.max(tl.where(new, x_new, float("-inf")), 0)
        hi_old = z_old + levels * s_old
        keep = (off > 0) & (lo_new >= z_old) & (hi_new <= hi_old)
        lo = tl.where(off > 0, tl.minimum(z_old, lo_new), lo_new)
        hi = tl.where(off > 0, tl.maximum(hi_old, hi_new), hi_new)
        scale = tl.where(keep, s_old_h, ((hi - lo) / levels).to(tl.float16))
        zero = tl.where(keep, z_old_h, lo.to(tl.float16))
        s = scale.to(tl.float32)
        inv = tl.where(s > 0, 1.0 / tl.where(s > 0, s, 1.0), 0.0)      # 0 for a constant group
        x = tl.where(old, x_old, x_new)
        q = tl.clamp(tl.floor((x - zero.to(tl.float32)[None, :]) * inv[None, :] + 0.5), 0.0, levels * 1.0)
        q = tl.where(old & keep[None, :], old_codes, q.to(tl.int32))
        packed = pack_codes(q, GROUP, BLOCK_D, BITS)
        tl.store(codes_at + offs_p * stride_d, packed, mask=(old | new) & (offs_p < HEAD_DIM * BITS // 8))
        tl.store(s_at, scale, mask=offs_d < HEAD_DIM)
        tl.store(z_at, zero, mask=offs_d < HEAD_DIM)


def _store_quantized_triton(x: torch.Tensor, cache: PagedCache, slot_mapping: torch.Tensor) -> None:
    num_tokens, num_kv_heads, head_dim = x.shape
    common = (*x.stride(), *cache.data.stride(), *cache.scale.stride())
    zero = cache.zero if cache.zero is not None else cache.scale
    block_d = triton.next_power_of_2(head_dim)
    if cache.axis == "token":
        _store_token_quant_kernel[(num_tokens,)](
            x, cache.data, cache.scale, zero, slot_mapping, *common,
            NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=cache.block_size,
            BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=block_d, KIND=KINDS[cache.kind],
            BITS=cache.bits, GROUP=cache.group, num_warps=4 if num_kv_heads * head_dim >= 1024 else 1)
    else:
        _store_channel_quant_kernel[(num_tokens,)](
            x, cache.data, cache.scale, zero, slot_mapping, num_tokens, *common,
            NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=cache.block_size, BLOCK_D=block_d,
            BITS=cache.bits, GROUP=cache.group, num_warps=4 if cache.group * head_dim >= 2048 else 1)


def store_kv_triton(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor | PagedCache,
                    v_cache: torch.Tensor | PagedCache, slot_mapping: torch.Tensor) -> None:
    """Same contract as store_kv_ref; key/value may be strided views (e.g. slices of a fused QKV output)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if not (isinstance(k_cache, torch.Tensor) and isinstance(v_cache, torch.Tensor)):
        for x, cache in ((key, k_cache), (value, v_cache)):
            if isinstance(cache, torch.Tensor):       # a model-dtype operand beside a quantized one
                store_kv_triton(x, x, cache, cache, slot_mapping)
            else:
                _store_quantized_triton(x, cache, slot_mapping)
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[2],
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1)


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor | PagedCache,
             v_cache: torch.Tensor | PagedCache, slot_mapping: torch.Tensor) -> None:
    if key.is_cuda:
        store_kv_triton(key, value, k_cache, v_cache, slot_mapping)
    else:
        store_kv_ref(key, value, k_cache, v_cache, slot_mapping)
