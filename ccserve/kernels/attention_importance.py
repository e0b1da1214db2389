"""Per-head token importance on the GPU (--kv-sparsity, kv/sparsity.py): the attention mass each cached token got.

LeanKV's score of a token for a KV head is the softmax probability it received, summed over that head's query
heads (and over a prefill chunk's queries). The attention kernels never hold a token's normalized probability:
their online softmax knows the normalizer only at the end. So they write each row's log2-sum-exp (`lse`,
prefill_attention.store_lse), and the kernels here take a second pass over the keys alone: score = q . k,
probability = exp2(score - lse), masked where the attention masked (past the sequence, causal, pruned), summed over
the rows of the KV head's group, added into `importance` [blocks, Hk, block_size]. Each program owns one tile of
one KV head of one sequence, so no two programs touch the same score (no atomics). The grid depends only on shapes
(the block-table width), never on sequence lengths, so the launches are CUDA-graph safe.

Cost: one more read of the keys (not the values) per step, only under --kv-sparsity. References:
decode_attention_ref / prefill_attention_ref with `importance` (kernels/prefill_attention.add_importance).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ccserve.kernels.kv_quant import PagedCache, cache_dims, head_bases, kernel_args
from ccserve.kernels.prefill_attention import LOG2E, dot_types, key_scores, pruned_args, pruned_strides

BLOCK_N = 64        # cached tokens per program
BLOCK_M = 64        # (query, head) rows per step of the prefill kernel's loop


@triton.jit
def _add_mass(Importance, page, kv_head, row, mass, pos_mask, stride_ib, stride_ih, stride_is):
    ptrs = Importance + page * stride_ib + kv_head * stride_ih + row * stride_is
    tl.store(ptrs, tl.load(ptrs, mask=pos_mask, other=0.0) + mass, mask=pos_mask)


@triton.jit
def _visible(p, page, row, pos_mask, pruned, stride_pb, stride_ps, SPARSE: tl.constexpr):
    """Probabilities [M, N] with tokens past the limit, and pruned ones, set to 0 (the attention gave them none)."""
    keep = pos_mask
    if SPARSE:
        keep = keep & (tl.load(pruned + page * stride_pb + row * stride_ps, mask=pos_mask, other=1) == 0)
    return tl.where(keep[None, :], p, 0.0)


@triton.jit(do_not_specialize=["stride_bt"])
def _decode_importance_kernel(
        Q, KCache, KScale, KZero, SeqLens, BlockTables, Lse, Pruned, Importance, qk_scale,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd, stride_ksb, stride_ksh, stride_kss, stride_ksc,
        stride_bt, stride_pb, stride_ph, stride_ps, stride_ib, stride_ih, stride_is,
        NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
        K_KIND: tl.constexpr, K_BITS: tl.constexpr, K_AXIS: tl.constexpr, K_GROUP: tl.constexpr,
        SPARSE: tl.constexpr):
    """One program: BLOCK_N cached tokens of one KV head of one sequence, against its group's one decode query."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile_start = tl.program_id(2) * BLOCK_N
    seq_len = tl.load(SeqLens + seq)
    if tile_start >= seq_len:
        return
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    q = tl.load(Q + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_data, k_scale, k_zero = head_bases(KCache, KScale, KZero, kv_head, stride_kh, stride_ksh)
    table = BlockTables + seq.to(tl.int64) * stride_bt
    s, page, row, pos_mask = key_scores(q, k_data, k_scale, k_zero, table, tile_start, seq_len, qk_scale,
                                        stride_kb, stride_ks, stride_kd, stride_ksb, stride_kss, stride_ksc,
                                        BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, DOT_PRECISION,
                                        K_KIND, K_BITS, K_AXIS, K_GROUP)
    lse = tl.load(Lse + seq * NUM_HEADS + heads, mask=g_mask, other=float("inf"))
    p = _visible(tl.exp2(s - lse[:, None]), page, row, pos_mask, Pruned + kv_head * stride_ph, stride_pb, stride_ps,
                 SPARSE)
    _add_mass(Importance, page, kv_head, row, tl.sum(p, 0), pos_mask, stride_ib, stride_ih, stride_is)


@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_importance_kernel(
        Q, KCache, KScale, KZero, CuSeqlensQ, SeqLens, BlockTables, Lse, Pruned, Importance, qk_scale,
        stride_qt, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd, stride_ksb, stride_ksh, stride_kss, stride_ksc,
        stride_bt, stride_pb, stride_ph, stride_ps, stride_ib, stride_ih, stride_is,
        NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
        K_KIND: tl.constexpr, K_BITS: tl.constexpr, K_AXIS: tl.constexpr, K_GROUP: tl.constexpr,
        SPARSE: tl.constexpr):
    """One program: BLOCK_N cached tokens of one KV head of one sequence, against every (query, head) row of the
    chunk that sees them: row r is query r // GROUP of the chunk, query head kv_head * GROUP + r % GROUP."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile_start = tl.program_id(2) * BLOCK_N
    seq_len = tl.load(SeqLens + seq)
    if tile_start >= seq_len:
        return
    q_start = tl.load(CuSeqlensQ + seq)
    q_len = tl.load(CuSeqlensQ + seq + 1) - q_start
    context = seq_len - q_len
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    pos = tile_start + tl.arange(0, BLOCK_N)
    k_data, k_scale, k_zero = head_bases(KCache, KScale, KZero, kv_head, stride_kh, stride_ksh)
    table = BlockTables + seq.to(tl.int64) * stride_bt
    pruned = Pruned + kv_head * stride_ph
    mass = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = tl.maximum(tile_start - context, 0) * GROUP // BLOCK_M * BLOCK_M   # earlier queries see none of it
    for r0 in range(first, q_len * GROUP, BLOCK_M):
        rows = r0 + offs_m
        r_mask = rows < q_len * GROUP
        query = rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        tokens = (q_start + query).to(tl.int64)
        q = tl.load(Q + tokens[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=r_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        s, page, row, pos_mask = key_scores(q, k_data, k_scale, k_zero, table, tile_start, seq_len, qk_scale,
                                            stride_kb, stride_ks, stride_kd, stride_ksb, stride_kss, stride_ksc,
                                            BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, DOT_PRECISION,
                                            K_KIND, K_BITS, K_AXIS, K_GROUP)
        lse = tl.load(Lse + tokens * NUM_HEADS + head, mask=r_mask, other=float("inf"))
        causal = (pos[None, :] <= (context + query)[:, None]) & r_mask[:, None]
        p = tl.where(causal, tl.exp2(s - lse[:, None]), 0.0)
        mass += tl.sum(_visible(p, page, row, pos_mask, pruned, stride_pb, stride_ps, SPARSE), 0)
    page = tl.load(table + pos // BLOCK_SIZE, mask=pos < seq_len, other=0).to(tl.int64)
    _add_mass(Importance, page, kv_head, pos % BLOCK_SIZE, mass, pos < seq_len, stride_ib, stride_ih, stride_is)


def _launch_args(q: torch.Tensor, k_cache: torch.Tensor | PagedCache, block_tables: torch.Tensor,
                 pruned: torch.Tensor | None, importance: torch.Tensor) -> tuple[tuple, tuple, dict, tuple]:
    """The grid (sequences, KV heads, token tiles over the block-table width) and the arguments both kernels share."""
    num_kv_heads, block_size = cache_dims(k_cache)
    k_ptrs, k_strides, k_consts = kernel_args(k_cache, "K")
    dot_fp32, dot_precision = dot_types(q)
    grid = (block_tables.shape[0], num_kv_heads, triton.cdiv(block_tables.shape[1] * block_size, BLOCK_N))
    strides = (*k_strides, block_tables.stride(0), *pruned_strides(pruned), *importance.stride())
    consts = dict(NUM_HEADS=q.shape[1], GROUP=q.shape[1] // num_kv_heads, HEAD_DIM=q.shape[2], BLOCK_SIZE=block_size,
                  BLOCK_D=max(16, triton.next_power_of_2(q.shape[2])), BLOCK_N=BLOCK_N, DOT_FP32=dot_fp32,
                  DOT_PRECISION=dot_precision, SPARSE=pruned is not None, **k_consts)
    return grid, tuple(k_ptrs), consts, strides


def add_decode_importance(q: torch.Tensor, k_cache: torch.Tensor | PagedCache, seq_lens: torch.Tensor,
                          block_tables: torch.Tensor, scale: float, lse: torch.Tensor, importance: torch.Tensor,
                          pruned: torch.Tensor | None = None) -> None:
    """Add each decode query's attention mass into importance [blocks, Hk, block_size]; lse [B, H] from
    decode_attention_triton(..., lse=)."""
    if q.shape[0] == 0:
        return
    grid, k_ptrs, consts, strides = _launch_args(q, k_cache, block_tables, pruned, importance)
    k_strides, rest = strides[:8], strides[8:]
    _decode_importance_kernel[grid](
        q, *k_ptrs, seq_lens, block_tables, lse, *pruned_args(pruned, q), importance, scale * LOG2E,
        *q.stride(), *k_strides, *rest, BLOCK_G=max(16, triton.next_power_of_2(consts["GROUP"])), **consts)


def add_prefill_importance(q: torch.Tensor, k_cache: torch.Tensor | PagedCache, cu_seqlens_q: torch.Tensor,
                           seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, lse: torch.Tensor,
                           importance: torch.Tensor, pruned: torch.Tensor | None = None) -> None:
    """Add a prefill chunk's attention mass (over its queries and each KV head's query heads) into importance;
    lse [T, H] from prefill_attention_triton(..., lse=)."""
    if q.shape[0] == 0 or block_tables.shape[0] == 0:
        return
    grid, k_ptrs, consts, strides = _launch_args(q, k_cache, block_tables, pruned, importance)
    k_strides, rest = strides[:8], strides[8:]
    _prefill_importance_kernel[grid](
        q, *k_ptrs, cu_seqlens_q, seq_lens, block_tables, lse, *pruned_args(pruned, q), importance, scale * LOG2E,
        *q.stride(), *k_strides, *rest, BLOCK_M=BLOCK_M, **consts)
