"""Which model class serves which HF architecture (config.json's `architectures[0]`)."""
from __future__ import annotations

import importlib

from torch import nn
from transformers import PretrainedConfig

# architecture -> (module, class). Imported on first use: serving one model loads only its own code, and model
# modules can use the loader's helpers without an import cycle (loader -> registry -> model -> loader).
_MODELS = {
    "LlamaForCausalLM": ("ccserve.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("ccserve.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("ccserve.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("ccserve.models.llama", "Qwen3ForCausalLM"),
    "OPTForCausalLM": ("ccserve.models.opt", "OPTForCausalLM"),
}

SUPPORTED_ARCHITECTURES = tuple(_MODELS)


def get_model_class(hf_config: PretrainedConfig) -> type[nn.Module]:
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures or architectures[0] not in _MODELS:
        found = architectures[0] if architectures else "none (config.json has no 'architectures')"
        raise ValueError(f"model architecture {found} is not supported; supported architectures: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    module, name = _MODELS[architectures[0]]
    return getattr(importlib.import_module(module), name)
