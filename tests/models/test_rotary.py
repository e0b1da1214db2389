"""Our cos/sin cache against HF's rotary embedding for each rope type real checkpoints use."""
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ccserve.layers.rotary import RotaryEmbedding, get_rope, rope_parameters

HEAD_DIM, MAX_POS = 64, 4096


def _config(rope_scaling: dict | None, **kw) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, head_dim=HEAD_DIM,
                                    max_position_embeddings=MAX_POS, rope_theta=500000.0,
                                    rope_scaling=rope_scaling, **kw)


@pytest.mark.parametrize("scaling", [
    None,
    dict(rope_type="linear", factor=4.0),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=1024),  # Llama-3.1 with a shorter original window
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024),  # Qwen2.5 long context
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024, beta_fast=16, beta_slow=2,
         mscale=1.0, mscale_all_dim=0.5),
    dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=1024, attention_factor=1.2, truncate=False),
], ids=lambda s: "default" if s is None else "-".join(map(str, s.values()))[:40])
def test_cos_sin_match_hf(scaling):
    config = _config(scaling)
    positions = torch.tensor([[0, 1, 7, 100, 1023, 1024, 2500, MAX_POS - 1]])
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = get_rope(config, HEAD_DIM).cos_sin[positions[0]].chunk(2, dim=-1)
    torch.testing.assert_close(cos, hf_cos[0, :, :HEAD_DIM // 2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin, hf_sin[0, :, :HEAD_DIM // 2], atol=1e-5, rtol=1e-5)


def test_legacy_rope_scaling_fields_are_read():
    """Configs from before transformers 5 carry rope_theta and rope_scaling {"type": ...} at the top level."""
    legacy = SimpleNamespace(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0})
    assert rope_parameters(legacy) == {"type": "linear", "factor": 2.0, "rope_theta": 1e6, "rope_type": "linear"}
    assert rope_parameters(SimpleNamespace())["rope_type"] == "default"


def test_rotation_keeps_norms_and_shapes():
    rope = RotaryEmbedding(16, 64, {"rope_type": "default", "rope_theta": 10000.0})
    q, k = torch.randn(5, 4 * 16), torch.randn(5, 2 * 16)
    rq, rk = rope(torch.arange(5), q.clone(), k.clone())
    assert rq.shape == q.shape and rk.shape == k.shape
    torch.testing.assert_close(rq.view(5, 4, 16).norm(dim=-1), q.view(5, 4, 16).norm(dim=-1))
    torch.testing.assert_close(rq[0], q[0])  # position 0 does not rotate


@pytest.mark.parametrize("params,message", [
    ({"rope_type": "longrope", "rope_theta": 1e4}, "rope type 'longrope'"),
    ({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unsupported_rope_settings_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        RotaryEmbedding(16, 64, params)
