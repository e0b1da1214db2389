import pytest
import torch

from ccserve.kernels.decode_attention import (DecodeConfig, decode_attention_ref, decode_attention_triton,
                                              num_decode_splits)
from tests.kernels.paged import TOLERANCE, paged_cache



@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,dtype,k_dtype,v_dtype,num_splits", [
    (4, 2, 32, 16, torch.float32, torch.float32, torch.float32, 1),
    (4, 2, 32, 16, torch.float32, torch.float32, torch.float32, 4),        # split-K + reduce
    (2, 2, 16, 8, torch.float32, torch.float32, torch.float32, 2),         # MHA
    (8, 1, 24, 32, torch.float32, torch.float32, torch.float32, 4),        # MQA, D not a power of two
    (4, 2, 64, 16, torch.float16, torch.float16, torch.float16, None),     # heuristic picks the splits
    (6, 2, 32, 64, torch.bfloat16, torch.bfloat16, torch.bfloat16, 2),
    (4, 2, 32, 16, torch.float32, torch.float16, torch.bfloat16, 2),       # K, V dtypes differ from q
])
def test_decode_matches_reference(num_heads, num_kv_heads, head_dim, block_size, dtype, k_dtype, v_dtype,
                                  num_splits):
    torch.manual_seed(0)
    seq_lens = [37, 0, 200, 1, 64, 0]          # 0: padded batch rows of a CUDA graph
    k_cache, v_cache, tables = paged_cache([max(n, 1) for n in seq_lens], num_kv_heads, block_size, head_dim,
                                           k_dtype, v_dtype)
    q = torch.randn(len(seq_lens), num_heads + 2, head_dim).to(dtype)[:, 2:]    # strided, like a QKV slice
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = head_dim ** -0.5

    expect = decode_attention_ref(q, k_cache, v_cache, lens, tables, scale)
    out = torch.full((len(seq_lens), num_heads, head_dim), float("nan"), dtype=dtype)
    got = decode_attention_triton(q, k_cache, v_cache, lens, tables, scale, out=out, num_splits=num_splits,
                                  config=DecodeConfig(block_n=16))

    assert got is out
    assert torch.all(got[lens == 0] == 0)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expect.float(), atol=tol, rtol=tol)


def test_split_heuristic_uses_only_shapes():
    # H100 (132 SMs), Llama-3-8B (8 KV heads): batch 1 at long context is split, big batches are not
    assert num_decode_splits(batch=1, num_kv_heads=8, max_context=4096, num_sms=132) == 16
    assert num_decode_splits(batch=64, num_kv_heads=8, max_context=4096, num_sms=132) == 1
    assert num_decode_splits(batch=1, num_kv_heads=8, max_context=128, num_sms=132) == 1
    assert num_decode_splits(batch=1, num_kv_heads=1, max_context=1 << 20, num_sms=132) == 64
