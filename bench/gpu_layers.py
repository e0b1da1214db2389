"""GPU check and benchmark of the fused small-op kernels of a decoder layer (RMSNorm + residual, per-head q/k
RMSNorm, rotary, SiLU-and-mul), in one call.

1. Correctness of each Triton kernel against its PyTorch reference (the layers' old code): Llama-3-8B shapes
   (hidden 4096, H=32, Hk=8, D=128, intermediate 14336, bf16) for T = 1, 64, 256, 8192, plus SmolLM2-135M
   (hidden 576, D=64) and an fp16 head_dim-80 shape; q/k are strided views of a fused qkv output as in the
   model; then the ops of one layer replayed from a captured CUDA graph with fresh inputs.
2. Timings (triton.testing.do_bench, median) of Triton vs the old PyTorch path, with GB/s: eager for every T,
   and per call inside a CUDA graph of back-to-back calls for the decode sizes (T <= 256), which is what a
   captured decode step pays. Then the sum over one Llama layer's small ops, times 32 layers.
3. A compact table; JSON to $OUT/gpu_layers.json when OUT is set. Exit status 1 if any check failed.

Usage (GPU machine, repository root): python bench/gpu_layers.py
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccserve.bench.throughput import commit, machine  # noqa: E402
from ccserve.kernels.activation import silu_and_mul_ref, silu_and_mul_triton  # noqa: E402
from ccserve.kernels.rmsnorm import rmsnorm_ref, rmsnorm_triton  # noqa: E402
from ccserve.kernels.rotary import rotary_ref, rotary_triton  # noqa: E402
from ccserve.layers.rotary import RotaryEmbedding  # noqa: E402

DEV = "cuda"
TOKENS = (1, 64, 256, 8192)
GRAPH_TOKENS = (1, 64, 256)
GRAPH_REPEAT = 20            # calls per captured graph when timing inside one
LAYERS = 32
MAX_POS = 8192
EPS = 1e-5
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}   # ~1-2 ulp, relative to 1 + |expect|


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    dtype: torch.dtype


LLAMA = Shape("llama3-8b bf16", 4096, 32, 8, 128, 14336, torch.bfloat16)
SHAPES = [LLAMA, Shape("smollm2-135m bf16", 576, 9, 3, 64, 1536, torch.bfloat16),
          Shape("d80 fp16", 1280, 16, 4, 80, 3456, torch.float16)]


class Inputs:
    """One layer's small-op inputs for T tokens: hidden states, residual, a fused qkv output, gate_up output."""

    def __init__(self, s: Shape, tokens: int) -> None:
        self.shape, self.tokens = s, tokens
        self.q_size, self.kv_size = s.heads * s.head_dim, s.kv_heads * s.head_dim
        self.x = torch.randn(tokens, s.hidden, device=DEV).to(s.dtype)
        self.residual = torch.randn(tokens, s.hidden, device=DEV).to(s.dtype)
        self.weight = (1 + 0.2 * torch.randn(s.hidden, device=DEV)).to(s.dtype)
        self.head_weight = (1 + 0.2 * torch.randn(s.head_dim, device=DEV)).to(s.dtype)
        self.qkv = torch.randn(tokens, self.q_size + 2 * self.kv_size, device=DEV).to(s.dtype)
        self.gate_up = (2 * torch.randn(tokens, 2 * s.inter, device=DEV)).to(s.dtype)
        self.positions = torch.randint(0, MAX_POS, (tokens,), device=DEV)
        self.cos_sin = RotaryEmbedding(s.head_dim, MAX_POS, {"rope_type": "default", "rope_theta": 500000.0}
                                       ).cos_sin.to(DEV)

    def q_k(self, qkv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H*D] and k [T, Hk*D]: strided column slices of the fused qkv output."""
        q, k, _ = (self.qkv if qkv is None else qkv).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return q, k

    def q_heads(self) -> torch.Tensor:
        return self.q_k()[0].view(self.tokens, self.shape.heads, self.shape.head_dim)


def compare(name: str, got: torch.Tensor, expect: torch.Tensor, tol: float) -> dict:
    """Pass when |got - expect| <= tol * (1 + |expect|) everywhere and all finite; also the share of bit-equal
    elements (rounding is reproduced, so it should be ~100%)."""
    assert got.shape == expect.shape and got.dtype == expect.dtype, (got.shape, expect.shape, got.dtype, expect.dtype)
    diff = (got.float() - expect.float()).abs()
    err = diff.max().item() if diff.numel() else 0.0
    ok = bool(torch.isfinite(got).all()) and bool((diff <= tol * (1 + expect.float().abs())).all())
    equal = (got == expect).float().mean().item() if got.numel() else 1.0
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: max abs err {err:.2e} (tol {tol:.0e}), {equal:.4%} bit-equal",
          flush=True)
    return dict(name=name, ok=ok, max_abs_err=err, tol=tol, bit_equal=equal)


# ---- correctness ----------------------------------------------------------------------------------------

def check_shape(s: Shape, tokens: int) -> list[dict]:
    inp, tol, tag = Inputs(s, tokens), TOL[s.dtype], f"{s.name} T={tokens}"
    out, res = rmsnorm_triton(inp.x, inp.weight, EPS, inp.residual)
    ref_out, ref_res = rmsnorm_ref(inp.x, inp.weight, EPS, inp.residual)
    results = [compare(f"rmsnorm+residual (residual) {tag}", res, ref_res, 0.0),
               compare(f"rmsnorm+residual (out) {tag}", out, ref_out, tol),
               compare(f"rmsnorm {tag}", rmsnorm_triton(inp.x, inp.weight, EPS), rmsnorm_ref(inp.x, inp.weight, EPS),
                       tol),
               compare(f"q_norm [T,H,D] view {tag}", rmsnorm_triton(inp.q_heads(), inp.head_weight, EPS),
                       rmsnorm_ref(inp.q_heads(), inp.head_weight, EPS), tol)]
    expect = inp.qkv.clone()
    rotary_ref(inp.positions, *inp.q_k(expect), inp.cos_sin, s.head_dim)
    rotary_triton(inp.positions, *inp.q_k(), inp.cos_sin, s.head_dim)
    results.append(compare(f"rotary in place on qkv views {tag}", inp.qkv, expect, tol))
    results.append(compare(f"silu_and_mul {tag}", silu_and_mul_triton(inp.gate_up), silu_and_mul_ref(inp.gate_up),
                           tol))
    return results


def layer_ops(inp: Inputs, norm: Callable, rope: Callable, act: Callable) -> tuple[torch.Tensor, ...]:
    """A Llama layer's small ops in order (the GEMMs and attention left out)."""
    h, res = norm(inp.x, inp.weight, EPS, inp.residual)
    rope(inp.positions, *inp.q_k(), inp.cos_sin, inp.shape.head_dim)
    h2, res2 = norm(h, inp.weight, EPS, res)
    return h2, res2, act(inp.gate_up)


def check_cuda_graph() -> list[dict]:
    """Capture the layer's ops once at T=64, replay with fresh inputs copied in, compare with the references."""
    inp = Inputs(LLAMA, 64)
    layer_ops(inp, rmsnorm_triton, rotary_triton, silu_and_mul_triton)        # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = layer_ops(inp, rmsnorm_triton, rotary_triton, silu_and_mul_triton)
    results = []
    for trial in range(3):
        fresh = Inputs(LLAMA, 64)
        for name in ("x", "residual", "qkv", "gate_up", "positions"):
            getattr(inp, name).copy_(getattr(fresh, name))
        graph.replay()
        expect = layer_ops(fresh, rmsnorm_ref, rotary_ref, silu_and_mul_ref)
        pairs = [*zip(("out", "residual", "silu"), outs, expect), ("rotated qkv", inp.qkv, fresh.qkv)]
        ok = all([compare(f"CUDA graph replay {trial}: {n}", g, e, TOL[LLAMA.dtype])["ok"] for n, g, e in pairs])
        results.append(dict(name=f"CUDA graph replay {trial}", ok=ok))
    return results


# ---- timings ----------------------------------------------------------------------------------------------

def bench_ms(fn: Callable) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def graph_ms(fn: Callable) -> float:
    """Per-call time of fn replayed from a CUDA graph of GRAPH_REPEAT back-to-back calls: no launch overhead
    from Python, but every kernel's start-up and tail, as in a captured decode step."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_REPEAT):
            fn()
    return bench_ms(graph.replay) / GRAPH_REPEAT


def timed_ops(inp: Inputs) -> dict[str, tuple[Callable, Callable, int]]:
    """op -> (new, old, bytes moved by an ideal single pass). The old q_norm includes the reshape copy the
    model does today; the new one reads the [T, H, D] view in place."""
    s, t, e = inp.shape, inp.tokens, inp.x.element_size()
    q, k = inp.q_k()
    q_heads = inp.q_heads()
    return {
        "rmsnorm+residual": (lambda: rmsnorm_triton(inp.x, inp.weight, EPS, inp.residual),
                             lambda: rmsnorm_ref(inp.x, inp.weight, EPS, inp.residual), 4 * t * s.hidden * e),
        "rmsnorm": (lambda: rmsnorm_triton(inp.x, inp.weight, EPS),
                    lambda: rmsnorm_ref(inp.x, inp.weight, EPS), 2 * t * s.hidden * e),
        "q_norm": (lambda: rmsnorm_triton(q_heads, inp.head_weight, EPS),
                   lambda: rmsnorm_ref(q.reshape(-1, s.head_dim), inp.head_weight, EPS), 2 * t * inp.q_size * e),
        "rotary": (lambda: rotary_triton(inp.positions, q, k, inp.cos_sin, s.head_dim),
                   lambda: rotary_ref(inp.positions, q, k, inp.cos_sin, s.head_dim),
                   2 * t * (inp.q_size + inp.kv_size) * e + t * s.head_dim * 4),
        "silu_and_mul": (lambda: silu_and_mul_triton(inp.gate_up), lambda: silu_and_mul_ref(inp.gate_up),
                         3 * t * s.inter * e),
    }


def time_ops() -> list[dict]:
    rows = []
    for tokens in TOKENS:
        inp = Inputs(LLAMA, tokens)
        for op, (new, old, moved) in timed_ops(inp).items():
            row = dict(op=op, tokens=tokens, bytes=moved, new_us=bench_ms(new) * 1e3, old_us=bench_ms(old) * 1e3)
            if tokens in GRAPH_TOKENS:
                row.update(new_graph_us=graph_ms(new) * 1e3, old_graph_us=graph_ms(old) * 1e3)
            row["new_gbs"] = moved / row["new_us"] / 1e3
            rows.append(row)
            graph = (f" | graph {row['old_graph_us']:.1f} -> {row['new_graph_us']:.1f} us"
                     if "new_graph_us" in row else "")
            print(f"  {op} T={tokens}: {row['old_us']:.1f} -> {row['new_us']:.1f} us "
                  f"({row['new_gbs']:.0f} GB/s){graph}", flush=True)
        del inp
    return rows


# One Llama layer runs two fused-residual RMSNorms, one rotary and one SiLU-and-mul (Qwen3 adds q and k norms).
LAYER_MIX = {"rmsnorm+residual": 2, "rotary": 1, "silu_and_mul": 1}


def per_step(rows: list[dict]) -> list[dict]:
    """Small-op time of a whole 32-layer forward, old vs new: graph timings for decode sizes, eager for prefill."""
    out = []
    for tokens in TOKENS:
        key = "graph_us" if tokens in GRAPH_TOKENS else "us"
        mine = {r["op"]: r for r in rows if r["tokens"] == tokens}
        old = LAYERS * sum(n * mine[op][f"old_{key}"] for op, n in LAYER_MIX.items())
        new = LAYERS * sum(n * mine[op][f"new_{key}"] for op, n in LAYER_MIX.items())
        out.append(dict(tokens=tokens, timing="graph" if key == "graph_us" else "eager", old_us=old, new_us=new))
    return out


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s, bytes read plus written."""
    src = torch.randn(1 << 28, device=DEV, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.nbytes / ms / 1e6


def print_table(res: dict) -> None:
    checks = res["checks"]
    print(f"\n== gpu_layers on {res['machine'].get('gpu')}: {sum(c['ok'] for c in checks)}/{len(checks)} "
          f"checks ok; copy bandwidth {res['copy_gbs']:.0f} GB/s")
    for c in checks:
        if not c["ok"]:
            print(f"   FAILED: {c['name']}")
    print(f"{'op (llama3-8b bf16)':18}{'T':>6}{'old us':>9}{'new us':>9}{'x':>6}{'GB/s':>7}{'of copy':>8}"
          f"{'graph old':>11}{'new':>7}{'x':>6}")
    for r in res["ops"]:
        graph = (f"{r['old_graph_us']:11.1f}{r['new_graph_us']:7.1f}{r['old_graph_us'] / r['new_graph_us']:6.1f}"
                 if "new_graph_us" in r else "")
        print(f"{r['op']:18}{r['tokens']:6d}{r['old_us']:9.1f}{r['new_us']:9.1f}{r['old_us'] / r['new_us']:6.1f}"
              f"{r['new_gbs']:7.0f}{r['new_gbs'] / res['copy_gbs']:8.0%}{graph}")
    print(f"per forward ({LAYERS} layers: 2 rmsnorm+residual, rotary, silu_and_mul each)")
    for r in res["per_step"]:
        print(f"  T={r['tokens']:<5} ({r['timing']}): {r['old_us']:8.0f} -> {r['new_us']:6.0f} us "
              f"(saves {r['old_us'] - r['new_us']:.0f} us)")


def main() -> int:
    torch.manual_seed(0)
    res = dict(machine=machine(), commit=commit(), checks=[])
    print("correctness", flush=True)
    for s in SHAPES:
        for tokens in TOKENS if s is LLAMA else (1, 64, 1000):
            res["checks"] += check_shape(s, tokens)
    res["checks"] += check_cuda_graph()
    print("timings", flush=True)
    res["copy_gbs"] = copy_bandwidth()
    res["ops"] = time_ops()
    res["per_step"] = per_step(res["ops"])
    print_table(res)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "gpu_layers.json"
        path.write_text(json.dumps(res, indent=1))
        print(f"wrote {path}")
    return 0 if all(c["ok"] for c in res["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
