import pytest
import torch

from ccserve.kernels.rotary import rotary_ref, rotary_triton
from ccserve.layers.rotary import RotaryEmbedding

MAX_POS = 256
# The CPU interpreter rounds to bf16/fp16 toward zero, not to nearest: allow 1-2 ulp there.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2 ** -6)}


def _cos_sin(head_dim: int) -> torch.Tensor:
    return RotaryEmbedding(head_dim, MAX_POS, {"rope_type": "default", "rope_theta": 10000.0}).cos_sin


@pytest.mark.parametrize("heads,kv_heads,head_dim,dtype", [
    (4, 2, 64, torch.float32),
    (3, 1, 80, torch.bfloat16),    # MQA, head_dim whose half (40) is not a power of two
    (8, 2, 128, torch.float16),
    (40, 8, 64, torch.float32),    # more heads than one tile holds
])
def test_rotary_rotates_fused_qkv_views_in_place(heads, kv_heads, head_dim, dtype):
    torch.manual_seed(0)
    tokens = 5
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(tokens, q_size + 2 * kv_size).to(dtype)
    expect = qkv.clone()
    positions = torch.randint(0, MAX_POS, (tokens,))
    positions[0] = 0
    cos_sin = _cos_sin(head_dim)

    def views(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, _ = t.split([q_size, kv_size, kv_size], dim=-1)   # strided: row stride q_size + 2 * kv_size
        return q, k

    rotary_ref(positions, *views(expect), cos_sin, head_dim)
    before = qkv.clone()
    rotary_triton(positions, *views(qkv), cos_sin, head_dim)

    torch.testing.assert_close(qkv, expect, **TOL[dtype])
    assert torch.equal(qkv[:, q_size + kv_size:], before[:, q_size + kv_size:])   # v untouched
    assert not torch.equal(qkv[1:, :q_size], before[1:, :q_size])                 # rotated, in place
    assert torch.equal(qkv[0], before[0])                                         # position 0: identity


def test_rotary_reference_is_the_layers_old_rotation():
    """rotary_ref rotates in place exactly as the layer's out-of-place float32 rotation did."""
    torch.manual_seed(1)
    head_dim, tokens = 32, 4
    cos_sin = _cos_sin(head_dim)
    positions = torch.tensor([3, 0, 17, 255])
    q = torch.randn(tokens, 2 * head_dim).to(torch.bfloat16)
    k = torch.randn(tokens, head_dim).to(torch.bfloat16)
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
    expect = []
    for x in (q, k):
        x1, x2 = x.view(tokens, -1, head_dim).float().chunk(2, dim=-1)
        expect.append(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype).view(x.shape))
    rotary_ref(positions, q, k, cos_sin, head_dim)
    assert torch.equal(q, expect[0]) and torch.equal(k, expect[1])
