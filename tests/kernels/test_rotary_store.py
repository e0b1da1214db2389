import pytest
import torch

from ccserve.kernels.rotary_store import rotary_store_ref, rotary_store_triton
from ccserve.layers.rotary import RotaryEmbedding

MAX_POS = 128


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,dtype", [
    (4, 2, 64, 16, torch.float32),
    (3, 1, 80, 8, torch.bfloat16),     # MQA, half head_dim (40) not a power of two
    (40, 8, 32, 16, torch.float32),    # more query heads than one tile holds
])
def test_rotary_store_matches_rotary_then_store(heads, kv_heads, head_dim, block_size, dtype):
    """q rotated in place and the cache written exactly as the two-kernel path does, from fused-qkv views;
    a padding token (slot -1) writes nothing; the cache slots of other tokens stay untouched."""
    torch.manual_seed(0)
    tokens, num_blocks = 6, 6
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(tokens, q_size + 2 * kv_size).to(dtype)
    positions = torch.randint(0, MAX_POS, (tokens,))
    slots = torch.tensor([3, 17, -1, 40, 41, 0])
    cos_sin = RotaryEmbedding(head_dim, MAX_POS, {"rope_type": "default", "rope_theta": 10000.0}).cos_sin
    caches = [torch.randn(num_blocks, kv_heads, block_size, head_dim).to(dtype) for _ in range(2)]

    def views(t: torch.Tensor):
        q, k, v = t.split([q_size, kv_size, kv_size], dim=-1)
        return [x.unflatten(-1, (-1, head_dim)) for x in (q, k, v)]

    expect_qkv, expect_k, expect_v = qkv.clone(), caches[0].clone(), caches[1].clone()
    rotary_store_ref(positions, *views(expect_qkv), cos_sin, expect_k, expect_v, slots)
    got_qkv, got_k, got_v = qkv.clone(), caches[0].clone(), caches[1].clone()
    rotary_store_triton(positions, *views(got_qkv), cos_sin, got_k, got_v, slots)

    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2 ** -6)
    torch.testing.assert_close(got_qkv[:, :q_size], expect_qkv[:, :q_size], **tol)
    torch.testing.assert_close(got_k, expect_k, **tol)
    torch.testing.assert_close(got_v, expect_v, **tol)
    assert torch.equal(got_qkv[:, q_size:], qkv[:, q_size:])    # k and v in the qkv output are left as they were
