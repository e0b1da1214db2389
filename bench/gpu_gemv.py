"""GPU check and benchmark of the Triton skinny GEMM (ccserve/kernels/skinny_gemm.py) against cuBLAS
(torch.nn.functional.linear) on Llama-3-8B's decode shapes, and the dispatch rule for ccserve/layers/linear.py.

1. Correctness, bf16, x random and W ~ N(0, 1/K): qkv 6144x4096, o_proj 4096x4096, gate_up 28672x4096,
   down 4096x14336, lm_head 128256x4096 for M = 1, 2, 4, 8, 16 rows, against the fp32 reference (cuBLAS is
   held to the same tolerance, for scale); bias on a strided x; every swept config; split-K in a CUDA graph
   replayed with fresh inputs (the in-kernel combine must leave its counters at zero).
2. Timings per call: triton.testing.do_bench median (L2 flushed between calls), and inside one captured CUDA
   graph of 32 calls on 32 distinct weights (4 for lm_head), a layer stack's worth, so neither launch
   overhead nor an L2-resident weight flatters anyone. GB/s counts W + x + y once; "of copy" divides by a
   measured device-to-device copy (bytes read + written, as bench/gpu_layers.py).
3. A sweep of configs around the default at M = 1 and 8 for the layer shapes (graph timings).
4. Tables, the per-step sum at M = 1, and last the dispatch rule that minimizes graph time over the layer
   shapes for M <= 8 (rows first, then the largest weight, in elements). JSON to $OUT/gpu_gemv.json if OUT is
   set. Exit status 1 if any check failed.

Usage (GPU machine, repository root): python bench/gpu_gemv.py   (about 1-2 minutes on an H100)
"""
from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccserve.bench.throughput import commit, machine  # noqa: E402
from ccserve.kernels.skinny_gemm import (FMA_TILE, SkinnyConfig, choose_config, device_sms,  # noqa: E402
                                         skinny_gemm_ref, skinny_gemm_triton)

DEV = "cuda"
DTYPE = torch.bfloat16
SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
LAYER_SHAPES = ("qkv", "o_proj", "gate_up", "down")   # what Linear runs 32 times a step; lm_head is F.linear
ROWS = (1, 2, 4, 8, 16)
SWEEP_ROWS = (1, 8)
LAYERS = 32
MAX_RULE_ROWS = 8      # the rule stays within decode batches the kernel was asked to serve conservatively
TOL = 1.6e-2           # |got - ref| <= TOL * (1 + |ref|): ~2 bf16 ulp


# ---- helpers ----------------------------------------------------------------------------------------------

def compare(name: str, got: torch.Tensor, expect: torch.Tensor) -> dict:
    assert got.shape == expect.shape, (name, got.shape, expect.shape)
    diff = (got.float() - expect.float()).abs()
    ok = bool(torch.isfinite(got).all()) and bool((diff <= TOL * (1 + expect.float().abs())).all())
    err = diff.max().item()
    if not ok:
        print(f"  FAIL {name}: max abs err {err:.3e}", flush=True)
    return dict(name=name, ok=ok, max_abs_err=err)


def weight_stack(n: int, k: int, copies: int) -> torch.Tensor:
    """copies distinct [n, k] weights, N(0, 1/k), so outputs are O(1) whatever K is."""
    w = torch.empty(copies, n, k, device=DEV, dtype=DTYPE)
    for i in range(copies):
        w[i].normal_(0.0, k ** -0.5)
    return w


def bench_us(fn: Callable) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3


def graph_us(call: Callable[[int], object], copies: int) -> float:
    """Per-call time of copies back-to-back calls (call(i) reads weight i) replayed from one CUDA graph."""
    call(0)                                   # compile and allocate outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            call(i)
    us = bench_us(graph.replay) / copies
    del graph
    return us


def copy_bandwidth() -> float:
    src = torch.randn(1 << 28, device=DEV, dtype=DTYPE)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / (bench_us(lambda: dst.copy_(src)) * 1e-6) / 1e9


def sweep_configs(m: int, n: int, k: int) -> list[SkinnyConfig]:
    """The default and its neighbours, one knob at a time: slab width, split-K with each combine, the other
    inner product (M <= 4), more warps, deeper pipeline."""
    base = choose_config(m, n, k, device_sms(torch.device(DEV)))
    min_n = 16 if base.use_dot else 8
    split = base.split_k * 2
    variants = [base, replace(base, block_n=base.block_n * 2), replace(base, split_k=split),
                replace(base, split_k=split, serial_combine=False), replace(base, num_warps=8),
                replace(base, num_stages=base.num_stages + 1)]
    if base.block_n // 2 >= min_n:
        variants.append(replace(base, block_n=base.block_n // 2))
    if m <= 4:
        variants.append(replace(base, use_dot=True, block_n=16, block_k=256) if not base.use_dot
                        else replace(base, use_dot=False, block_n=8, block_k=FMA_TILE // 8))
    return list(dict.fromkeys(variants))


# ---- per shape: checks and timings ------------------------------------------------------------------------

def gemm_call(x: torch.Tensor, weights: torch.Tensor, cfg: SkinnyConfig | None) -> Callable[[int], torch.Tensor]:
    """call(i): x times weight i, by cuBLAS (cfg None) or by the Triton kernel with cfg."""
    if cfg is None:
        return lambda i: F.linear(x, weights[i])
    return lambda i: skinny_gemm_triton(x, weights[i], None, cfg)


def timed_row(call: Callable[[int], torch.Tensor], copies: int, nbytes: int, eager: bool, **fields) -> dict:
    row = dict(fields, graph_us=graph_us(call, copies))
    if eager:
        row["us"] = bench_us(functools.partial(call, 0))
    row["gbs"] = nbytes / (row["graph_us"] * 1e-6) / 1e9
    return row


def run_rows(name: str, m: int, x: torch.Tensor, weights: torch.Tensor) -> tuple[list[dict], list[dict]]:
    """Checks and timings of one (shape, M): cuBLAS, the chooser's config, and (some M) its neighbours."""
    (copies, n, k), tag = weights.shape, f"{name} M={m}"
    nbytes = (n * k + m * k + m * n) * weights.element_size()
    default = choose_config(m, n, k, device_sms(x.device))
    configs = sweep_configs(m, n, k) if m in SWEEP_ROWS and name in LAYER_SHAPES else [default]
    expect = skinny_gemm_ref(x, weights[0])
    checks = [compare(f"cuBLAS {tag}", F.linear(x, weights[0]), expect)]
    checks += [compare(f"triton {cfg.describe()} {tag}", skinny_gemm_triton(x, weights[0], None, cfg), expect)
               for cfg in configs]
    rows = [timed_row(gemm_call(x, weights, None), copies, nbytes, True, shape=name, m=m, impl="torch",
                      config="cuBLAS")]
    rows += [timed_row(gemm_call(x, weights, cfg), copies, nbytes, cfg == default, shape=name, m=m,
                       impl="triton" if cfg == default else "sweep", config=cfg.describe()) for cfg in configs]
    best = min(rows[1:], key=lambda r: r["graph_us"])
    print(f"  {tag}: cuBLAS {rows[0]['graph_us']:.1f} us, triton {rows[1]['graph_us']:.1f} us"
          + (f", best {best['config']} {best['graph_us']:.1f} us" if len(configs) > 1 else ""), flush=True)
    return checks, rows


def run_shape(name: str, n: int, k: int) -> tuple[list[dict], list[dict]]:
    weights = weight_stack(n, k, 4 if name == "lm_head" else LAYERS)
    checks, rows = [], []
    for m in ROWS:
        more_checks, more_rows = run_rows(name, m, torch.randn(m, k, device=DEV, dtype=DTYPE), weights)
        checks += more_checks
        rows += more_rows
    return checks, rows


def extra_checks() -> list[dict]:
    """Bias on a strided x through each combine, and split-K replayed from a CUDA graph with fresh inputs."""
    n, k = SHAPES["o_proj"]
    w = weight_stack(n, k, 1)[0]
    bias = torch.randn(n, device=DEV, dtype=DTYPE)
    wide = torch.randn(4, 3 * k, device=DEV, dtype=DTYPE)
    x = wide[:, k:2 * k]
    expect = skinny_gemm_ref(x, w, bias)
    checks = []
    for cfg in (None, SkinnyConfig(16, 256, 4), SkinnyConfig(16, 256, 4, serial_combine=False),
                SkinnyConfig(8, 512, 2, use_dot=False)):
        label = cfg.describe() if cfg else "default"
        checks.append(compare(f"bias + strided x, {label}", skinny_gemm_triton(x, w, bias, cfg), expect))
    cfg = SkinnyConfig(16, 256, 4)
    static_x = torch.randn(8, k, device=DEV, dtype=DTYPE)
    skinny_gemm_triton(static_x, w, bias, cfg)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = skinny_gemm_triton(static_x, w, bias, cfg)
    for trial in range(3):
        static_x.copy_(torch.randn(8, k, device=DEV, dtype=DTYPE))
        graph.replay()
        checks.append(compare(f"CUDA graph replay {trial}, {cfg.describe()}", out,
                              skinny_gemm_ref(static_x, w, bias)))
    return checks


# ---- summary ----------------------------------------------------------------------------------------------

def graph_table(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """(shape, m) -> graph us of torch, of the default triton config, and the best triton config (swept or not)."""
    table: dict[tuple[str, int], dict] = {}
    for r in rows:
        t = table.setdefault((r["shape"], r["m"]), {})
        if r["impl"] == "torch":
            t["torch"] = r["graph_us"]
            continue
        if r["impl"] == "triton":
            t["triton"] = r["graph_us"]
        if r["graph_us"] < t.get("best", float("inf")):
            t["best"], t["best_config"] = r["graph_us"], r["config"]
    return table


def recommend(table: dict) -> dict:
    """The (max_rows, max_weight) rule minimizing graph time summed over the layer shapes and M <= 16 (M above
    MAX_RULE_ROWS stays on cuBLAS); among rules within 0.2% of each other, the most conservative."""
    sizes = sorted({SHAPES[s][0] * SHAPES[s][1] for s in LAYER_SHAPES})
    rule_rows = [0] + [m for m in ROWS if m <= MAX_RULE_ROWS]

    def cost(max_rows: int, max_weight: int) -> float:
        return sum(t["triton"] if m <= max_rows and SHAPES[s][0] * SHAPES[s][1] <= max_weight else t["torch"]
                   for (s, m), t in table.items() if s in LAYER_SHAPES)

    best = (0, sizes[0], cost(0, sizes[0]))
    for max_rows in rule_rows:
        for max_weight in sizes:
            c = cost(max_rows, max_weight)
            if c < best[2] * 0.998:
                best = (max_rows, max_weight, c)
    return dict(max_rows=best[0], max_weight=best[1], cost_us=best[2], torch_cost_us=cost(0, sizes[0]))


def print_tables(res: dict) -> None:
    checks, copy = res["checks"], res["copy_gbs"]
    print(f"\n== gpu_gemv on {res['machine'].get('gpu')}: {sum(c['ok'] for c in checks)}/{len(checks)} checks ok; "
          f"copy bandwidth {copy:.0f} GB/s")
    for c in checks:
        if not c["ok"]:
            print(f"   FAILED: {c['name']} (max abs err {c['max_abs_err']:.3e})")
    print("\nsweep (graph us per call)")
    for r in res["rows"]:
        if r["m"] in SWEEP_ROWS and r["shape"] in LAYER_SHAPES and r["impl"] != "torch":
            print(f"  {r['shape']:8}M={r['m']:<3}{r['config']:28}{r['graph_us']:8.1f}{r['gbs'] / copy:7.0%}")
    print(f"\n{'shape':9}{'M':>3}{'cuBLAS us':>10}{'graph':>8}{'of copy':>8}{'triton us':>10}{'graph':>8}{'of copy':>8}"
          f"{'x':>6}  {'triton config':24}{'best':>7}  best config")
    by_key = {(r["shape"], r["m"], r["impl"]): r for r in res["rows"]}
    table = graph_table(res["rows"])
    for (s, m), t in table.items():
        tr, tt = by_key[(s, m, "torch")], by_key[(s, m, "triton")]
        print(f"{s:9}{m:3d}{tr['us']:10.1f}{tr['graph_us']:8.1f}{tr['gbs'] / copy:8.0%}{tt['us']:10.1f}"
              f"{tt['graph_us']:8.1f}{tt['gbs'] / copy:8.0%}{t['torch'] / t['triton']:6.2f}  {tt['config']:24}"
              f"{t['best']:7.1f}  {t['best_config'] if t['best_config'] != tt['config'] else '='}")
    for m in (1, 8):
        old = LAYERS * sum(table[(s, m)]["torch"] for s in LAYER_SHAPES)
        new = LAYERS * sum(min(table[(s, m)]["torch"], table[(s, m)]["triton"]) for s in LAYER_SHAPES)
        print(f"per decode step at M={m} ({LAYERS} layers, layer shapes): cuBLAS {old:.0f} us, with triton where "
              f"it wins {new:.0f} us (saves {old - new:.0f} us); lm_head cuBLAS {table[('lm_head', m)]['torch']:.1f}"
              f" vs triton {table[('lm_head', m)]['triton']:.1f} us")
    rule = res["rule"]
    print(f"\nrecommended dispatch (ccserve/layers/linear.py), saves {rule['torch_cost_us'] - rule['cost_us']:.1f} us "
          f"of {rule['torch_cost_us']:.1f} over the layer shapes x M in {ROWS}:")
    for s in LAYER_SHAPES:
        n, k = SHAPES[s]
        ms = [m for m in ROWS if m <= rule["max_rows"] and n * k <= rule["max_weight"]]
        print(f"  {s:8} ({n}x{k}, {n * k / 2 ** 20:.0f}Mi elements): {'triton for M <= ' + str(max(ms)) if ms else 'cuBLAS'}")
    print(f"SKINNY_MAX_ROWS = {rule['max_rows']}\nSKINNY_MAX_WEIGHT = {rule['max_weight']}")


def main() -> int:
    torch.manual_seed(0)
    res = dict(machine=machine(), commit=commit(), checks=[], rows=[])
    res["copy_gbs"] = copy_bandwidth()
    print(f"copy bandwidth {res['copy_gbs']:.0f} GB/s; {device_sms(torch.device(DEV))} SMs", flush=True)
    res["checks"] += extra_checks()
    for name, (n, k) in SHAPES.items():
        print(f"{name} {n}x{k}", flush=True)
        checks, rows = run_shape(name, n, k)
        res["checks"] += checks
        res["rows"] += rows
        torch.cuda.empty_cache()
    res["rule"] = recommend(graph_table(res["rows"]))
    print_tables(res)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "gpu_gemv.json"
        path.write_text(json.dumps(res, indent=1))
        print(f"wrote {path}")
    return 0 if all(c["ok"] for c in res["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
