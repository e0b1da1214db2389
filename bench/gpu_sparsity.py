"""--kv-sparsity's importance scores on the GPU, in one call: kernels against the references first, then what the
scores cost per decode step of attention.

1. Check: on the GPU, the Triton attention with log2-sum-exp out plus the importance kernel add the same mass as
   decode_attention_ref / prefill_attention_ref with `importance` (bf16 and K8V4 caches, a random keep mask).
2. Timing (Llama-3-8B shape: 32 query / 8 KV heads, head_dim 128, block_size 16; CUDA graphs of one layer's decode
   attention): without scores, and with the log2-sum-exp and the importance pass, at BATCH sequences of 1K and 4K.
3. A short table last. The engine rows: `KV_SPARSITY=0.5 python bench/gpu_engine.py A-mixed C-decode`.

Usage (on the GPU machine, repository root): python bench/gpu_sparsity.py
Env: OUT (directory for the JSON), CCSERVE_COMMIT (commit id; the device copy has no .git), BATCH (default 64).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccserve.bench.throughput import commit, machine  # noqa: E402
from ccserve.kernels.attention_importance import add_decode_importance, add_prefill_importance  # noqa: E402
from ccserve.kernels.decode_attention import decode_attention_ref, decode_attention_triton  # noqa: E402
from ccserve.kernels.kv_store import store_kv_ref  # noqa: E402
from ccserve.kernels.prefill_attention import prefill_attention_ref, prefill_attention_triton  # noqa: E402
from ccserve.kv.cache import KVCache  # noqa: E402
from ccserve.kv.formats import PRESETS  # noqa: E402

H, HK, D, BS = 32, 8, 128, 16
BATCH = int(os.environ.get("BATCH", 64))


def filled(fmt: str, seq_lens: list[int]) -> tuple[object, object, torch.Tensor, torch.Tensor]:
    """K, V operands holding seq_lens random tokens per sequence over shuffled blocks, the tables and the mask."""
    per = [-(-n // BS) for n in seq_lens]
    num_blocks = sum(per) + 1
    cache = KVCache(1, HK, BS, D, num_blocks, torch.bfloat16, torch.device("cuda"), PRESETS[fmt].resolve(D, BS),
                    sparse=True)
    ids = torch.randperm(num_blocks, device="cuda")
    tables = torch.zeros(len(seq_lens), max(per), dtype=torch.int32, device="cuda")
    slots, start = [], 0
    for s, n in enumerate(per):
        tables[s, :n] = ids[start:start + n]
        start += n
        p = torch.arange(seq_lens[s], device="cuda")
        slots.append(tables[s, p // BS].long() * BS + p % BS)
    slots = torch.cat(slots)
    k, v = cache.keys.layer(0), cache.values.layer(0)
    store_kv_ref(torch.randn(len(slots), HK, D, device="cuda", dtype=torch.bfloat16),
                 torch.randn(len(slots), HK, D, device="cuda", dtype=torch.bfloat16), k, v, slots)
    pruned = cache.sparse.pruned[0]
    pruned.copy_((torch.rand(pruned.shape, device="cuda") < 0.3).to(torch.uint8))
    pruned[:, :, 0] = 0
    return k, v, tables, pruned


def check(fmt: str) -> dict:
    """Importance from the kernels against the references on the GPU (relative error of the summed mass)."""
    torch.manual_seed(0)
    lens = [300, 17, 1025, 64]
    k, v, tables, pruned = filled(fmt, lens)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lens), H, D, device="cuda", dtype=torch.bfloat16)
    want = torch.zeros(pruned.shape, device="cuda")
    decode_attention_ref(q, k, v, seq_lens, tables, D ** -0.5, pruned=pruned, importance=want)
    lse = torch.empty(q.shape[:2], device="cuda")
    decode_attention_triton(q, k, v, seq_lens, tables, D ** -0.5, pruned=pruned, lse=lse)
    got = torch.zeros_like(want)
    add_decode_importance(q, k, seq_lens, tables, D ** -0.5, lse, got, pruned)
    decode_err = float((got - want).abs().max() / want.abs().max())
    chunks = torch.tensor([0, 100, 117, 217, 281], dtype=torch.int32, device="cuda")   # chunk lengths 100/17/100/64
    qp = torch.randn(int(chunks[-1]), H, D, device="cuda", dtype=torch.bfloat16)
    want.zero_()
    prefill_attention_ref(qp, k, v, chunks, seq_lens, tables, D ** -0.5, 100, pruned=pruned, importance=want)
    lse = torch.empty(qp.shape[:2], device="cuda")
    prefill_attention_triton(qp, k, v, chunks, seq_lens, tables, D ** -0.5, 100, pruned=pruned, lse=lse)
    got.zero_()
    add_prefill_importance(qp, k, chunks, seq_lens, tables, D ** -0.5, lse, got, pruned)
    prefill_err = float((got - want).abs().max() / want.abs().max())
    ok = decode_err < 2e-2 and prefill_err < 2e-2     # bf16 scores
    return dict(decode_max_rel_err=decode_err, prefill_max_rel_err=prefill_err, ok=ok)


def graph_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=20, rep=200) * 1e3


def timing(fmt: str, context: int) -> dict:
    k, v, tables, pruned = filled(fmt, [context] * BATCH)
    seq_lens = torch.full((BATCH,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(BATCH, H, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], device="cuda")
    importance = torch.zeros(pruned.shape, device="cuda")
    plain = graph_us(lambda: decode_attention_triton(q, k, v, seq_lens, tables, D ** -0.5, out, pruned=pruned))

    def scored():
        decode_attention_triton(q, k, v, seq_lens, tables, D ** -0.5, out, pruned=pruned, lse=lse)
        add_decode_importance(q, k, seq_lens, tables, D ** -0.5, lse, importance, pruned)
    with_scores = graph_us(scored)
    return dict(format=fmt, context=context, batch=BATCH, attention_us=plain, with_importance_us=with_scores,
                overhead=with_scores / plain - 1)


def main() -> None:
    result = dict(machine=machine(), commit=commit(), shape=dict(heads=H, kv_heads=HK, head_dim=D, block_size=BS))
    result["check"] = {fmt: check(fmt) for fmt in ("bf16", "K8V4")}
    print("check", result["check"], flush=True)
    if not all(c["ok"] for c in result["check"].values()):
        raise SystemExit("importance kernels differ from the references on the GPU: not timing")
    result["timing"] = [timing(fmt, ctx) for fmt in ("bf16", "K8V4") for ctx in (1024, 4096)]
    out_dir = Path(os.environ.get("OUT", "bench/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_sparsity.json").write_text(json.dumps(result, indent=1))
    print("\n| format | context | batch | attention us | + importance us | overhead |\n|---|---|---|---|---|---|")
    for r in result["timing"]:
        print(f"| {r['format']} | {r['context']} | {r['batch']} | {r['attention_us']:.1f} | "
              f"{r['with_importance_us']:.1f} | {100 * r['overhead']:+.0f}% |")


if __name__ == "__main__":
    main()
