"""GPU run of multi-LoRA under confidential mode (issue 6, the PipeLLM table's multi-LoRA row).

Llama-3-8B shape with dummy weights, ADAPTERS random rank-RANK adapters (PEFT format, written once to a scratch
directory) on TARGETS, REQUESTS requests whose adapter is drawn from a Zipf distribution (exponent ZIPF, as S-LoRA's
power-law workloads), a GPU adapter cache of MAX_LORAS slots (smaller than the set, so adapters are evicted and
reloaded). Rows: the base model without adapters, then --cc off / naive / pipelined with adapters: output tok/s,
overhead vs off, adapter loads and hits, bytes through the adapter channel, seconds sealing on the critical path.

Usage (on the GPU machine, repository root): python bench/gpu_lora.py
Env: OUT (directory for the JSON), CCSERVE_COMMIT, MODEL (default llama3-8b), ADAPTERS (64), RANK (16), TARGETS
(q_proj,k_proj,v_proj,o_proj), MAX_LORAS (8), REQUESTS (256), PROMPT_LEN (256), OUTPUT_LEN (128), ZIPF (1.0),
CC_THREADS (8), MODES (off,naive,pipelined), SCRATCH (adapter directory, default /tmp/ccserve-lora-bench).
On a CPU (no CUDA) it runs whatever MODEL names, for a smoke test of the script itself.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccserve import LLM, SamplingParams  # noqa: E402
from ccserve.bench.throughput import commit, machine  # noqa: E402
from ccserve.models.loader import read_hf_config  # noqa: E402

MODEL = os.environ.get("MODEL", str(Path(__file__).resolve().parent / "models" / "llama3-8b"))
ADAPTERS, RANK = int(os.environ.get("ADAPTERS", 64)), int(os.environ.get("RANK", 16))
TARGETS = os.environ.get("TARGETS", "q_proj,k_proj,v_proj,o_proj").split(",")
MAX_LORAS, REQUESTS = int(os.environ.get("MAX_LORAS", 8)), int(os.environ.get("REQUESTS", 256))
PROMPT_LEN, OUTPUT_LEN = int(os.environ.get("PROMPT_LEN", 256)), int(os.environ.get("OUTPUT_LEN", 128))
ZIPF, THREADS = float(os.environ.get("ZIPF", 1.0)), int(os.environ.get("CC_THREADS", 8))
MODES = os.environ.get("MODES", "off,naive,pipelined").split(",")
SCRATCH = Path(os.environ.get("SCRATCH", "/tmp/ccserve-lora-bench"))


def projection_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(in, out) of each Llama projection."""
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    h, kv, inter = cfg.hidden_size, cfg.num_key_value_heads * d, cfg.intermediate_size
    return {"q_proj": (h, cfg.num_attention_heads * d), "k_proj": (h, kv), "v_proj": (h, kv),
            "o_proj": (cfg.num_attention_heads * d, h), "gate_proj": (h, inter), "up_proj": (h, inter),
            "down_proj": (inter, h)}


def write_adapters() -> dict[str, str]:
    """ADAPTERS random PEFT adapters (kept across runs: writing 64 x ~30 MB takes a while)."""
    cfg = read_hf_config(MODEL)
    shapes = projection_shapes(cfg)
    paths = {}
    for i in range(ADAPTERS):
        path = SCRATCH / f"r{RANK}-{'-'.join(TARGETS)}" / f"a{i}"
        paths[f"a{i}"] = str(path)
        if (path / "adapter_model.safetensors").is_file():
            continue
        path.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(cfg.num_hidden_layers):
            for t in TARGETS:
                group = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                n_in, n_out = shapes[t]
                key = f"base_model.model.model.layers.{layer}.{group}.{t}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(RANK, n_in, generator=g) / n_in ** 0.5).bfloat16()
                tensors[f"{key}.lora_B.weight"] = (torch.randn(n_out, RANK, generator=g) * 0.01).bfloat16()
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(dict(
            peft_type="LORA", r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, bias="none")))
    return paths


def workload(vocab: int) -> tuple[list[list[int]], list[str]]:
    """Fixed prompts and a Zipf draw of adapter names (the same for every row)."""
    rng = np.random.default_rng(0)
    prompts = rng.integers(10, vocab - 10, size=(REQUESTS, PROMPT_LEN)).tolist()
    weights = 1.0 / np.arange(1, ADAPTERS + 1) ** ZIPF
    names = rng.choice(ADAPTERS, size=REQUESTS, p=weights / weights.sum())
    return prompts, [f"a{i}" for i in names]


def run_row(llm: LLM, prompts: list[list[int]], names: list[str | None]) -> dict:
    params = SamplingParams(temperature=0, max_tokens=OUTPUT_LEN, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:8], params, lora=names[:8])   # warm-up: Triton compiles, first adapter loads
    sync()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora=names)
    sync()
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    row = dict(seconds=round(seconds, 3), output_tok_s=round(tokens / seconds, 1))
    cache = llm.engine.runner.lora
    if cache is not None:
        row.update(adapter_loads=cache.loads, adapter_hits=cache.hits)
        if cache.channel is not None:
            s = cache.channel.stats
            row.update(adapter_h2d_mb=round(s.h2d_bytes / 1e6, 1),
                       sealed_on_demand_mb=round(s.sealed_on_demand_bytes / 1e6, 1), seal_s=round(s.seal_s, 3))
    return row


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    adapters = write_adapters()
    cfg = read_hf_config(MODEL)
    prompts, names = workload(cfg.vocab_size)
    common = dict(load_format="dummy", privacy="open", max_model_len=PROMPT_LEN + OUTPUT_LEN + 16,
                  max_num_seqs=int(os.environ.get("MAX_NUM_SEQS", 256)), cc_threads=THREADS)
    if torch.cuda.is_available():
        common.update(dtype="bfloat16")
    rows = {"base": run_row(LLM(MODEL, **common), prompts, [None] * REQUESTS)}
    print("base", rows["base"], flush=True)
    for cc in MODES:
        llm = LLM(MODEL, lora_adapters=adapters, max_loras=MAX_LORAS, max_lora_rank=max(RANK, 16), cc=cc,
                  **common)
        rows[cc] = run_row(llm, prompts, names)
        del llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if "off" in rows and cc != "off":
            rows[cc]["overhead_vs_off"] = round(rows["off"]["output_tok_s"] / rows[cc]["output_tok_s"] - 1, 4)
        print(cc, rows[cc], flush=True)
    result = dict(machine=machine(), commit=os.environ.get("CCSERVE_COMMIT") or commit(),
                  settings=dict(model=Path(MODEL).name, adapters=ADAPTERS, rank=RANK, targets=TARGETS,
                                max_loras=MAX_LORAS, requests=REQUESTS, prompt_len=PROMPT_LEN,
                                output_len=OUTPUT_LEN, zipf=ZIPF, cc_threads=THREADS),
                  results=rows)
    out = Path(os.environ.get("OUT", "bench/results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_lora.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
