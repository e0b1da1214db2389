import pytest
import torch

from ccserve.kernels.prefill_attention import PrefillConfig, prefill_attention_ref, prefill_attention_triton
from tests.kernels.paged import TOLERANCE, paged_cache

SMALL_TILES = PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,dtype,k_dtype,v_dtype,config", [
    (4, 2, 32, 16, torch.float32, torch.float32, torch.float32, SMALL_TILES),
    (2, 2, 16, 8, torch.float32, torch.float32, torch.float32, SMALL_TILES),        # MHA
    (4, 1, 24, 32, torch.float32, torch.float32, torch.float32, SMALL_TILES),       # MQA, D not a power of two
    (4, 2, 64, 16, torch.float16, torch.float16, torch.float16, None),              # default tiles
    (6, 2, 32, 16, torch.bfloat16, torch.bfloat16, torch.bfloat16, SMALL_TILES),
    (4, 2, 32, 16, torch.float32, torch.float16, torch.bfloat16, SMALL_TILES),      # K, V dtypes differ from q
])
def test_prefill_matches_reference(num_heads, num_kv_heads, head_dim, block_size, dtype, k_dtype, v_dtype, config):
    torch.manual_seed(0)
    # (query tokens, cached context before them): fresh prompts and chunked-prefill continuations
    chunks = [(37, 0), (20, 50), (1, 16), (33, 7), (16, 0)]
    seq_lens = [q_len + ctx for q_len, ctx in chunks]
    k_cache, v_cache, tables = paged_cache(seq_lens, num_kv_heads, block_size, head_dim, k_dtype, v_dtype)
    cu_seqlens = torch.tensor([0] + [q_len for q_len, _ in chunks], dtype=torch.int32).cumsum(0).to(torch.int32)
    num_tokens = int(cu_seqlens[-1])
    # q as a strided slice of a fused QKV-like buffer
    q = torch.randn(num_tokens, num_heads + 2, head_dim).to(dtype)[:, :num_heads]
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = head_dim ** -0.5
    max_q = max(q_len for q_len, _ in chunks)

    expect = prefill_attention_ref(q, k_cache, v_cache, cu_seqlens, lens, tables, scale, max_q)
    out = torch.full((num_tokens, num_heads, head_dim), float("nan"), dtype=dtype)
    got = prefill_attention_triton(q, k_cache, v_cache, cu_seqlens, lens, tables, scale, max_q, out=out,
                                   config=config)

    assert got is out
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expect.float(), atol=tol, rtol=tol)


def test_prefill_many_short_sequences():
    """More than 64 sequences (the program -> sequence lookup reads them 64 at a time), incl. 1-token chunks."""
    torch.manual_seed(1)
    chunks = [(1 + i % 5, (7 * i) % 23) for i in range(70)]
    seq_lens = [q_len + ctx for q_len, ctx in chunks]
    k_cache, v_cache, tables = paged_cache(seq_lens, 1, 8, 16, torch.float32, torch.float32)
    cu_seqlens = torch.tensor([0] + [q_len for q_len, _ in chunks]).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_seqlens[-1]), 2, 16)
    lens = torch.tensor(seq_lens, dtype=torch.int32)

    expect = prefill_attention_ref(q, k_cache, v_cache, cu_seqlens, lens, tables, 0.25, 5)
    got = prefill_attention_triton(q, k_cache, v_cache, cu_seqlens, lens, tables, 0.25, 5,
                                   out=torch.full_like(q, float("nan")), config=SMALL_TILES)

    torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)
