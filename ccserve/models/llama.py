"""The Llama decoder and its close relatives: Llama 2/3, Mistral, Qwen2/2.5, Qwen3.

They differ only in a few switches (Qwen2 adds q/k/v biases, Qwen3 RMS-normalizes q and k per head), so one
implementation serves all; each architecture is a subclass that sets its switches. Forward takes the flattened
tokens of every sequence in a step ([T]) and the attention metadata that says where each one's KV lives.

Under tensor parallelism (tp.size > 1) each rank holds a slice of the heads (and of their KV cache), a slice of
the MLP's intermediate features and a slice of the vocabulary; norms and rotary are replicated. Each decoder
layer then costs two all-reduces (after o_proj and after down_proj).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from ccserve.distributed.group import SINGLE, TensorParallelGroup
from ccserve.layers.activation import SiluAndMul
from ccserve.layers.attention import Attention, AttentionMetadata
from ccserve.layers.norm import RMSNorm
from ccserve.layers.parallel_linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ccserve.layers.rotary import RotaryEmbedding, get_rope
from ccserve.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
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
                 qk_norm: bool, tp: TensorParallelGroup) -> None:
        super().__init__()
        d = head_dim(cfg)
        heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, heads, kv_heads, tp, bias=qkv_bias)
        # This rank's share: the heads it computes and the KV heads it caches.
        self.q_size, self.kv_size, _ = self.qkv_proj.output_sizes
        self.o_proj = RowParallelLinear(heads * d, cfg.hidden_size, tp, bias=o_bias,
                                        what="the attention heads' features (num_attention_heads * head_dim)")
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if qk_norm else None
        self.rotary_emb = rotary
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, d, scale=d ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            d = self.attn.head_dim
            q = self.q_norm(q.view(q.shape[0], -1, d)).view(-1, self.q_size)
            k = self.k_norm(k.view(k.shape[0], -1, d)).view(-1, self.kv_size)
        return self.o_proj(self.attn(q, k, v, meta, positions, self.rotary_emb))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: PretrainedConfig, tp: TensorParallelGroup) -> None:
        super().__init__()
        bias = getattr(cfg, "mlp_bias", False)
        what = "the MLP's intermediate_size"
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, tp,
                                                       bias=bias, what=what)
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, tp, bias=bias, what=what)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: PretrainedConfig, rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool,
                 qk_norm: bool, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary, qkv_bias, o_bias, qk_norm, tp)
        self.mlp = LlamaMLP(cfg, tp)
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
    def __init__(self, cfg: PretrainedConfig, qkv_bias: bool, o_bias: bool, qk_norm: bool,
                 tp: TensorParallelGroup) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        rotary = get_rope(cfg, head_dim(cfg))  # one cos/sin cache shared by all layers
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, rotary, qkv_bias, o_bias, qk_norm, tp)
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

    def __init__(self, hf_config: PretrainedConfig, tp: TensorParallelGroup = SINGLE) -> None:
        super().__init__()
        attention_bias = getattr(hf_config, "attention_bias", False)
        self.model = LlamaModel(hf_config, qkv_bias=self.qkv_bias_always or attention_bias, o_bias=attention_bias,
                                qk_norm=self.qk_norm, tp=tp)
        self.tie_word_embeddings = getattr(hf_config, "tie_word_embeddings", False)
        # Tied: the embedding table is the head (no second vocab x hidden matrix is ever allocated).
        self.lm_head = (self.model.embed_tokens if self.tie_word_embeddings
                        else ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size, tp))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden_size]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Only the rows that sample reach here, so the [N, vocab] matmul stays small; float32 for the sampler,
        the whole vocabulary on every rank."""
        return self.lm_head.logits(hidden_states)

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
