"""Accuracy of per-head dynamic sparsity (--kv-sparsity) with KV formats, on the real default model, on the CPU.

For each (format, ratio R) of the grid, the same two measures as bench/kv_accuracy.py (whose functions this
reuses): perplexity on fixed Shakespeare windows prefilled chunk by chunk (every chunk prunes after its
attention, as an engine step does, so later queries see only what each head kept), and greedy agreement with the
model-dtype cache without sparsity through LLM.generate. Nominal compression = the format's ratio vs bf16 x 1/R
(phase 1 keeps pruned tokens' memory allocated: this is what unified paging will free); the share of
(token, layer, head) entries the windows actually kept is reported beside it.

Usage: python bench/kv_sparsity.py; env MODEL (smollm2 | qwen-coder, as kv_accuracy.py), FORMATS (bf16,K8V4,K4V4), RATIOS (0.5,0.25,0.125), WINDOW_MODE_FORMATS
(formats also run with the SnapKV-style "window" importance; default bf16), plus kv_accuracy's WINDOWS, WINDOW,
CHUNK, PROMPTS, MAX_TOKENS. JSON to $OUT (default bench/results)/kv_sparsity-cpu.json (-qwen-coder for that model),
rewritten after every run.
On a shared CPU run it with OMP_NUM_THREADS=1 (oversubscribed OpenMP threads made runs 10x slower).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kv_accuracy import (BLOCK_SIZE, CHUNK, CODER, MAX_TOKENS, NUM_PROMPTS, WINDOW, WINDOWS,  # noqa: E402
                         agreement, greedy, perplexity, prompt_set, text_windows)

from ccserve import LLM  # noqa: E402
from ccserve.bench.throughput import commit, machine  # noqa: E402
from ccserve.models.default import default_model_dir, qwen_coder_dir  # noqa: E402

FORMATS = os.environ.get("FORMATS", "bf16,K8V4,K4V4").split(",")
RATIOS = [float(r) for r in os.environ.get("RATIOS", "0.5,0.25,0.125").split(",")]
WINDOW_MODE_FORMATS = [f for f in os.environ.get("WINDOW_MODE_FORMATS", "bf16").split(",") if f]


def grid() -> list[tuple[str, float | None, str]]:
    """(format, ratio or None, importance) in run order, the most telling first (a run cut short on a busy CPU
    keeps them): the baseline (first format, no sparsity), the first ratio with every format, the formats alone,
    the other ratios, then the "window" importance."""
    first, rest = RATIOS[0], RATIOS[1:]
    runs = [(FORMATS[0], None, "accumulated")]
    runs += [(fmt, first, "accumulated") for fmt in FORMATS]
    runs += [(fmt, None, "accumulated") for fmt in FORMATS[1:]]
    runs += [(fmt, r, "accumulated") for r in rest for fmt in FORMATS]
    runs += [(fmt, r, "window") for fmt in WINDOW_MODE_FORMATS for r in RATIOS]
    return runs


def run(model: Path, fmt: str, ratio: float | None, importance: str) -> tuple[dict, list[list[int]]]:
    t = time.perf_counter()
    blocks = max(WINDOWS * -(-WINDOW // BLOCK_SIZE), NUM_PROMPTS * 8) + 64
    llm = LLM(str(model), kv_format=fmt, block_size=BLOCK_SIZE, max_model_len=max(WINDOW, 256) + 64,
              num_gpu_blocks=blocks, max_num_seqs=max(NUM_PROMPTS, WINDOWS), kv_sparsity=ratio,
              kv_importance=importance)
    tokenizer, runner = llm.engine.tokenizer, llm.engine.runner
    kept: list[float] = []
    ppl = perplexity(llm, text_windows(tokenizer, WINDOWS, WINDOW), CHUNK, kept)
    tokens = greedy(llm, prompt_set(tokenizer, NUM_PROMPTS), MAX_TOKENS)
    head_dim = runner.kv_shape[3]
    quant = 2 * 2 * head_dim / runner.kv_format.bytes_per_token(head_dim, BLOCK_SIZE, 2)
    r = dict(format=fmt, ratio=ratio, importance=importance if ratio else None, quantization_ratio=round(quant, 2),
             compression=round(quant / (ratio or 1.0), 2), kept_share=round(kept[0], 4) if kept else 1.0,
             perplexity=round(ppl, 4), seconds=round(time.perf_counter() - t, 1))
    return r, tokens


def main() -> None:
    model = qwen_coder_dir() if CODER else default_model_dir()
    result = dict(machine=machine(), commit=commit(), model=model.name, windows=WINDOWS, window_tokens=WINDOW,
                  chunk=CHUNK, prompts=NUM_PROMPTS, max_tokens=MAX_TOKENS, block_size=BLOCK_SIZE,
                  sinks=4, recent_window=32, results=[])
    base_ppl, base_tokens = None, None
    for fmt, ratio, importance in grid():
        r, tokens = run(model, fmt, ratio, importance)
        base_ppl = base_ppl or r["perplexity"]
        base_tokens = base_tokens or tokens
        identical, prefix = agreement(base_tokens, tokens)
        r.update(perplexity_change_pct=round(100 * (r["perplexity"] / base_ppl - 1), 2),
                 identical_sequences=identical, prefix_agreement=round(prefix, 3))
        result["results"].append(r)
        print(json.dumps(r), flush=True)
        out_dir = Path(os.environ.get("OUT", "bench/results"))     # after every run: a cut-short run keeps its rows
        out_dir.mkdir(parents=True, exist_ok=True)
        name = "kv_sparsity-cpu-qwen-coder.json" if CODER else "kv_sparsity-cpu.json"
        (out_dir / name).write_text(json.dumps(result, indent=1))
    print(f"\n{model.name}, {WINDOWS} windows x {WINDOW} tokens in chunks of {CHUNK}; "
          f"{NUM_PROMPTS} prompts x {MAX_TOKENS} greedy tokens\n")
    print("| format | R | importance | compression | kept | perplexity | change | identical greedy "
          "| prefix agreement |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["results"]:
        print(f"| {r['format']} | {r['ratio'] or 1} | {r['importance'] or '-'} | {r['compression']}x | "
              f"{100 * r['kept_share']:.1f}% | {r['perplexity']} | {r['perplexity_change_pct']:+.2f}% | "
              f"{r['identical_sequences']}/{NUM_PROMPTS} | {100 * r['prefix_agreement']:.0f}% |")


if __name__ == "__main__":
    main()
