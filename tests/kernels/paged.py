"""Shared inputs for the paged-attention kernel tests."""
import torch

TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def shuffled_tables(seq_lens: list[int], block_size: int) -> tuple[torch.Tensor, int]:
    """Block tables that scatter each sequence over shuffled, non-contiguous blocks, and the pool size."""
    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 3
    ids = torch.randperm(num_blocks)
    tables = torch.zeros(len(seq_lens), max(per_seq) + 1, dtype=torch.int32)
    start = 0
    for s, n in enumerate(per_seq):
        tables[s, :n] = ids[start:start + n]
        start += n
    return tables, num_blocks


def paged_cache(seq_lens: list[int], num_kv_heads: int, block_size: int, head_dim: int,
                k_dtype: torch.dtype, v_dtype: torch.dtype):
    """Random K/V caches and block tables that scatter each sequence over shuffled, non-contiguous blocks."""
    tables, num_blocks = shuffled_tables(seq_lens, block_size)
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    return torch.randn(shape).to(k_dtype), torch.randn(shape).to(v_dtype), tables
