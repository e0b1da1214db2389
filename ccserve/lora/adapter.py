"""One LoRA adapter read from a PEFT directory (adapter_config.json + adapter_model.safetensors) into host memory.

Adapters are read once, at start, from the directories the configuration names (`--lora NAME=DIR`), so the set of
adapters a node can run is fixed by its configuration, never by a request. What PEFT can express but this engine
does not compute (DoRA, trained biases, extra trained modules, per-module ranks) is refused here, with the reason,
instead of serving something other than what was trained.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
SUFFIXES = {".lora_A.weight": 0, ".lora_B.weight": 1}
BASE_SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                   "num_key_value_heads", "vocab_size")


@dataclass
class LoraAdapter:
    """An adapter's weights on the host: for each trained projection (its HF module name, e.g.
    model.layers.0.self_attn.q_proj), A [rank, in] and B [out, rank] with the LoRA scaling folded into B."""

    name: str
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


def load_adapter(name: str, path: str, max_rank: int, base_model_dir: str, dtype: torch.dtype) -> LoraAdapter:
    """Read and check the adapter `name` at `path`; ValueError says what is wrong and what to do."""
    where = f"LoRA adapter {name!r} ({path})"
    config = _read_config(where, Path(path))
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}: adapter_config.json has no valid rank 'r' (got {rank!r})")
    if rank > max_rank:
        raise ValueError(f"{where} has rank {rank}, above --max-lora-rank {max_rank}: raise --max-lora-rank to at "
                         f"least {rank}")
    _check_supported(where, config)
    _check_base_model(where, config.get("base_model_name_or_path"), base_model_dir)
    alpha = config.get("lora_alpha", rank)
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraAdapter(name, rank, _read_weights(where, Path(path) / WEIGHTS_FILE, rank, scale, dtype))


def _read_config(where: str, path: Path) -> dict:
    if not path.is_dir():
        raise ValueError(f"{where}: no such directory")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"{where} is not a LoRA adapter: it has no {CONFIG_FILE} (expected a PEFT adapter "
                         f"directory with {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: {CONFIG_FILE} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise ValueError(f"{where} is not a LoRA adapter: {CONFIG_FILE} has peft_type {kind!r}, expected 'LORA'")
    if not (path / WEIGHTS_FILE).is_file():
        raise ValueError(f"{where} has no {WEIGHTS_FILE}: save the adapter with safetensors "
                         "(PEFT's save_pretrained does by default)")
    return config


def _check_supported(where: str, config: dict) -> None:
    """Refuse the PEFT options whose computation is not y += (x A^T) B^T * scale on the listed projections."""
    refused = {"use_dora": "DoRA", "modules_to_save": "fully trained extra modules (modules_to_save)",
               "rank_pattern": "per-module ranks (rank_pattern)", "alpha_pattern": "per-module alphas (alpha_pattern)"}
    for key, what in refused.items():
        if config.get(key):
            raise ValueError(f"{where} uses {what}, which ccserve does not serve: use a plain LoRA adapter")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where} trains biases (bias={config['bias']!r}), which ccserve does not serve: "
                         "use bias='none'")


def _check_base_model(where: str, base: str | None, model_dir: str) -> None:
    """When the adapter names a base model directory present on this machine, its shape must be ours. (A hub
    name cannot be checked offline; the weight shapes are checked against the model in any case.)"""
    if not base or not (Path(base) / "config.json").is_file():
        return
    theirs, ours = (json.loads((Path(d) / "config.json").read_text()) for d in (base, model_dir))
    for key in BASE_SHAPE_KEYS:
        if theirs.get(key) != ours.get(key):
            raise ValueError(f"{where} was trained on another base model: its base_model_name_or_path {base!r} has "
                             f"{key} {theirs.get(key)!r}, the served model {ours.get(key)!r}")


def _read_weights(where: str, file: Path, rank: int, scale: float, dtype: torch.dtype
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    parts: dict[str, list[torch.Tensor | None]] = {}
    for key, tensor in load_file(str(file)).items():
        module, which = _split_key(where, key)
        parts.setdefault(module, [None, None])[which] = tensor
    if not parts:
        raise ValueError(f"{where}: {WEIGHTS_FILE} holds no LoRA weights")
    weights = {}
    for module, (a, b) in parts.items():
        if a is None or b is None:
            raise ValueError(f"{where}: {module} has lora_{'A' if a is None else 'B'} missing")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"{where}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, not of "
                             f"rank {rank} as adapter_config.json says")
        weights[module] = (a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous())
    return weights


def _split_key(where: str, key: str) -> tuple[str, int]:
    """'base_model.model.<module>.lora_A.weight' -> (<module>, 0)."""
    for suffix, which in SUFFIXES.items():
        if key.startswith(PREFIX) and key.endswith(suffix):
            return key[len(PREFIX):-len(suffix)], which
    raise ValueError(f"{where}: tensor {key!r} is not a LoRA A/B weight (ccserve serves plain LoRA adapters "
                     "saved by PEFT)")
