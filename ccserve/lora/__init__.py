"""Multi-LoRA: adapters read at start into host memory (adapter.py), LoRA wrapped into the model's linears
(attach.py) and a GPU adapter cache that moves adapters through the encrypted channel (cache.py). docs/lora.md."""
from __future__ import annotations

import torch
from torch import nn

from ccserve.config import EngineConfig
from ccserve.layers.lora import LoraIndex
from ccserve.lora.adapter import LoraAdapter, load_adapter
from ccserve.lora.attach import attach_lora
from ccserve.lora.cache import AdapterCache

__all__ = ["AdapterCache", "LoraAdapter", "LoraIndex", "build_lora"]


def build_lora(config: EngineConfig, model: nn.Module, max_tokens: int, device: torch.device, dtype: torch.dtype
               ) -> tuple[AdapterCache, LoraIndex]:
    """Read every configured adapter, wrap the model's trained linears, and give back the adapter cache and the
    token -> slot index the runner sets each step (both on `device`, the compute device, which holds the stacks
    even where streamed weights rest on the host). Errors name the adapter and what to fix."""
    adapters = [load_adapter(name, path, config.max_lora_rank, config.model, dtype)
                for name, path in config.lora_adapters.items()]
    index = LoraIndex(max_tokens, device)
    targets = attach_lora(model, adapters, min(config.max_loras, len(adapters)), index, device, dtype)
    return AdapterCache(adapters, targets, device, config.cc, config.cc_threads), index
