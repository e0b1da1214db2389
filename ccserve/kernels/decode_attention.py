"""Attention of one new query per sequence over its paged KV cache (the decode step).

Decode is bound by reading the KV cache, so the Triton kernel is built to read each cached byte once:
one program takes one (sequence, KV head, split) and all query heads of that KV head's group together
(GQA packing: the group's rows padded to >= 16 so scores come from tl.dot). Long contexts with few
sequences are split along the context (split-K) so that every SM has work; a second small kernel merges
the splits' partial softmax results. The split count depends only on shapes and the SM count, never on
the values of seq_lens, so the call is CUDA-graph safe (no host synchronization).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ccserve.kernels.attention_importance import add_decode_importance
from ccserve.kernels.device import num_sms
from ccserve.kernels.kv_quant import PagedCache, cache_dims, head_bases, kernel_args
from ccserve.kernels.prefill_attention import (LOG2E, add_importance, attend_kv_tile, dot_types, gather_kv,
                                               pruned_args, pruned_heads, pruned_strides, store_lse)

MIN_SPLIT_TOKENS = 256       # do not split a context into pieces shorter than this
MAX_SPLITS = 64


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the partial kernel: block_n cached tokens per inner-loop tile."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: int = 2        # split target: quantized tiles wait on loads longer, so more in flight helps


QUANTIZED_CONFIG = DecodeConfig(block_n=128, programs_per_sm=4)


def default_config(k_cache: torch.Tensor | PagedCache, v_cache: torch.Tensor | PagedCache) -> DecodeConfig:
    """The model dtype's tiles, or for a quantized cache longer tiles and twice the programs: its tiles hold half
    the bytes or less and wait longer on loads (H100, Llama-3-8B shape, batch 16, 16K tokens: fp8 438 -> 291 us, K4V2
    736 -> 556 us; bench/results/gpu_kv_formats-h100-tiles.json)."""
    quantized = isinstance(k_cache, PagedCache) or isinstance(v_cache, PagedCache)
    return QUANTIZED_CONFIG if quantized else DecodeConfig()


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor | PagedCache, v_cache: torch.Tensor | PagedCache,
                         seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                         out: torch.Tensor | None = None, pruned: torch.Tensor | None = None,
                         importance: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, H, D]; sequence b attends to its first seq_lens[b] cached tokens (0 gives zeros: padding), except
    those its KV head has pruned (pruned [blocks, Hk, block_size], nonzero = gone). With importance, each KV
    head's attention mass per token (summed over its query heads) is added into it (kv/sparsity.py reads it)."""
    out = torch.empty_like(q) if out is None else out
    group = q.shape[1] // cache_dims(k_cache)[0]
    for b, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            out[b] = 0
            continue
        k = gather_kv(k_cache, block_tables[b], seq_len).float().repeat_interleave(group, dim=1)
        v = gather_kv(v_cache, block_tables[b], seq_len).float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,khd->hk", q[b].float(), k) * scale
        gone = pruned_heads(pruned, block_tables[b], seq_len, group)
        if gone is not None:
            scores.masked_fill_(gone, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        add_importance(importance, block_tables[b], probs, group)
        out[b] = torch.einsum("hk,khd->hd", probs, v).to(out.dtype)
    return out


@triton.jit(do_not_specialize=["stride_bt"])
def _decode_partial_kernel(
        Q, KCache, KScale, KZero, VCache, VScale, VZero, SeqLens, BlockTables, Out, PartM, PartL, PartAcc, Pruned,
        Lse, qk_scale, stride_pb, stride_ph, stride_ps,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd, stride_ksb, stride_ksh, stride_kss, stride_ksc,
        stride_vb, stride_vh, stride_vs, stride_vd, stride_vsb, stride_vsh, stride_vss, stride_vsc,
        stride_bt, stride_ob, stride_oh, stride_od,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
        K_KIND: tl.constexpr, K_BITS: tl.constexpr, K_AXIS: tl.constexpr, K_GROUP: tl.constexpr,
        V_KIND: tl.constexpr, V_BITS: tl.constexpr, V_AXIS: tl.constexpr, V_GROUP: tl.constexpr,
        SPARSE: tl.constexpr, WRITE_LSE: tl.constexpr):
    """Online softmax of one group of query heads over one split of one sequence's context.

    With one split the normalized result goes straight to Out (and with WRITE_LSE each head's log2-sum-exp of
    scores to Lse [B, H]: see store_lse); otherwise the running max (log2 domain), the sum of exponentials and
    the unnormalized accumulator go to the Part* buffers for the reduce kernel.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_data, k_scale, k_zero = head_bases(KCache, KScale, KZero, kv_head, stride_kh, stride_ksh)
    v_data, v_scale, v_zero = head_bases(VCache, VScale, VZero, kv_head, stride_vh, stride_vsh)
    table = BlockTables + seq.to(tl.int64) * stride_bt
    pruned = Pruned + kv_head * stride_ph

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        acc, l_i, m_i = attend_kv_tile(q, acc, l_i, m_i, k_data, k_scale, k_zero, v_data, v_scale, v_zero, table,
                                       tile_start, end, (tile_start + offs_n < end)[None, :], qk_scale,
                                       pruned, stride_pb, stride_ps,
                                       stride_kb, stride_ks, stride_kd, stride_ksb, stride_kss, stride_ksc,
                                       stride_vb, stride_vs, stride_vd, stride_vsb, stride_vss, stride_vsc,
                                       BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, DOT_PRECISION, True,
                                       K_KIND, K_BITS, K_AXIS, K_GROUP, V_KIND, V_BITS, V_AXIS, V_GROUP, SPARSE)

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(Out + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 out.to(Out.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
        if WRITE_LSE:
            store_lse(Lse + seq * GROUP * tl.num_programs(1) + heads, m_i, l_i, g_mask)
    else:
        num_heads = GROUP * tl.num_programs(1)
        part = (seq * num_heads + heads) * NUM_SPLITS + split          # index into [B, H, NUM_SPLITS]
        tl.store(PartM + part, m_i, mask=g_mask)
        tl.store(PartL + part, l_i, mask=g_mask)
        tl.store(PartAcc + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_mask[:, None])


@triton.jit
def _decode_reduce_kernel(Out, PartM, PartL, PartAcc, Lse, stride_ob, stride_oh, stride_od,
                          HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
                          WRITE_LSE: tl.constexpr):
    """Merge the splits of one (sequence, head): rescale each by exp2(m_split - m_max) and normalize.

    Empty splits carry m = -inf, l = 0; a sequence with no tokens at all (padding) yields zeros.
    """
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    part = (seq * tl.num_programs(1) + head) * NUM_SPLITS + offs_s
    m = tl.load(PartM + part)
    l = tl.load(PartL + part)
    acc = tl.load(PartAcc + part[:, None] * BLOCK_D + offs_d[None, :])
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    l_sum = tl.sum(l * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(l_sum == 0.0, 1.0, l_sum)
    tl.store(Out + seq * stride_ob + head * stride_oh + offs_d * stride_od, out.to(Out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    if WRITE_LSE:
        store_lse(Lse + seq * tl.num_programs(1) + head, m_max, l_sum, True)


def num_decode_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int,
                      programs_per_sm: int = 2) -> int:
    """How many pieces to cut each context into: programs_per_sm programs per SM, pieces >= MIN_SPLIT_TOKENS.

    Uses only static quantities (max_context = block_tables.shape[1] * block_size), so a captured CUDA graph
    stays valid for any seq_lens; each sequence divides its actual length into that many pieces.
    """
    wanted = triton.cdiv(programs_per_sm * num_sms, batch * num_kv_heads)
    by_context = triton.cdiv(max_context, MIN_SPLIT_TOKENS)
    splits = max(1, min(wanted, by_context, MAX_SPLITS))
    return triton.next_power_of_2(splits)


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor | PagedCache, v_cache: torch.Tensor | PagedCache,
                            seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                            out: torch.Tensor | None = None, num_splits: int | None = None,
                            config: DecodeConfig | None = None, pruned: torch.Tensor | None = None,
                            lse: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as decode_attention_ref (importance aside: attention_importance.py adds it from `lse`);
    num_splits (a power of two) and config override the defaults (tests, tuning). The keep mask is one byte per
    token and head, read beside each tile's page; shapes and grid do not depend on it, so the launch stays
    CUDA-graph safe. lse: a float32 [B, H] tensor to receive each head's log2-sum-exp of scores (store_lse)."""
    out = torch.empty_like(q) if out is None else out
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = cache_dims(k_cache)
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    cfg = config or default_config(k_cache, v_cache)
    if num_splits is None:
        num_splits = num_decode_splits(batch, num_kv_heads, block_tables.shape[1] * block_size, num_sms(q.device),
                                       cfg.programs_per_sm)
    block_d = max(16, triton.next_power_of_2(head_dim))      # tl.dot needs >= 16
    dot_fp32, dot_precision = dot_types(q)
    if num_splits > 1:
        part_m = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(batch, num_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out        # unused by the kernel
    k_ptrs, k_strides, k_consts = kernel_args(k_cache, "K")
    v_ptrs, v_strides, v_consts = kernel_args(v_cache, "V")
    _decode_partial_kernel[(batch, num_kv_heads, num_splits)](
        q, *k_ptrs, *v_ptrs, seq_lens, block_tables, out, part_m, part_l, part_acc, *pruned_args(pruned, q),
        out if lse is None else lse, scale * LOG2E, *pruned_strides(pruned),
        *q.stride(), *k_strides, *v_strides, block_tables.stride(0), *out.stride(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, NUM_SPLITS=num_splits,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=cfg.block_n,
        DOT_FP32=dot_fp32, DOT_PRECISION=dot_precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        SPARSE=pruned is not None, WRITE_LSE=lse is not None, **k_consts, **v_consts)
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            out, part_m, part_l, part_acc, out if lse is None else lse, *out.stride(),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_D=block_d, WRITE_LSE=lse is not None, num_warps=4)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor | PagedCache, v_cache: torch.Tensor | PagedCache,
                     seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                     out: torch.Tensor | None = None, pruned: torch.Tensor | None = None,
                     importance: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernels on a GPU, the reference elsewhere. With importance (--kv-sparsity), the attention also
    writes each head's log2-sum-exp and a second kernel adds the tokens' attention mass from it."""
    if not q.is_cuda:
        return decode_attention_ref(q, k_cache, v_cache, seq_lens, block_tables, scale, out, pruned, importance)
    lse = None if importance is None else torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    out = decode_attention_triton(q, k_cache, v_cache, seq_lens, block_tables, scale, out, pruned=pruned, lse=lse)
    if importance is not None:
        add_decode_importance(q, k_cache, seq_lens, block_tables, scale, lse, importance, pruned)
    return out
