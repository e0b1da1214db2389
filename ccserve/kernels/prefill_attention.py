"""Causal attention of prefill (and chunked-prefill) queries over the paged KV cache.

The Triton kernel is FlashAttention-2 style: one program owns BLOCK_M queries of one head, walks the
sequence's cached keys and values in BLOCK_N-token tiles (looked up through the block table token by
token, so any block_size works) and keeps an online softmax in fp32. Keys entirely before the tile's first
query need no causal mask and are visited in a separate, mask-free loop; keys after its last query are
never visited.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ccserve.kernels.kv_quant import (PagedCache, cache_dims, dequantize_blocks_ref, head_bases, kernel_args,
                                      load_codes, load_operand, token_scales)

LOG2E = 1.4426950408889634


def gather_kv(cache: torch.Tensor | PagedCache, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len cached tokens of one sequence as [seq_len, Hk, D] (a quantized cache dequantized, fp32)."""
    num_kv_heads, block_size = cache_dims(cache)
    num_blocks = (seq_len + block_size - 1) // block_size
    ids = block_table[:num_blocks].long()
    blocks = cache[ids] if isinstance(cache, torch.Tensor) else dequantize_blocks_ref(cache, ids)   # [nb, Hk, bs, D]
    return blocks.transpose(1, 2).reshape(-1, num_kv_heads, blocks.shape[3])[:seq_len]


def token_slots(block_table: torch.Tensor, seq_len: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (page, row) of each of a sequence's first seq_len cached tokens: where its per-token state lives."""
    pos = torch.arange(seq_len, device=block_table.device)
    return block_table[pos // block_size].long(), pos % block_size


def pruned_heads(pruned: torch.Tensor | None, block_table: torch.Tensor, seq_len: int,
                 group: int) -> torch.Tensor | None:
    """pruned [blocks, Hk, block_size] (nonzero: that KV head no longer sees the token) as a [H, seq_len] bool
    mask over the query heads (each query head follows its KV head), or None without sparsity."""
    if pruned is None:
        return None
    pages, rows = token_slots(block_table, seq_len, pruned.shape[2])
    return (pruned[pages, :, rows] != 0).t().repeat_interleave(group, dim=0)


def add_importance(importance: torch.Tensor | None, block_table: torch.Tensor, probs: torch.Tensor,
                   group: int) -> None:
    """Add the attention mass probs [H, ..., K] (summed over the queries and over each KV head's query heads)
    into importance [blocks, Hk, block_size]: LeanKV's per-head token score, accumulated in place."""
    if importance is None:
        return
    seq_len = probs.shape[-1]
    mass = probs.reshape(probs.shape[0] // group, -1, seq_len).sum(1)        # [Hk, K]
    pages, rows = token_slots(block_table, seq_len, importance.shape[2])
    importance[pages, :, rows] += mass.t()


def prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor | PagedCache, v_cache: torch.Tensor | PagedCache,
                          cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                          scale: float, max_query_len: int, out: torch.Tensor | None = None,
                          pruned: torch.Tensor | None = None, importance: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, H, D]. Query i of sequence s sits at position seq_lens[s] - q_len_s + i and sees keys <= it, except
    those its KV head has pruned (pruned [blocks, Hk, block_size], nonzero = gone). With importance, each KV
    head's attention mass per token (summed over its query heads and this step's queries) is added into it."""
    out = torch.empty_like(q) if out is None else out
    num_heads, num_kv_heads = q.shape[1], cache_dims(k_cache)[0]
    group = num_heads // num_kv_heads
    starts = cu_seqlens_q.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        qs = q[starts[s]:starts[s + 1]].float()
        q_len = qs.shape[0]
        k = gather_kv(k_cache, block_tables[s], seq_len).float().repeat_interleave(group, dim=1)
        v = gather_kv(v_cache, block_tables[s], seq_len).float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
        gone = pruned_heads(pruned, block_tables[s], seq_len, group)
        if gone is not None:
            scores.masked_fill_(gone[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        add_importance(importance, block_tables[s], probs, group)
        out[starts[s]:starts[s + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out


@dataclass(frozen=True)
class PrefillConfig:
    """Tile shape and launch parameters of the prefill kernel (block_m queries x block_n keys)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def prefill_config(head_dim: int, dtype: torch.dtype) -> PrefillConfig:
    """Defaults for sm_90, chosen to fit registers without spills (checked with ptxas) and the Q tile plus
    two K/V tiles in flight within the 228 KB of shared memory per SM."""
    if dtype == torch.float32:              # exact fp32 dots run on FMA units: small tiles
        return PrefillConfig(32, 32, 8, 2)
    if head_dim <= 64:
        return PrefillConfig(128, 64, 4, 3)
    if head_dim <= 128:
        return PrefillConfig(128, 64, 8, 3)
    return PrefillConfig(128, 32, 8, 2)


def dot_types(q: torch.Tensor) -> tuple[bool, str]:
    """Whether the kernels' tl.dot operands are upcast to fp32, and the input precision of tl.dot.

    Operands are in the query's dtype (K/V tiles are cast to it in-kernel); fp32 runs with IEEE precision
    since TF32 would lose the accuracy an fp32 caller asked for. The CPU interpreter's bf16 tl.dot multiplies
    the raw bits, so off the GPU bf16 is upcast to fp32.
    """
    fp32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and not q.is_cuda)
    return fp32, "ieee" if fp32 else "tf32"


@triton.jit
def key_scores(q, k_data, k_scale, k_zero, table, tile_start, limit, qk_scale,
               stride_kb, stride_ks, stride_kd, stride_ksb, stride_kss, stride_ksc,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
               DOT_PRECISION: tl.constexpr,
               K_KIND: tl.constexpr, K_BITS: tl.constexpr, K_AXIS: tl.constexpr, K_GROUP: tl.constexpr):
    """Scores (log2 domain) of q [M, D] against the cached keys at tile_start .. tile_start + BLOCK_N - 1, and
    each token's page, row and whether it is < limit (scores of tokens past it are finite garbage: mask them).
    A quantized tile is dequantized in registers, except where the keys have one scale per token and head: there
    the dot runs on the codes and the scale multiplies the scores (a zero point adds sum(q) * zero)."""
    pos = tile_start + tl.arange(0, BLOCK_N)
    pos_mask = pos < limit
    page = tl.load(table + pos // BLOCK_SIZE, mask=pos_mask, other=0).to(tl.int64)
    row = pos % BLOCK_SIZE
    if K_KIND != 0 and K_AXIS == 0 and K_GROUP == HEAD_DIM:    # one scale per token: scale the scores
        codes = load_codes(k_data + page[:, None] * stride_kb + row[:, None] * stride_ks, pos_mask, stride_kd,
                           BLOCK_N, BLOCK_D, HEAD_DIM, K_KIND, K_BITS)
        k_s, k_z = token_scales(k_scale, k_zero, page, row, pos_mask, stride_ksb, stride_kss, K_KIND)
        s = tl.dot(q, tl.trans(codes.to(q.dtype)), input_precision=DOT_PRECISION) * k_s[None, :]
        if K_KIND == 2:
            s += tl.sum(q.to(tl.float32), 1)[:, None] * k_z[None, :]
        s = s * qk_scale
    else:
        k = load_operand(k_data, k_scale, k_zero, table, tile_start, limit, page, row, pos_mask,
                         stride_kb, stride_ks, stride_kd, stride_ksb, stride_kss, stride_ksc,
                         BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, K_KIND, K_BITS, K_AXIS, K_GROUP)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale
    return s, page, row, pos_mask


@triton.jit
def attend_kv_tile(q, acc, l_i, m_i, k_data, k_scale, k_zero, v_data, v_scale, v_zero, table, tile_start, limit,
                   visible, qk_scale, pruned, stride_pb, stride_ps,
                   stride_kb, stride_ks, stride_kd, stride_ksb, stride_kss, stride_ksc,
                   stride_vb, stride_vs, stride_vd, stride_vsb, stride_vss, stride_vsc,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr,
                   K_KIND: tl.constexpr, K_BITS: tl.constexpr, K_AXIS: tl.constexpr, K_GROUP: tl.constexpr,
                   V_KIND: tl.constexpr, V_BITS: tl.constexpr, V_AXIS: tl.constexpr, V_GROUP: tl.constexpr,
                   SPARSE: tl.constexpr = False):
    """Fold the cached tokens at positions tile_start .. tile_start + BLOCK_N - 1 (those < limit) into the online
    softmax (acc, l_i, m_i). tile_start is a multiple of BLOCK_N (quantized tiles rely on it).

    q: [M, D] in the dot dtype; k_*/v_* point at one KV head's codes, scales and zero points
    (kv_quant.head_bases); each token's page comes from the block table. Scores come from key_scores; values
    are dequantized in registers, except where they have one scale per token and head (fp8, int8 values): there
    the dot runs on the codes (exact in bf16) and the scale multiplies the probabilities, a BLOCK_N-th of the
    work (a zero point adds sum(p * zero)). With MASKED, visible ([M, N] or broadcastable) decides which scores count. Scores are in the
    log2 domain. With SPARSE, pruned points at this KV head's keep-mask pages ([blocks, Hk, block_size] uint8, nonzero
    = pruned): one byte per token of the tile is loaded beside its page, and a pruned token's score is -inf. A tile
    can then hide every token from a row, so the running max is kept finite for the rescale (no NaN from -inf - -inf).
    """
    s, page, row, pos_mask = key_scores(q, k_data, k_scale, k_zero, table, tile_start, limit, qk_scale,
                                        stride_kb, stride_ks, stride_kd, stride_ksb, stride_kss, stride_ksc,
                                        BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, DOT_PRECISION,
                                        K_KIND, K_BITS, K_AXIS, K_GROUP)
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    if SPARSE:
        gone = tl.load(pruned + page * stride_pb + row * stride_ps, mask=pos_mask, other=1)
        s = tl.where((gone == 0)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if SPARSE:
        m_new = tl.where(m_new == float("-inf"), -1e30, m_new)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if V_KIND != 0 and V_AXIS == 0 and V_GROUP == HEAD_DIM:    # one scale per token: scale the probabilities
        codes = load_codes(v_data + page[:, None] * stride_vb + row[:, None] * stride_vs, pos_mask, stride_vd,
                           BLOCK_N, BLOCK_D, HEAD_DIM, V_KIND, V_BITS)
        v_s, v_z = token_scales(v_scale, v_zero, page, row, pos_mask, stride_vsb, stride_vss, V_KIND)
        pv = tl.dot((p * v_s[None, :]).to(q.dtype), codes.to(q.dtype), input_precision=DOT_PRECISION)
        if V_KIND == 2:
            pv += tl.sum(p * v_z[None, :], 1)[:, None]
    else:
        v = load_operand(v_data, v_scale, v_zero, table, tile_start, limit, page, row, pos_mask,
                         stride_vb, stride_vs, stride_vd, stride_vsb, stride_vss, stride_vsc,
                         BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, V_KIND, V_BITS, V_AXIS, V_GROUP)
        pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


@triton.jit
def _find_sequence(CuSeqlensQ, num_seqs, slot, BLOCK_M: tl.constexpr):
    """The sequence owning tile slot `slot`, where sequence s owns the slots from cu_seqlens_q[s] // BLOCK_M + s.

    Those first slots strictly increase with s and leave each sequence room for all its tiles, so the owner
    is the last sequence whose first slot is <= slot: a count, read 64 sequences per load.
    """
    count = 0
    for start in range(0, num_seqs, 64):
        s = start + tl.arange(0, 64)
        first = tl.load(CuSeqlensQ + s, mask=s < num_seqs, other=0) // BLOCK_M + s
        count += tl.sum(((first <= slot) & (s < num_seqs)).to(tl.int32), 0)
    return count - 1


@triton.jit(do_not_specialize=["num_seqs", "num_slots", "stride_bt"])
def _prefill_kernel(
        Q, KCache, KScale, KZero, VCache, VScale, VZero, CuSeqlensQ, SeqLens, BlockTables, Out, Pruned, Lse, qk_scale,
        num_seqs, num_slots, stride_pb, stride_ph, stride_ps,
        stride_qt, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd, stride_ksb, stride_ksh, stride_kss, stride_ksc,
        stride_vb, stride_vh, stride_vs, stride_vd, stride_vsb, stride_vsh, stride_vss, stride_vsc,
        stride_bt, stride_ot, stride_oh, stride_od,
        NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
        K_KIND: tl.constexpr, K_BITS: tl.constexpr, K_AXIS: tl.constexpr, K_GROUP: tl.constexpr,
        V_KIND: tl.constexpr, V_BITS: tl.constexpr, V_AXIS: tl.constexpr, V_GROUP: tl.constexpr,
        SPARSE: tl.constexpr, WRITE_LSE: tl.constexpr):
    """One program: BLOCK_M queries of one head of one sequence (with WRITE_LSE, each query's log2-sum-exp of
    scores goes to Lse [T, NUM_HEADS] too: store_lse).

    Programs are numbered (tile slot, head) with head fastest, so the heads of one GQA group run side by side
    (their K/V tiles are shared in L2), and slots in reverse so each sequence's longest causal rows start
    first. Each sequence has at most one unused slot (see _find_sequence); its programs return at once.
    """
    pid = tl.program_id(0)
    head = pid % NUM_HEADS
    slot = num_slots - 1 - pid // NUM_HEADS
    seq = _find_sequence(CuSeqlensQ, num_seqs, slot, BLOCK_M)
    q_start = tl.load(CuSeqlensQ + seq)
    q_len = tl.load(CuSeqlensQ + seq + 1) - q_start
    tile = slot - (q_start // BLOCK_M + seq)
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(SeqLens + seq)
    context = seq_len - q_len                   # tokens cached before this chunk

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q_pos = context + offs_m
    tokens = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + tokens[:, None] * stride_qt + head * stride_qh + offs_d[None, :] * stride_qd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    kv_head = head // GROUP
    k_data, k_scale, k_zero = head_bases(KCache, KScale, KZero, kv_head, stride_kh, stride_ksh)
    v_data, v_scale, v_zero = head_bases(VCache, VScale, VZero, kv_head, stride_vh, stride_vsh)
    table = BlockTables + seq.to(tl.int64) * stride_bt
    pruned = Pruned + kv_head * stride_ph

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys before the tile's first query are visible to every row: no mask.
    full_end = (context + tile * BLOCK_M) // BLOCK_N * BLOCK_N
    for tile_start in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = attend_kv_tile(q, acc, l_i, m_i, k_data, k_scale, k_zero, v_data, v_scale, v_zero, table,
                                       tile_start, seq_len, None, qk_scale, pruned, stride_pb, stride_ps,
                                       stride_kb, stride_ks, stride_kd, stride_ksb, stride_kss, stride_ksc,
                                       stride_vb, stride_vs, stride_vd, stride_vsb, stride_vss, stride_vsc,
                                       BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, DOT_PRECISION, False,
                                       K_KIND, K_BITS, K_AXIS, K_GROUP, V_KIND, V_BITS, V_AXIS, V_GROUP, SPARSE)
    # The diagonal: causal mask. Key 0 is visible to every row, so no row's max stays -inf.
    kv_end = tl.minimum(context + (tile + 1) * BLOCK_M, seq_len)
    for tile_start in range(full_end, kv_end, BLOCK_N):
        pos = tile_start + offs_n
        visible = (pos[None, :] <= q_pos[:, None]) & (pos < kv_end)[None, :]
        acc, l_i, m_i = attend_kv_tile(q, acc, l_i, m_i, k_data, k_scale, k_zero, v_data, v_scale, v_zero, table,
                                       tile_start, kv_end, visible, qk_scale, pruned, stride_pb, stride_ps,
                                       stride_kb, stride_ks, stride_kd, stride_ksb, stride_kss, stride_ksc,
                                       stride_vb, stride_vs, stride_vd, stride_vsb, stride_vss, stride_vsc,
                                       BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, DOT_PRECISION, True,
                                       K_KIND, K_BITS, K_AXIS, K_GROUP, V_KIND, V_BITS, V_AXIS, V_GROUP, SPARSE)

    out = acc / l_i[:, None]
    tl.store(Out + tokens[:, None] * stride_ot + head * stride_oh + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    if WRITE_LSE:
        store_lse(Lse + tokens * NUM_HEADS + head, m_i, l_i, m_mask)


@triton.jit
def store_lse(ptrs, m, l, mask):
    """A row's log2-sum-exp of its scores (m + log2 l, scores in the log2 domain), from which a second pass
    recovers each probability as exp2(score - lse) (kernels/attention_importance.py). A row that saw no token
    (l = 0: padding, or every token pruned) gets +inf, so its probabilities come out 0, not NaN."""
    tl.store(ptrs, tl.where(l > 0.0, m + tl.log2(tl.where(l > 0.0, l, 1.0)), float("inf")), mask=mask)


def prefill_attention_triton(q: torch.Tensor, k_cache: torch.Tensor | PagedCache, v_cache: torch.Tensor | PagedCache,
                             cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                             scale: float, max_query_len: int, out: torch.Tensor | None = None,
                             config: PrefillConfig | None = None, pruned: torch.Tensor | None = None,
                             lse: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as prefill_attention_ref (importance aside: attention_importance.py adds it from `lse`, a
    float32 [T, H] tensor that receives each query's log2-sum-exp of scores); config overrides the tile
    defaults (tests, tuning).

    max_query_len is not needed here: the grid is sized from the number of tokens and sequences.
    """
    out = torch.empty_like(q) if out is None else out
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = cu_seqlens_q.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    cfg = config or prefill_config(head_dim, q.dtype)
    dot_fp32, dot_precision = dot_types(q)
    num_slots = num_tokens // cfg.block_m + num_seqs        # enough for every sequence's tiles, no host sync
    num_kv_heads, block_size = cache_dims(k_cache)
    k_ptrs, k_strides, k_consts = kernel_args(k_cache, "K")
    v_ptrs, v_strides, v_consts = kernel_args(v_cache, "V")
    _prefill_kernel[(num_slots * num_heads,)](
        q, *k_ptrs, *v_ptrs, cu_seqlens_q, seq_lens, block_tables, out, *pruned_args(pruned, q),
        out if lse is None else lse, scale * LOG2E,
        num_seqs, num_slots, *pruned_strides(pruned),
        *q.stride(), *k_strides, *v_strides, block_tables.stride(0), *out.stride(),
        NUM_HEADS=num_heads, GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        DOT_FP32=dot_fp32, DOT_PRECISION=dot_precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        SPARSE=pruned is not None, WRITE_LSE=lse is not None, **k_consts, **v_consts)
    return out


def pruned_args(pruned: torch.Tensor | None, placeholder: torch.Tensor) -> tuple[torch.Tensor]:
    """The keep-mask pointer of a kernel launch; without sparsity any tensor stands in (SPARSE=False never reads it)."""
    return (placeholder if pruned is None else pruned,)


def pruned_strides(pruned: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if pruned is None else pruned.stride()


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor | PagedCache, v_cache: torch.Tensor | PagedCache,
                      cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                      max_query_len: int, out: torch.Tensor | None = None, pruned: torch.Tensor | None = None,
                      importance: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel on a GPU, the reference elsewhere. With importance (--kv-sparsity), the attention also
    writes each query's log2-sum-exp and a second kernel adds the tokens' attention mass from it."""
    if not q.is_cuda:
        return prefill_attention_ref(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale,
                                     max_query_len, out, pruned, importance)
    from ccserve.kernels.attention_importance import add_prefill_importance     # it builds on this module
    lse = None if importance is None else torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    out = prefill_attention_triton(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale,
                                   max_query_len, out, pruned=pruned, lse=lse)
    if importance is not None:
        add_prefill_importance(q, k_cache, cu_seqlens_q, seq_lens, block_tables, scale, lse, importance, pruned)
    return out
