"""Attention front-end: write this step's K/V into the paged cache, then attend over the cache.

Every query reads its keys and values from the paged cache (the new tokens are written there first), so
prefill, chunked prefill and decode share one view of memory. Decode sequences come first in a batch; they
go to the split-K decode kernel, the rest to the varlen prefill kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ccserve.kernels.decode_attention import decode_attention
from ccserve.kernels.kv_store import store_kv
from ccserve.kernels.prefill_attention import prefill_attention
from ccserve.kernels.rotary_store import rotary_store
from ccserve.layers.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """Where each token of one step writes K/V and which cached tokens each query reads.

    slot_mapping: [T] int64, block * block_size + offset of each token; -1 marks padding (not written).
    The first num_decode_tokens tokens are decodes (one query each); the rest are prefill chunks.
    decode_seq_lens / prefill_seq_lens: context length of each sequence including this step's tokens.
    block_tables: [S, max_blocks] int32 physical block ids (unused entries are 0 and never read).
    prefill_cu_seqlens_q: [P + 1] int32 offsets of each prefill's queries within the prefill tokens.
    """

    slot_mapping: torch.Tensor
    num_decode_tokens: int
    decode_seq_lens: torch.Tensor
    decode_block_tables: torch.Tensor
    prefill_cu_seqlens_q: torch.Tensor
    prefill_seq_lens: torch.Tensor
    prefill_block_tables: torch.Tensor
    max_prefill_query_len: int = 0

    @property
    def num_prefill_sequences(self) -> int:
        return self.prefill_seq_lens.shape[0]


class Attention(nn.Module):
    """Paged multi-head attention with grouped KV heads (GQA/MQA).

    The runner assigns k_cache / v_cache ([num_blocks, num_kv_heads, block_size, head_dim] each, possibly of
    different dtypes) after it has sized the cache; until then they are empty. Under --kv-sparsity it also assigns
    pruned / importance ([num_blocks, num_kv_heads, block_size]: which tokens each KV head no longer sees, and the
    attention mass each got, which the attention adds to; kv/sparsity.py); None without.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.pruned: torch.Tensor | None = None
        self.importance: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                positions: torch.Tensor | None = None, rotary: RotaryEmbedding | None = None) -> torch.Tensor:
        """q: [T, H*D], k/v: [T, Hk*D] (rows may be strided: slices of a fused qkv output) -> [T, H*D].

        With rotary, q and k are rotated by their positions first; for a model-dtype cache that and the cache
        write are one kernel (kernels/rotary_store.py), else rotation in place and then the (quantizing) store.
        """
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        plain_cache = isinstance(self.k_cache, torch.Tensor) and isinstance(self.v_cache, torch.Tensor)
        if rotary is not None and plain_cache:
            rotary_store(positions, q, k, v, rotary.cos_sin, self.k_cache, self.v_cache, meta.slot_mapping)
        else:
            if rotary is not None:
                rotary(positions, q, k)
            store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decode_tokens
        if nd:
            decode_attention(q[:nd], self.k_cache, self.v_cache, meta.decode_seq_lens,
                             meta.decode_block_tables, self.scale, out=out[:nd], pruned=self.pruned,
                             importance=self.importance)
        if q.shape[0] > nd:
            prefill_attention(q[nd:], self.k_cache, self.v_cache, meta.prefill_cu_seqlens_q,
                              meta.prefill_seq_lens, meta.prefill_block_tables, self.scale,
                              meta.max_prefill_query_len, out=out[nd:], pruned=self.pruned,
                              importance=self.importance)
        return out.view(-1, self.num_heads * self.head_dim)
