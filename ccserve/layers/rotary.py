"""Rotary position embedding (NeoX / HF "rotate_half" layout) with the rope scalings of real checkpoints.

cos and sin are precomputed for every position up to max_position_embeddings, so a step only gathers rows by
position: prefill, chunked prefill and decode need no per-step trigonometry, and CUDA graphs see a fixed buffer.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ccserve.kernels.rotary import rotary

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_parameters(hf_config) -> dict:
    """The rope settings of a config: transformers 5 keeps them (theta included) in rope_parameters, older
    configs in rope_theta plus rope_scaling, whose type key was once called "type"."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths are divided by factor, short ones kept, the band between interpolated."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_mid, mid, scaled)


def _yarn_inv_freq(inv_freq: torch.Tensor, p: dict, dim: int, base: float, max_position: int
                   ) -> tuple[torch.Tensor, float]:
    """YaRN (Qwen long context): interpolate low frequencies, keep high ones, ramp between; scale cos/sin."""
    original = p.get("original_max_position_embeddings") or max_position
    factor = p.get("factor") or max_position / original
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return inv_freq, attention_factor


def _inv_freq(params: dict, head_dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotated pairs and the factor applied to cos/sin (YaRN's mscale, else 1)."""
    rope_type, base = params["rope_type"], params["rope_theta"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} (config.json rope_scaling / rope_parameters) is not supported; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 (config.json) is not supported: every head dimension must rotate")
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if rope_type == "linear":
        return inv_freq / params["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, params, head_dim, base, max_position)
    # "dynamic" NTK changes nothing up to max_position_embeddings, the longest context we cache.
    return inv_freq, 1.0


class RotaryEmbedding(nn.Module):
    """Rotates q and k by their positions, in place: they are slices of the fused qkv output, rotated where they
    lie with no copy (one Triton kernel on CUDA). The cache is float32 and the rotation runs in float32: position
    precision matters at long contexts, and the cost is negligible next to the projections."""

    def __init__(self, head_dim: int, max_position: int, params: dict) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq, scale = _inv_freq(params, head_dim, max_position)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1) * scale, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; q [T, H*D], k [T, Hk*D] (rows may be strided) -> q and k themselves, rotated."""
        rotary(positions, q, k, self.cos_sin, self.head_dim)
        return q, k


def get_rope(hf_config, head_dim: int) -> RotaryEmbedding:
    """The rotary embedding a Llama-family config asks for, cached up to its max_position_embeddings."""
    return RotaryEmbedding(head_dim, hf_config.max_position_embeddings, rope_parameters(hf_config))
