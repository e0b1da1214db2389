"""Attention of one new query per sequence over its paged KV cache (the decode step)."""
from __future__ import annotations

import torch

from ccserve.kernels.prefill_attention import gather_kv


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                         block_tables: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, H, D]; sequence b attends to its first seq_lens[b] cached tokens (0 gives zeros: padding)."""
    out = torch.empty_like(q) if out is None else out
    group = q.shape[1] // k_cache.shape[1]
    for b, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            out[b] = 0
            continue
        k = gather_kv(k_cache, block_tables[b], seq_len).float().repeat_interleave(group, dim=1)
        v = gather_kv(v_cache, block_tables[b], seq_len).float().repeat_interleave(group, dim=1)
        probs = torch.softmax(torch.einsum("hd,khd->hk", q[b].float(), k) * scale, dim=-1)
        out[b] = torch.einsum("hk,khd->hd", probs, v).to(out.dtype)
    return out


def decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale, out=None):
    return decode_attention_ref(q, k_cache, v_cache, seq_lens, block_tables, scale, out)
