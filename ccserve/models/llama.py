"""The Llama decoder and its close relatives: Llama 2/3, Mistral, Qwen2/2.5, Qwen3.

They differ only in a few switches (Qwen2 adds q/k/v biases, Qwen3 RMS-normalizes q and k per head), so one
implementation serves all; each architecture is a subclass that sets its switches. Forward takes the flattened
tokens of every sequence in a step ([T]) and the attention metadata that says where each one's KV lives.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from ccserve.layers.activation import SiluAndMul
from ccserve.layers.attention import Attention, AttentionMetadata
from ccserve.layers.embedding import Embedding
from ccserve.layers.linear import Linear, MergedLinear
from ccserve.layers.norm import RMSNorm
from ccserve.layers.rotary import RotaryEmbedding, get_rope
from ccserve.models.loader import load_params

# HF checkpoint projection -> (our fused parameter, shard index within it).
_PACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
# Buffers some old checkpoints saved; we compute our own.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def head_dim(hf_config: PretrainedConfig) -> int:
    """Qwen3 and Mistral-Nemo set head_dim != hidden_size / heads; older configs leave it out or null."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, cfg: PretrainedConfig, rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool,
                 qk_norm: bool) -> None:
        super().__init__()
        d = head_dim(cfg)
        heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.q_size, self.kv_size = heads * d, kv_heads * d
        self.qkv_proj = MergedLinear(cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if qk_norm else None
        self.rotary_emb = rotary
        self.attn = Attention(heads, kv_heads, d, scale=d ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            d = self.attn.head_dim
            q = self.q_norm(q.view(q.shape[0], -1, d)).view(-1, self.q_size)
            k = self.k_norm(k.view(k.shape[0], -1, d)).view(-1, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v.contiguous(), meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: PretrainedConfig) -> None:
        super().__init__()
        bias = getattr(cfg, "mlp_bias", False)
        self.gate_up_proj = MergedLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=bias)
        self.act = SiluAndMul()
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: PretrainedConfig, rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool,
                 qk_norm: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary, qkv_bias, o_bias, qk_norm)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, residual stream before it): the next norm adds them."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: PretrainedConfig, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        rotary = get_rope(cfg, head_dim(cfg))  # one cos/sin cache shared by all layers
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, rotary, qkv_bias, o_bias, qk_norm)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Llama 2/3 (attention_bias and mlp_bias honored), and the base of the architectures below."""

    qkv_bias_always = False  # Qwen2: q/k/v biases whatever attention_bias says, none on o_proj
    qk_norm = False  # Qwen3: RMSNorm over each head of q and k before rotary

    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        attention_bias = getattr(hf_config, "attention_bias", False)
        self.model = LlamaModel(hf_config, qkv_bias=self.qkv_bias_always or attention_bias, o_bias=attention_bias,
                                qk_norm=self.qk_norm)
        self.tie_word_embeddings = getattr(hf_config, "tie_word_embeddings", False)
        # Tied: the embedding table is the head (no second vocab x hidden matrix is ever allocated).
        self.lm_head = (self.model.embed_tokens if self.tie_word_embeddings
                        else Linear(hf_config.hidden_size, hf_config.vocab_size))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden_size]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Only the rows that sample reach here, so the [N, vocab] matmul stays small; float32 for the sampler."""
        return F.linear(hidden_states, self.lm_head.weight).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors; q/k/v land in qkv_proj and gate/up in gate_up_proj."""
        load_params(self, weights, self._param_for)

    def _param_for(self, name: str) -> tuple[str, int | None] | None:
        """Our parameter (and shard) for a checkpoint tensor name, or None for tensors we do not use."""
        if name.endswith(_IGNORED_SUFFIXES) or (self.tie_word_embeddings and name == "lm_head.weight"):
            return None
        for hf_name, (ours, shard) in _PACKED.items():
            if f".{hf_name}." in name:
                return name.replace(f".{hf_name}.", f".{ours}."), shard
        return name, None


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is Llama with a sliding window; the loader accepts it only where the window never slides
    (max_model_len <= sliding_window, or no window as from v0.2 on)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5: Llama with q/k/v biases. Sliding-window layers (use_sliding_window) are refused by
    the loader."""

    qkv_bias_always = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 (dense): Llama with per-head RMSNorm of q and k, and head_dim set apart from hidden_size."""

    qk_norm = True
