"""KV-cache memory: one key tensor and one value tensor for all layers, viewed per layer.

Layout [layers, blocks, kv_heads, block_size, head_dim]: within a block each head's tokens are contiguous,
so a kernel reads one (block, head) tile as a single run of memory, and per-head paging (each KV head its
own token count, for sparsity) can later split a block along the head axis without moving data. Keys and
values are separate tensors so that each can get its own dtype / bit width (KV quantization).
"""
from __future__ import annotations

import torch
from torch import nn


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, block_size: int, head_dim: int, num_blocks: int,
                 dtype: torch.dtype, device: torch.device, v_dtype: torch.dtype | None = None) -> None:
        self.num_blocks = num_blocks
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=v_dtype or dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def bind(self, attn_layers: list[nn.Module]) -> None:
        """Give each attention layer its views of the cache."""
        for i, layer in enumerate(attn_layers):
            layer.k_cache = self.k[i]
            layer.v_cache = self.v[i]

    def scrub(self, block_ids: list[int]) -> None:
        """Zero the given blocks in every layer, keys and values, in two batched kernels."""
        idx = torch.tensor(block_ids, dtype=torch.int64, device=self.k.device)
        self.k.index_fill_(1, idx, 0)
        self.v.index_fill_(1, idx, 0)
