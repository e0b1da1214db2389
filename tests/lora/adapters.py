"""Random PEFT LoRA adapters for the tiny models, saved as PEFT saves them (adapter_config.json +
adapter_model.safetensors), and HF PEFT's own greedy tokens as the reference."""
from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(model_dir: Path, out_dir: Path, rank: int = 8, seed: int = 0, targets: list[str] = TARGETS,
                 **config) -> Path:
    """A rank-`rank` adapter with random A and B (PEFT would start B at zero: an adapter that changes nothing)."""
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                         init_lora_weights=False, **config))
    peft.save_pretrained(out_dir)
    return Path(out_dir)


def peft_greedy(model_dir: Path, adapter_dir: Path | None, prompt: list[int], n: int) -> list[int]:
    """HF PEFT's greedy tokens (the base model's when adapter_dir is None), EOS an ordinary token."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]
