"""GPU run of confidential mode (issue 6, phase 1): the always-on per-step cost and encrypted KV swap.

Rows, each for --cc off / naive / pipelined on the same GPU, one engine at a time:
  1. A-mixed and C-decode, default KV cache: output tok/s and overhead vs off (goal: < 2%).
  2. B-pressure with a KV cache cut to KV_FRACTION of the profiled one, so that preemption happens: off
     recomputes (swap needs the channel), naive and pipelined swap (preemption_mode "swap"); tok/s, overhead vs
     off, preemptions, swaps, bytes through the channel, seconds sealing on the critical path, pipeline hits.

Usage (on the GPU machine, repository root): python bench/gpu_cc.py [WORKLOAD[:REPEATS] ...]
Env: OUT (directory for the JSON), CCSERVE_COMMIT (commit id; the device copy has no .git), MODEL (default
llama3-8b), CC_THREADS (CPU crypto workers, default 8), KV_FRACTION (default 0.25), MAX_NUM_SEQS, MAX_BATCHED,
REPEATS (default 3), MODES (default "off,naive,pipelined"), PROFILE=host (profile the host side of each row with
cProfile and print its top functions: where the engine loop spends, or waits for, its time) or PROFILE=gpu (the
kernels of each row by total GPU time, and the caching allocator's retry and device-allocation counts). Channel counters are
totals over the warm-up and all repeats of a row.
"""
from __future__ import annotations

import contextlib
import cProfile
import gc
import io
import json
import pstats
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccserve import LLM  # noqa: E402
from ccserve.bench.throughput import commit, machine, run_workload  # noqa: E402

MODEL = Path(__file__).resolve().parent / "models" / os.environ.get("MODEL", "llama3-8b")
MODES = os.environ.get("MODES", "off,naive,pipelined").split(",")
THREADS = int(os.environ.get("CC_THREADS", 8))


def engine_kwargs(cc: str, **extra) -> dict:
    return dict(load_format="dummy", dtype="bfloat16", max_model_len=4096, gpu_memory_utilization=0.9,
                max_num_seqs=int(os.environ.get("MAX_NUM_SEQS", 256)),
                max_num_batched_tokens=int(os.environ.get("MAX_BATCHED", 8192)), cc=cc, cc_threads=THREADS,
                **extra)


def channel_stats(llm: LLM) -> dict:
    """What crossed the boundary and what it cost on the critical path (aggregates only): the step channel's
    counters, and the KV swap channel's under "swap"."""
    engine = llm.engine
    out = dict(preemptions=engine.scheduler.num_preemptions, swaps=engine.scheduler.num_swaps)
    if engine.runner.boundary.channel is not None:
        out.update(_channel_counters(engine.runner.boundary.channel))
    if engine.runner.swapper is not None:
        out["swap"] = dict(_channel_counters(engine.runner.swapper.channel),
                           swapped_out_mb=round(engine.runner.swapper.swapped_out_bytes / 1e6, 1),
                           swapped_in_mb=round(engine.runner.swapper.swapped_in_bytes / 1e6, 1))
    return out


def _channel_counters(channel) -> dict:
    s = channel.stats
    out = dict(h2d_mb=round(s.h2d_bytes / 1e6, 1), d2h_mb=round(s.d2h_bytes / 1e6, 1),
               sealed_on_demand_mb=round(s.sealed_on_demand_bytes / 1e6, 1), seal_s=round(s.seal_s, 3),
               open_s=round(s.open_s, 3))
    if channel.pipeline is not None:
        out["pipeline"] = {k: v for k, v in vars(channel.pipeline.stats).items() if isinstance(v, (int, float))}
    return out


def run_mode(cc: str, workloads: list[str], repeats: int, **extra) -> dict:
    t = time.perf_counter()
    llm = LLM(str(MODEL), **engine_kwargs(cc, **extra))
    row = dict(startup_s=round(time.perf_counter() - t, 1), num_kv_blocks=llm.engine.runner.num_blocks, results={})
    for name in workloads:
        with profiled(cc, name, os.environ.get("PROFILE")):
            r = run_workload(llm, name, repeats=repeats)
        r["channel"] = channel_stats(llm)
        row["results"][name] = r
        print(cc, name, r["output_tok_s"], r["channel"], flush=True)
    llm.close()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return row


@contextlib.contextmanager
def profiled(cc: str, name: str, what: str | None):
    """Profile the enclosed row: "host" prints the host functions with the most time of their own and under
    them; "gpu" the kernels with the most GPU time, and the allocator counters that reveal hidden syncs."""
    if what == "host":
        profile = cProfile.Profile()
        profile.enable()
        yield
        profile.disable()
        for order in ("tottime", "cumtime"):
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats(order).print_stats(18)
            body = text.getvalue()
            print(f"--- {cc} {name}: host profile by {order}\n" + body[body.find("ncalls"):], flush=True)
    elif what == "gpu":
        torch.cuda.reset_peak_memory_stats()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            yield
        rows = [(getattr(e, "device_time_total", 0), e.count, e.key) for e in prof.key_averages()]
        busy = sum(r[0] for r in rows if "memcpy" not in r[2].lower()) / 1e3
        print(f"--- {cc} {name}: GPU time by kernel (ms total, calls); all kernels {busy:.0f} ms")
        for total, count, key in sorted(rows, reverse=True)[:20]:
            print(f"{total / 1e3:10.1f} {count:8d}  {key[:100]}")
        stats = torch.cuda.memory_stats()
        print({k: stats.get(k) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free",
                                        "num_sync_all_streams")}, flush=True)
    else:
        yield


def main() -> None:
    out_dir = Path(os.environ.get("OUT", "bench/results"))
    args = sys.argv[1:] or ["A-mixed", "C-decode", "B-pressure"]
    repeats = {a.partition(":")[0]: int(a.partition(":")[2] or os.environ.get("REPEATS", 3)) for a in args}
    steady = [w for w in repeats if w != "B-pressure"]
    result = dict(machine=machine(), commit=commit(), model=MODEL.name, cc_threads=THREADS,
                  cpu_count=os.cpu_count(), steady={}, pressure={})
    profiled_blocks = None
    for cc in MODES:
        row = result["steady"][cc] = dict(results={})
        for name in steady:
            r = run_mode(cc, [name], repeats[name])
            profiled_blocks = profiled_blocks or r["num_kv_blocks"]
            row["results"][name] = r["results"][name]
    if "B-pressure" in repeats:
        if profiled_blocks is None:
            profiled_blocks = run_mode("off", [], 1)["num_kv_blocks"]
        blocks = max(1, int(profiled_blocks * float(os.environ.get("KV_FRACTION", 0.25))))
        for cc in MODES:
            mode = "recompute" if cc == "off" else "swap"
            r = run_mode(cc, ["B-pressure"], repeats["B-pressure"], num_gpu_blocks=blocks, preemption_mode=mode)
            result["pressure"][cc] = dict(r["results"]["B-pressure"], num_kv_blocks=blocks, preemption_mode=mode)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_cc.json").write_text(json.dumps(result, indent=1))
    print_table(result)


def print_table(result: dict) -> None:
    print(f"\ncc threads {result['cc_threads']} of {result['cpu_count']} CPUs\n")
    print("| workload | cc | out tok/s | vs off | preemptions | swaps | sealed on demand MB | seal s |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [(name, cc, r) for cc, m in result["steady"].items() for name, r in m["results"].items()]
    rows += [("B-pressure (small KV)", cc, r) for cc, r in result["pressure"].items()]
    base = {}
    for name, cc, r in rows:
        if cc == "off":
            base[name] = r["output_tok_s"]
    for name, cc, r in sorted(rows, key=lambda x: x[0]):
        ch = r["channel"]
        vs = f"{100 * (r['output_tok_s'] / base[name] - 1):+.1f}%" if name in base else "-"
        print(f"| {name} | {cc} | {r['output_tok_s']} | {vs} | {ch['preemptions']} | {ch['swaps']} | "
              f"{ch.get('sealed_on_demand_mb', 0)} | {ch.get('seal_s', 0)} |")


if __name__ == "__main__":
    main()
