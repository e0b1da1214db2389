"""Tune the decode attention launch (split count and tile config) where decode batches actually live.

Llama-3-8B attention (32 query heads, 8 KV heads, head_dim 128, bf16, block_size 16), sequences of mixed
lengths U[ctx/2, 3ctx/2] as in a serving batch, block tables as wide as the engine's graphs (max_model_len
4096), timed inside a CUDA graph (as the engine replays it). For each (batch, ctx) prints GB/s of KV read for
the current heuristic and for the best (splits, config) found, so the heuristic can be set from data.

Usage (GPU machine, repository root): python bench/gpu_decode_tune.py; JSON to $OUT/gpu_decode_tune.json.
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
from ccserve.kernels.decode_attention import (DecodeConfig, decode_attention_ref, decode_attention_triton,  # noqa: E402
                                              num_decode_splits, num_sms)

H, HK, D, BS, WIDTH = 32, 8, 128, 16, 256
CONFIGS = [DecodeConfig(64, 4, 2), DecodeConfig(32, 4, 2), DecodeConfig(32, 4, 3), DecodeConfig(16, 4, 3),
           DecodeConfig(64, 8, 2)]
SPLITS = [1, 2, 4, 8]


def inputs(batch: int, ctx: int, gen: torch.Generator) -> dict:
    lens = torch.randint(ctx // 2, ctx + ctx // 2 + 1, (batch,), generator=gen).clamp(max=WIDTH * BS)
    blocks = (lens + BS - 1) // BS
    num_blocks = int(blocks.sum()) + 1
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    tables = torch.zeros(batch, WIDTH, dtype=torch.int32)
    start = 0
    for b, n in enumerate(blocks.tolist()):
        tables[b, :n] = perm[start:start + n]
        start += n
    k = torch.randn(num_blocks, HK, BS, D, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(batch, H, D, dtype=torch.bfloat16, device="cuda")
    return dict(q=q, k_cache=k, v_cache=v, seq_lens=lens.to(torch.int32).cuda(), block_tables=tables.cuda(),
                scale=D ** -0.5, kv_bytes=int(lens.sum()) * HK * D * 2 * 2)


def time_us(x: dict, splits: int | None, cfg: DecodeConfig | None) -> float:
    out = torch.empty_like(x["q"])
    args = (x["q"], x["k_cache"], x["v_cache"], x["seq_lens"], x["block_tables"], x["scale"], out)
    fn = lambda: decode_attention_triton(*args, num_splits=splits, config=cfg)  # noqa: E731
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    sms = num_sms(torch.device("cuda"))
    rows, ok = [], True
    check = inputs(4, 700, gen)
    for splits in SPLITS:
        for cfg in CONFIGS:
            got = decode_attention_triton(check["q"], check["k_cache"], check["v_cache"], check["seq_lens"],
                                          check["block_tables"], check["scale"], num_splits=splits, config=cfg)
            ref = decode_attention_ref(check["q"], check["k_cache"], check["v_cache"], check["seq_lens"],
                                       check["block_tables"], check["scale"])
            err = (got.float() - ref.float()).abs().max().item()
            ok &= err < 3e-2
    print("correctness (all splits x configs vs reference):", "ok" if ok else "FAILED")
    for batch in (8, 32, 64, 128, 256):
        for ctx in (256, 512, 1024, 2048):
            x = inputs(batch, ctx, gen)
            current = time_us(x, None, None)
            best = (current, None, None)
            sweep = []
            for splits in SPLITS:
                for cfg in CONFIGS:
                    us = time_us(x, splits, cfg)
                    sweep.append({"splits": splits, "config": str(cfg), "us": us})
                    if us < best[0]:
                        best = (us, splits, cfg)
            gbs = lambda us: x["kv_bytes"] / us / 1e3  # noqa: E731
            row = {"batch": batch, "ctx": ctx, "kv_MB": x["kv_bytes"] / 1e6,
                   "current_splits": num_decode_splits(batch, HK, WIDTH * BS, sms), "current_us": current,
                   "current_GBps": gbs(current), "best_us": best[0], "best_GBps": gbs(best[0]),
                   "best_splits": best[1], "best_config": str(best[2]), "sweep": sweep}
            rows.append(row)
            print(f"batch {batch:4d} ctx {ctx:5d}: current {current:8.1f} us {gbs(current):6.0f} GB/s | best "
                  f"{best[0]:8.1f} us {gbs(best[0]):6.0f} GB/s splits={best[1]} {best[2]}", flush=True)
    out = Path(os.environ.get("OUT", "bench/results")) / "gpu_decode_tune.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "commit": commit(), "ok": ok, "rows": rows}, indent=1))
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
