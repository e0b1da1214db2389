"""OPT (Meta, 2022): learned positions, LayerNorm, ReLU MLP, biases everywhere, tied LM head.

Two variants exist: pre-LN (125m, 1.3b and up) and post-LN with a narrower word embedding projected in and out
(350m: do_layer_norm_before false, word_embed_proj_dim 512 < hidden_size 1024).

Under tensor parallelism the heads, fc1/fc2 and the word embedding / LM head are sharded; the learned positions,
LayerNorms and the 350m projections in and out are small and replicated.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from ccserve.distributed.group import SINGLE, TensorParallelGroup
from ccserve.layers.attention import Attention, AttentionMetadata
from ccserve.layers.embedding import Embedding
from ccserve.layers.linear import Linear
from ccserve.layers.parallel_linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ccserve.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from ccserve.models.loader import load_params

POSITION_OFFSET = 2  # OPT's position table has two extra leading rows (a fairseq padding legacy)
_PACKED = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


class OPTAttention(nn.Module):
    def __init__(self, cfg: PretrainedConfig, tp: TensorParallelGroup) -> None:
        super().__init__()
        hidden, heads = cfg.hidden_size, cfg.num_attention_heads
        d = hidden // heads
        self.qkv_proj = QKVParallelLinear(hidden, d, heads, heads, tp, bias=cfg.enable_bias)
        self.out_proj = RowParallelLinear(hidden, hidden, tp, bias=cfg.enable_bias)
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, d, scale=d ** -0.5)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        return self.out_proj(self.attn(q, k, v, meta))


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: PretrainedConfig, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.pre_norm = cfg.do_layer_norm_before
        affine = cfg.layer_norm_elementwise_affine
        self.self_attn = OPTAttention(cfg, tp)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine)
        what = "ffn_dim"
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_dim, tp, bias=cfg.enable_bias, what=what)
        self.fc2 = RowParallelLinear(cfg.ffn_dim, cfg.hidden_size, tp, bias=cfg.enable_bias, what=what)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x + self.self_attn(h, meta)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.fc2(F.relu(self.fc1(h)))
        return x if self.pre_norm else self.final_layer_norm(x)


class OPTDecoder(nn.Module):
    def __init__(self, cfg: PretrainedConfig, tp: TensorParallelGroup) -> None:
        super().__init__()
        proj_dim, hidden = cfg.word_embed_proj_dim, cfg.hidden_size
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, proj_dim, tp)
        self.embed_positions = Embedding(cfg.max_position_embeddings + POSITION_OFFSET, hidden)
        self.project_in = Linear(proj_dim, hidden) if proj_dim != hidden else None
        self.project_out = Linear(hidden, proj_dim) if proj_dim != hidden else None
        keep_final_norm = cfg.do_layer_norm_before and not getattr(cfg, "_remove_final_layer_norm", False)
        self.final_layer_norm = (nn.LayerNorm(hidden, elementwise_affine=cfg.layer_norm_elementwise_affine)
                                 if keep_final_norm else None)
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg, tp) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            x = layer(x, meta)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return x if self.project_out is None else self.project_out(x)


class OPTForCausalLM(nn.Module):
    """OPT; its LM head is the token embedding (tie_word_embeddings, true for all published checkpoints)."""

    def __init__(self, hf_config: PretrainedConfig, tp: TensorParallelGroup = SINGLE) -> None:
        super().__init__()
        if hf_config.activation_function != "relu":
            raise ValueError(f"OPT activation_function {hf_config.activation_function!r} (config.json) is not "
                             "supported; published OPT checkpoints use 'relu'")
        self.model = nn.ModuleDict({"decoder": OPTDecoder(hf_config, tp)})  # HF names: model.decoder.*
        self.tie_word_embeddings = getattr(hf_config, "tie_word_embeddings", True)
        self.lm_head = (self.model.decoder.embed_tokens if self.tie_word_embeddings
                        else ParallelLMHead(hf_config.vocab_size, hf_config.word_embed_proj_dim, tp))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> [T, word_embed_proj_dim] (= hidden_size except for 350m)."""
        return self.model.decoder(input_ids, positions, meta)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden_states)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.decoder.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (with or without the "model." prefix that OPTModel checkpoints lack)."""
        load_params(self, weights, self._param_for)

    def _param_for(self, name: str) -> tuple[str, int | None] | None:
        if name == "lm_head.weight":
            return None if self.tie_word_embeddings else (name, None)
        if not name.startswith("model."):
            name = "model." + name
        for hf_name, shard in _PACKED.items():
            if f".{hf_name}." in name:
                return name.replace(f".{hf_name}.", ".qkv_proj."), shard
        return name, None
