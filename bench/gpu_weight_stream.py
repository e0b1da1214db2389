"""GPU run of weight streaming (issue 6, the FlexGen row of the PipeLLM table): a model larger than the weight
budget, its decoder layers streamed from host memory every forward pass, for --cc off / naive / pipelined.

1. Correct first: a tiny OPT model on the GPU, streamed (every layer but the ring evicted) against resident: logits
   of one prefill and greedy tokens, in every mode. A mismatch in tokens stops the run.
2. Then timing: OPT-30B shape (dummy bf16 weights, 60 GB) with a budget that streams at least half the layers;
   FlexGen-like throughput runs (all prompts at once, PROMPT tokens in, GEN out, batch sizes BATCHES): output tok/s,
   overhead vs off, what crossed the channel. OPT-66B (132 GB in bf16) runs only where host memory holds it;
   else it is skipped with a message.
3. A short table last.

Usage (on the GPU machine, repository root): python bench/gpu_weight_stream.py [MODEL ...] (default opt-30b opt-66b)
Env: OUT (directory for the JSON), CCSERVE_COMMIT (commit id; the device copy has no .git), CC_THREADS (default 8),
BATCHES (default "16,32"), PROMPT (default 512), GEN (default 8), MODES (default "naive,pipelined,off": off last,
since its pinned host copies stay cached by the host allocator), STREAM_FRACTION (share of layers to stream,
default 0.5), TIME_LIMIT_S (default 420: later modes are skipped, and say so, so the run ends in < 8 minutes), STACKS_EVERY_S
(dump every thread's stack this often: where a slow run spends its time), SKIP_CHECK=1 (no tiny-model check:
for a call that only times a mode whose check passed in an earlier call; ~100 s of Triton compiles saved).
"""
from __future__ import annotations

import faulthandler
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccserve import LLM, SamplingParams  # noqa: E402
from ccserve.bench.throughput import commit, machine  # noqa: E402
from ccserve.engine.weight_plan import GIB, RING_SLOTS  # noqa: E402
from ccserve.models.loader import read_hf_config  # noqa: E402

MODELS = Path(__file__).resolve().parent / "models"
MODES = os.environ.get("MODES", "naive,pipelined,off").split(",")
THREADS = int(os.environ.get("CC_THREADS", 8))
BATCHES = [int(b) for b in os.environ.get("BATCHES", "16,32").split(",")]
PROMPT, GEN = int(os.environ.get("PROMPT", 512)), int(os.environ.get("GEN", 8))
FRACTION = float(os.environ.get("STREAM_FRACTION", 0.5))
TIME_LIMIT_S = float(os.environ.get("TIME_LIMIT_S", 420))   # no new engine starts after this: the run stays < 8 min
STACKS_EVERY_S = float(os.environ.get("STACKS_EVERY_S", 0))  # > 0: every thread's stack to stderr this often
START = time.perf_counter()


def opt_sizes(model_dir: Path) -> tuple[int, int, int]:
    """(bytes of one decoder layer, bytes of the rest, layers) of an OPT config in bf16."""
    c = read_hf_config(str(model_dir))
    h, f = c.hidden_size, c.ffn_dim
    layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h
    rest = c.vocab_size * h + (c.max_position_embeddings + 2) * h + 2 * h
    return 2 * layer, 2 * rest, c.num_hidden_layers


def budget_gib(model_dir: Path) -> float:
    """Weights budget that keeps (1 - FRACTION) of the layers resident beside the ring (cc's ring: one more)."""
    layer, rest, n = opt_sizes(model_dir)
    keep = int(n * (1 - FRACTION))
    return (rest + (keep + RING_SLOTS + 1) * (layer + 2048)) / GIB     # + alignment of each parameter and slot


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def release() -> None:
    """Give back what a closed engine held (GPU memory, pinned host copies) once nothing refers to it."""
    gc.collect()
    torch.cuda.empty_cache()
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()


def stream_stats(llm: LLM) -> dict:
    """What crossed per run (aggregates only): layers streamed, bytes, sealing on the critical path, pipeline."""
    w = llm.engine.runner.weights
    if w is None:
        return dict(streamed_layers=0)
    out = dict(streamed_layers=w.num_streamed, streamed_gb_per_pass=round(w.streamed_bytes / 1e9, 2))
    channel = getattr(w.loader, "channel", None)
    if channel is not None:
        s = channel.stats
        out.update(h2d_gb=round(s.h2d_bytes / 1e9, 1), sealed_on_demand_gb=round(s.sealed_on_demand_bytes / 1e9, 1),
                   seal_s=round(s.seal_s, 2))
        if channel.pipeline is not None:
            out["pipeline"] = {k: round(v, 3) if isinstance(v, float) else v
                               for k, v in vars(channel.pipeline.stats).items()}
    return out


def check_tiny() -> dict:
    """Streamed vs resident on a tiny OPT model on the GPU: prefill logits and greedy tokens, per mode."""
    from tests.engine.test_engine import prompts_of
    from tests.tiny_models import make_tiny_model_dir
    path = str(make_tiny_model_dir(Path(tempfile.mkdtemp()) / "opt", "opt", num_hidden_layers=8))
    prompts = prompts_of(4, seed=3)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    kw = dict(dtype="bfloat16", max_model_len=128, num_gpu_blocks=64, enforce_eager=True, privacy="open")
    resident = LLM(path, **kw)
    want = [o.token_ids for o in resident.generate(prompts, params)]
    resident.close()
    del resident
    release()
    out = {}
    for cc in MODES:
        llm = LLM(path, cc=cc, cc_threads=2, gpu_weight_budget_gb=tiny_llm_budget(path, cc), **kw)
        out[cc] = dict(tokens_equal=[o.token_ids for o in llm.generate(prompts, params)] == want,
                       streamed_layers=llm.engine.runner.weights.num_streamed)
        llm.close()
        del llm
        release()
        print("check", cc, out[cc], flush=True)
        if not out[cc]["tokens_equal"]:
            raise SystemExit(f"streamed greedy tokens differ from resident ones under --cc {cc}: not timing")
    return out


def tiny_llm_budget(path: str, cc: str) -> float:
    """The smallest budget the engine accepts for this tiny model (it says so in its error): every layer streams."""
    try:
        LLM(path, dtype="bfloat16", max_model_len=128, num_gpu_blocks=64, privacy="open", cc=cc,
            gpu_weight_budget_gb=1e-9)
    except ValueError as e:
        return float(str(e).split("pass at least ")[1].split(" GiB")[0])
    raise AssertionError("a 1e-9 GiB budget was accepted")


def time_mode(name: str, model_dir: Path, cc: str, budget: float, prompts: dict[int, list[list[int]]]) -> dict:
    """One engine under one --cc mode: each batch once after a warm-up. The engine is closed before this returns,
    so that no reference to it outlives the call (the next mode's engine needs its GPU memory)."""
    params = SamplingParams(temperature=0, max_tokens=GEN, ignore_eos=True)
    t = time.perf_counter()
    llm = LLM(str(model_dir), load_format="dummy", dtype="bfloat16", privacy="open", cc=cc, cc_threads=THREADS,
              gpu_weight_budget_gb=budget, max_model_len=PROMPT + GEN + 16, max_num_seqs=max(BATCHES),
              max_num_batched_tokens=max(BATCHES) * PROMPT, gpu_memory_utilization=0.9)
    mode = dict(startup_s=round(time.perf_counter() - t, 1), results={})
    print(name, cc, "started in", mode["startup_s"], "s", flush=True)
    # warm-up: prefill, a decode window (Triton compiles for this model's shapes in the first mode)
    llm.generate(prompts[BATCHES[0]][:2], SamplingParams(temperature=0, max_tokens=min(GEN, 3), ignore_eos=True))
    for b in BATCHES:
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(prompts[b], params)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        mode["results"][str(b)] = dict(seconds=round(dt, 2), output_tok_s=round(b * GEN / dt, 2),
                                       total_tok_s=round(b * (PROMPT + GEN) / dt, 1))
        print(name, cc, "batch", b, mode["results"][str(b)], flush=True)
    mode["stream"] = stream_stats(llm)
    print(name, cc, mode["stream"], flush=True)
    llm.close()
    return mode


def run_model(name: str) -> dict:
    model_dir = MODELS / name
    layer, rest, n = opt_sizes(model_dir)
    need = layer * n + rest
    if need * 1.05 > host_memory_bytes():
        msg = (f"skipped: the model takes {need / 1e9:.0f} GB in bf16, host memory is "
               f"{host_memory_bytes() / 1e9:.0f} GB (it is built on the host before its layers are placed)")
        print(name, msg, flush=True)
        return dict(skipped=msg)
    budget = budget_gib(model_dir)
    row = dict(model_gb=round(need / 1e9, 1), budget_gib=round(budget, 2), modes={})
    prompts = {b: [[(7 * i + 13 * j) % 50000 + 3 for j in range(PROMPT)] for i in range(b)] for b in BATCHES}
    for cc in MODES:
        if time.perf_counter() - START > TIME_LIMIT_S:
            row["modes"][cc] = dict(skipped=f"time limit: {TIME_LIMIT_S:.0f} s spent before this mode started")
            print(name, cc, row["modes"][cc]["skipped"], flush=True)
            continue
        row["modes"][cc] = time_mode(name, model_dir, cc, budget, prompts)
        release()
    return row


def main() -> None:
    if STACKS_EVERY_S > 0:      # a poor man's sampling profiler: where each thread is, every few seconds
        faulthandler.dump_traceback_later(STACKS_EVERY_S, repeat=True)
    out_dir = Path(os.environ.get("OUT", "bench/results"))
    names = sys.argv[1:] or ["opt-30b", "opt-66b"]
    result = dict(machine=machine(), commit=commit(), cc_threads=THREADS, cpu_count=os.cpu_count(),
                  host_memory_gb=round(host_memory_bytes() / 1e9), batches=BATCHES, prompt=PROMPT, gen=GEN,
                  stream_fraction=FRACTION, modes=MODES, check=None, models={})
    result["check"] = "skipped (SKIP_CHECK)" if os.environ.get("SKIP_CHECK") else check_tiny()
    for name in names:
        result["models"][name] = run_model(name)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gpu_weight_stream.json").write_text(json.dumps(result, indent=1))
    print_table(result)


def print_table(result: dict) -> None:
    print(f"\ncc threads {result['cc_threads']} of {result['cpu_count']} CPUs; prompt {result['prompt']}, "
          f"gen {result['gen']}\n")
    print("| model | budget GiB | streamed layers | batch | cc | out tok/s | vs off |")
    print("|---|---|---|---|---|---|---|")
    for name, row in result["models"].items():
        if "skipped" in row:
            print(f"| {name} | - | - | - | - | {row['skipped']} | - |")
            continue
        off = row["modes"].get("off", {}).get("results", {})
        for cc, mode in row["modes"].items():
            if "skipped" in mode:
                print(f"| {name} | {row['budget_gib']} | - | - | {cc} | {mode['skipped']} | - |")
            for b, r in mode.get("results", {}).items():
                vs = f"{100 * (r['output_tok_s'] / off[b]['output_tok_s'] - 1):+.1f}%" if b in off else "-"
                r = dict(r, **{"streamed": mode["stream"]["streamed_layers"]})
                print(f"| {name} | {row['budget_gib']} | {r['streamed']} | {b} | {cc} | {r['output_tok_s']} | {vs} |")


if __name__ == "__main__":
    main()
