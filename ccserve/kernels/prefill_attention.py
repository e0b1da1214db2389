"""Causal attention of prefill (and chunked-prefill) queries over the paged KV cache."""
from __future__ import annotations

import torch


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len cached tokens of one sequence as [seq_len, Hk, D]."""
    block_size = cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]            # [nb, Hk, bs, D]
    return blocks.transpose(1, 2).reshape(-1, cache.shape[1], cache.shape[3])[:seq_len]


def prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                          scale: float, max_query_len: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, H, D]. Query i of sequence s sits at position seq_lens[s] - q_len_s + i and sees keys <= it."""
    out = torch.empty_like(q) if out is None else out
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[1]
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
        probs = torch.softmax(scores, dim=-1)
        out[starts[s]:starts[s + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out


def prefill_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale, max_query_len, out=None):
    return prefill_attention_ref(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale,
                                 max_query_len, out)
