"""Quantized paged KV storage: the layout the store and attention kernels share, its PyTorch reference
quantizer/dequantizer, and the Triton helpers that find and dequantize a tile of it.

One of K or V of one layer is a `PagedCache`: codes plus (for quantized kinds) fp16 scales and zero points,
all indexed by the same block id first, so a block table addresses everything and scrubbing a block zeroes
its scales too. Kinds:

- "model": the model's dtype, stored as is (today's path; no scale tensors, no extra kernel work).
- "fp8": e4m3 codes, symmetric, one scale per `group` channels of a token of a head (amax / 448).
- "int": 8, 4 or 2-bit unsigned codes, asymmetric (x = code * scale + zero), packed along head_dim
  (4 bits: 2 channels per byte, 2 bits: 4 per byte; channel d sits in byte d // per_byte at bit
  (d % per_byte) * bits). Groups run along one of two axes:
  - "token": `group` consecutive channels of one token (values, as KIVI and LeanKV do): scale/zero
    [blocks, kv_heads, block_size, head_dim // group].
  - "channel": `group` consecutive tokens of one channel within a block (keys, as KIVI found: key outliers sit
    in fixed channels): scale/zero [blocks, kv_heads, block_size // group, head_dim]. Tokens arrive one at a
    time, so a group is re-encoded whenever a token extends it: channels whose range the new tokens stay
    inside keep their scale, zero point and codes exactly; channels whose range grows are re-encoded from
    their dequantized values (see `store_channel_group_ref` for the error this adds).

Codes are computed with the stored (fp16-rounded) scale and zero point, so dequantization uses exactly what
quantization used; rounding is floor(v + 0.5) in kernel and reference alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0                   # largest finite float8_e4m3fn
KINDS = {"model": 0, "fp8": 1, "int": 2}
AXES = {"token": 0, "channel": 1}


@dataclass
class PagedCache:
    """One of K or V of one layer in a quantized format (`kind` "fp8" or "int"; "model" caches are plain tensors).

    data: fp8 [blocks, Hk, bs, D] or uint8 [blocks, Hk, bs, D * bits // 8]; scale/zero: fp16, shaped by axis
    (zero is None for fp8). group is resolved (> 0).
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    kind: str
    bits: int
    axis: str
    group: int

    @property
    def num_kv_heads(self) -> int:
        return self.data.shape[1]

    @property
    def block_size(self) -> int:
        return self.data.shape[2]

    @property
    def head_dim(self) -> int:
        return self.scale.shape[3] if self.axis == "channel" else self.scale.shape[3] * self.group

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def per_byte(self) -> int:
        return 8 // self.bits if self.kind == "int" else 1


def cache_shapes(kind: str, bits: int, axis: str, group: int, block_size: int, head_dim: int,
                 model_dtype: torch.dtype) -> tuple[tuple[int, ...], torch.dtype, tuple[int, ...] | None]:
    """Per-block shapes (after the block axis) and dtype of codes, and the shape of scales (None: none)."""
    if kind == "model":
        return (block_size, head_dim), model_dtype, None
    if kind == "fp8":
        return (block_size, head_dim), torch.float8_e4m3fn, (block_size, head_dim // group)
    codes = (block_size, head_dim * bits // 8)
    if axis == "token":
        return codes, torch.uint8, (block_size, head_dim // group)
    return codes, torch.uint8, (block_size // group, head_dim)


# ---- PyTorch reference: quantize / dequantize ------------------------------------------------------------

def affine_params(x: torch.Tensor, dim: int, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scale and zero point of groups reduced along `dim`: the range [min, max] over `levels` steps."""
    lo, hi = x.amin(dim), x.amax(dim)
    return ((hi - lo) / levels).half(), lo.half()


def encode_int(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    """Codes of x (fp32) under broadcastable fp16 scale/zero: floor((x - zero) / scale + 0.5) in [0, levels]."""
    s = scale.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    return torch.floor((x - zero.float()) * inv + 0.5).clamp(0, levels).to(torch.uint8)


def encode_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 codes of x / scale, saturated to +-448 (a scale rounded down to fp16 can push amax past it)."""
    s = scale.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    return (x * inv).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes along the last axis, 8 // bits per byte, channel d at bit (d % per_byte) * bits."""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    grouped = codes.view(*codes.shape[:-1], -1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (grouped << shifts).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack: uint8 codes, per_byte times as many along the last axis."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2).to(torch.uint8)


def quantize_tokens_ref(x: torch.Tensor, kind: str, bits: int, group: int):
    """Token-axis quantization of x [..., D] (fp32): (codes, scale [..., D // group], zero or None)."""
    g = x.float().view(*x.shape[:-1], -1, group)
    if kind == "fp8":
        scale = (g.abs().amax(-1) / FP8_MAX).half()
        return encode_fp8(g, scale.unsqueeze(-1)).flatten(-2), scale, None
    levels = (1 << bits) - 1
    scale, zero = affine_params(g, -1, levels)
    codes = encode_int(g, scale.unsqueeze(-1), zero.unsqueeze(-1), levels).flatten(-2)
    return pack(codes, bits), scale, zero


def dequantize_blocks_ref(cache: PagedCache, block_ids: torch.Tensor) -> torch.Tensor:
    """The given blocks of a quantized cache as fp32 [n, Hk, bs, D]."""
    data = cache.data[block_ids]
    scale = cache.scale[block_ids].float()
    if cache.kind == "fp8":
        return data.float() * scale.repeat_interleave(cache.group, dim=-1)
    codes = unpack(data, cache.bits).float()
    zero = cache.zero[block_ids].float()
    axis = -1 if cache.axis == "token" else -2
    return codes * scale.repeat_interleave(cache.group, dim=axis) + zero.repeat_interleave(cache.group, dim=axis)


def store_tokens_ref(x: torch.Tensor, cache: PagedCache, blocks: torch.Tensor, offsets: torch.Tensor) -> None:
    """Token-axis store: x [T, Hk, D] quantized token by token into (block, offset)."""
    codes, scale, zero = quantize_tokens_ref(x, cache.kind, cache.bits, cache.group)
    cache.data[blocks, :, offsets] = codes
    cache.scale[blocks, :, offsets] = scale
    if zero is not None:
        cache.zero[blocks, :, offsets] = zero


def store_channel_group_ref(x: torch.Tensor, cache: PagedCache, block: int, first_row: int) -> None:
    """Channel-axis store of n consecutive tokens x [n, Hk, D] into one group, starting at row first_row of block.

    Rows of the group before first_row were stored earlier. A channel whose new values lie inside its stored
    range [zero, zero + levels * scale] keeps scale, zero and old codes (no error added); otherwise the range
    grows to cover them and the old rows are re-encoded from their dequantized values. An old value's error is
    then at most the sum of scale/2 over the encodings it went through (<= its count times the final
    scale / 2); in practice a channel's range is set by its first few tokens.
    """
    g, levels = cache.group, cache.levels
    gi, off = first_row // g, first_row % g
    rows = slice(gi * g, first_row + x.shape[0])
    new = x.float().transpose(0, 1)                                     # [Hk, n, D]
    if off == 0:
        scale, zero = affine_params(new, 1, levels)
        codes = encode_int(new, scale.unsqueeze(1), zero.unsqueeze(1), levels)
    else:
        old_codes = unpack(cache.data[block, :, gi * g:first_row], cache.bits)        # [Hk, off, D]
        s_old, z_old = cache.scale[block, :, gi], cache.zero[block, :, gi]           # [Hk, D] fp16
        hi_old = z_old.float() + levels * s_old.float()
        lo_new, hi_new = new.amin(1), new.amax(1)
        keep = (lo_new >= z_old.float()) & (hi_new <= hi_old)
        lo, hi = torch.minimum(z_old.float(), lo_new), torch.maximum(hi_old, hi_new)
        scale = torch.where(keep, s_old, ((hi - lo) / levels).half())
        zero = torch.where(keep, z_old, lo.half())
        old = old_codes.float() * s_old.float().unsqueeze(1) + z_old.float().unsqueeze(1)
        codes = encode_int(torch.cat([old, new], 1), scale.unsqueeze(1), zero.unsqueeze(1), levels)
        codes[:, :off] = torch.where(keep.unsqueeze(1), old_codes, codes[:, :off])
    cache.data[block, :, rows] = pack(codes, cache.bits)
    cache.scale[block, :, gi] = scale
    cache.zero[block, :, gi] = zero


def group_runs(slots: list[int], group: int) -> list[tuple[int, int]]:
    """(first token, count) of each run of consecutive tokens that fall into one channel group, in order.

    Tokens of one sequence in one step are contiguous and consecutive in position, so a group is written by
    one run per step; the kernel's leader program (the run's first token) finds the same runs."""
    runs: list[tuple[int, int]] = []
    for t, slot in enumerate(slots):
        if slot < 0:
            continue
        if runs and slots[t - 1] == slot - 1 and slot % group:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((t, 1))
    return runs


def store_quantized_ref(x: torch.Tensor, cache: PagedCache, slot_mapping: torch.Tensor) -> None:
    """Quantize x [T, Hk, D] into the cache at its slots (-1: skipped)."""
    bs = cache.block_size
    if cache.axis == "token":
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        store_tokens_ref(x[keep], cache, slots // bs, slots % bs)
        return
    slots = slot_mapping.tolist()
    for start, n in group_runs(slots, cache.group):
        slot = slots[start]
        store_channel_group_ref(x[start:start + n], cache, slot // bs, slot % bs)


# ---- Triton helpers (shared by the store and attention kernels) --------------------------------------------

@triton.jit
def head_bases(data, scale, zero, head, stride_h, stride_sh):
    """Scalar pointers at one KV head's codes, scales and zero points (the last two unused for KIND 0)."""
    return data + head * stride_h, scale + head * stride_sh, zero + head * stride_sh


@triton.jit
def load_codes(ptrs, pos_mask, stride_d, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
               KIND: tl.constexpr, BITS: tl.constexpr):
    """[BLOCK_N, BLOCK_D] codes of the tokens at ptrs ([BLOCK_N, 1], each at its channel 0): fp8, uint8, or int32
    for sub-byte codes; callers convert once, to what they compute in.

    Sub-byte codes are read as the packed bytes (contiguous, so the loads are 16 bytes wide) and split in
    registers: reading them per channel would load each byte 2 or 4 times, one byte at a time."""
    if KIND == 2 and BITS < 8:
        offs_b = tl.arange(0, BLOCK_D // (8 // BITS))
        mask = pos_mask[:, None] & (offs_b * (8 // BITS) < HEAD_DIM)[None, :]
        packed = tl.load(ptrs + offs_b[None, :] * stride_d, mask=mask, other=0).to(tl.int32)
        if BITS == 4:
            codes = tl.join(packed & 15, packed >> 4)
        else:  # channel 4b + j at bits 2j: join's last axis is the inner index, so pair (0, 2) with (1, 3)
            codes = tl.join(tl.join(packed & 3, (packed >> 4) & 3), tl.join((packed >> 2) & 3, packed >> 6))
        codes = tl.reshape(codes, [BLOCK_N, BLOCK_D])
    else:
        offs_d = tl.arange(0, BLOCK_D)
        mask = pos_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        codes = tl.load(ptrs + offs_d[None, :] * stride_d, mask=mask, other=0.0)
    return codes


@triton.jit
def dequant_token_groups(codes, scale, zero, page, row, pos_mask, stride_sb, stride_ss, stride_sc,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                         KIND: tl.constexpr, GROUP: tl.constexpr):
    """Token-axis groups: each token's BLOCK_D // GROUP scales (and zero points) are loaded once and broadcast
    over their GROUP channels in registers (per-channel addresses would repeat each scale GROUP times, as
    single 2-byte loads)."""
    offs_c = tl.arange(0, BLOCK_D // GROUP)
    offs = page[:, None] * stride_sb + row[:, None] * stride_ss + offs_c[None, :] * stride_sc
    mask = pos_mask[:, None] & (offs_c * GROUP < HEAD_DIM)[None, :]
    s = tl.load(scale + offs, mask=mask, other=0.0).to(tl.float32)
    if KIND == 2:
        z = tl.load(zero + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        z = tl.zeros_like(s)
    if BLOCK_D == GROUP:
        x = codes * s + z
    else:
        grouped = tl.reshape(codes, [BLOCK_N, BLOCK_D // GROUP, GROUP])
        x = tl.reshape(grouped * s[:, :, None] + z[:, :, None], [BLOCK_N, BLOCK_D])
    return x


@triton.jit
def token_scales(scale, zero, page, row, pos_mask, stride_sb, stride_ss, KIND: tl.constexpr):
    """Each token's one scale and zero point [BLOCK_N] (fp32; zero is 0 for fp8), for formats with one group per
    token and head: the attention kernels then apply them to scores or probabilities instead of every element."""
    offs = page * stride_sb + row * stride_ss
    s = tl.load(scale + offs, mask=pos_mask, other=0.0).to(tl.float32)
    if KIND == 2:
        z = tl.load(zero + offs, mask=pos_mask, other=0.0).to(tl.float32)
    else:
        z = tl.zeros_like(s)
    return s, z


@triton.jit
def dequant_channel_groups(codes, scale, zero, table, tile_start, limit, stride_sb, stride_ss, stride_sc,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr):
    """Channel-axis groups (GROUP consecutive tokens of a block share a channel's scale and zero point): one row
    of scales per group in the tile, broadcast over its tokens in registers.

    Tiles start at multiples of BLOCK_N and both BLOCK_N and GROUP are powers of two, so a tile holds whole
    groups (BLOCK_N >= GROUP) or lies inside one; GROUP divides the block size, so no group spans two pages."""
    if BLOCK_N >= GROUP:
        first = tile_start + tl.arange(0, BLOCK_N // GROUP) * GROUP
    else:
        first = tile_start + tl.arange(0, 1)
    valid = first < limit
    page = tl.load(table + first // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs = (page * stride_sb + ((first % BLOCK_SIZE) // GROUP) * stride_ss)[:, None] + offs_d[None, :] * stride_sc
    mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    s = tl.load(scale + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(zero + offs, mask=mask, other=0.0).to(tl.float32)
    if BLOCK_N <= GROUP:
        x = codes * s + z
    else:
        grouped = tl.reshape(codes, [BLOCK_N // GROUP, GROUP, BLOCK_D])
        x = tl.reshape(grouped * s[:, None, :] + z[:, None, :], [BLOCK_N, BLOCK_D])
    return x


@triton.jit
def load_operand(data, scale, zero, table, tile_start, limit, page, row, pos_mask,
                 stride_b, stride_s, stride_d, stride_sb, stride_ss, stride_sc,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 KIND: tl.constexpr, BITS: tl.constexpr, AXIS: tl.constexpr, GROUP: tl.constexpr):
    """A [BLOCK_N, BLOCK_D] tile of one head's cached K or V: the tokens at positions tile_start + n (n < BLOCK_N,
    those >= limit masked), each at its (page, row). data/scale/zero point at the head (head_bases). As stored
    for KIND 0 (the model dtype), else dequantized to fp32 (fp8: code * scale; int: code * scale + zero)."""
    ptrs = data + page[:, None] * stride_b + row[:, None] * stride_s
    if KIND == 0:
        offs_d = tl.arange(0, BLOCK_D)
        x = tl.load(ptrs + offs_d[None, :] * stride_d, mask=pos_mask[:, None] & (offs_d < HEAD_DIM)[None, :],
                    other=0.0)
    else:
        codes = load_codes(ptrs, pos_mask, stride_d, BLOCK_N, BLOCK_D, HEAD_DIM, KIND, BITS).to(tl.float32)
        if AXIS == 0:
            x = dequant_token_groups(codes, scale, zero, page, row, pos_mask, stride_sb, stride_ss, stride_sc,
                                     BLOCK_N, BLOCK_D, HEAD_DIM, KIND, GROUP)
        else:
            x = dequant_channel_groups(codes, scale, zero, table, tile_start, limit, stride_sb, stride_ss,
                                       stride_sc, BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, GROUP)
    return x


@triton.jit
def round_to_e4m3(y):
    """Round fp32 y to e4m3's 3 mantissa bits (nearest, ties to even) before the cast: the cast then only
    changes type (every normal e4m3 value is exact), whatever rounding the backend's conversion implements."""
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576          # clear the low 20 mantissa bits
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def pack_codes(codes, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr):
    """[ROWS, BLOCK_D] int32 codes -> [ROWS, BLOCK_D * BITS // 8] bytes (same order as `pack`)."""
    if BITS < 8:
        grouped = tl.reshape(codes, [ROWS, BLOCK_D // (8 // BITS), 8 // BITS])
        shifts = (tl.arange(0, 8 // BITS) * BITS)[None, None, :]
        codes = tl.sum(grouped << shifts, 2)
    return codes.to(tl.uint8)


def cache_dims(cache: torch.Tensor | PagedCache) -> tuple[int, int]:
    """(num_kv_heads, block_size) of a plain or quantized cache operand."""
    return (cache.shape[1], cache.shape[2]) if isinstance(cache, torch.Tensor) else (cache.num_kv_heads,
                                                                                        cache.block_size)


def kernel_args(cache: torch.Tensor | PagedCache, prefix: str) -> tuple[list, list, dict]:
    """What the attention kernels take for one cache operand: pointers (codes, scales, zero points), strides
    (4 of the codes, 4 of the scales) and constexprs named PREFIX_KIND etc. A plain tensor is the model-dtype
    path: its scale pointers are dummies the kernel never reads."""
    if isinstance(cache, torch.Tensor):
        return ([cache, cache, cache], [*cache.stride(), 0, 0, 0, 0],
                {f"{prefix}_KIND": 0, f"{prefix}_BITS": 16, f"{prefix}_AXIS": 0, f"{prefix}_GROUP": 1})
    zero = cache.zero if cache.zero is not None else cache.scale
    return ([cache.data, cache.scale, zero], [*cache.data.stride(), *cache.scale.stride()],
            {f"{prefix}_KIND": KINDS[cache.kind], f"{prefix}_BITS": cache.bits, f"{prefix}_AXIS": AXES[cache.axis],
             f"{prefix}_GROUP": cache.group})
