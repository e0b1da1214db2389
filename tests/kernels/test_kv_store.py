import pytest
import torch

from ccserve.kernels.kv_store import store_kv_ref, store_kv_triton


@pytest.mark.parametrize("num_kv_heads,head_dim,block_size,k_dtype,v_dtype", [
    (2, 32, 16, torch.float32, torch.float32),
    (1, 24, 8, torch.float16, torch.bfloat16),      # MQA, non-power-of-two dim, K and V of different dtypes
    (3, 64, 32, torch.bfloat16, torch.bfloat16),
])
def test_store_kv_matches_reference(num_kv_heads, head_dim, block_size, k_dtype, v_dtype):
    torch.manual_seed(0)
    num_tokens, num_blocks = 11, 6
    # key/value as strided slices of one fused projection output, as the attention layer passes them
    kv = torch.randn(num_tokens, 2, num_kv_heads, head_dim)
    key, value = kv[:, 0], kv[:, 1]
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[[2, 7]] = -1
    k_cache = torch.randn(num_blocks, num_kv_heads, block_size, head_dim).to(k_dtype)
    v_cache = torch.randn(num_blocks, num_kv_heads, block_size, head_dim).to(v_dtype)
    k_expect, v_expect = k_cache.clone(), v_cache.clone()

    store_kv_ref(key, value, k_expect, v_expect, slots)
    store_kv_triton(key, value, k_cache, v_cache, slots)

    # same values written, every other slot (incl. those of the -1 tokens) untouched; exact but for bf16,
    # which the CPU interpreter rounds toward zero instead of to nearest (1 ulp)
    for got, expect in ((k_cache, k_expect), (v_cache, v_expect)):
        rtol = 2 ** -7 if got.dtype == torch.bfloat16 else 0
        torch.testing.assert_close(got, expect, rtol=rtol, atol=0)


def test_store_kv_all_padding_writes_nothing():
    k_cache = torch.randn(2, 2, 16, 32)
    v_cache = torch.randn(2, 2, 16, 32)
    before = k_cache.clone(), v_cache.clone()
    key = torch.randn(4, 2, 32)
    store_kv_triton(key, key, k_cache, v_cache, torch.full((4,), -1, dtype=torch.int64))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
