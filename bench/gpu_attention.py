"""GPU check and benchmark of the Triton attention kernels (store_kv, prefill, decode), in one call.

1. Correctness of each Triton kernel against its PyTorch reference: Llama-3-8B shapes (H=32, Hk=8, D=128,
   bf16, block_size 16, shuffled block tables) and a few odd ones (MHA, MQA, head_dim 64/80, fp16, fp32,
   K/V dtypes differing from q, block sizes 8/32), then decode replayed from a captured CUDA graph.
2. Timings (triton.testing.do_bench, median): prefill in TFLOP/s next to SDPA-flash on the same data laid
   out contiguously; decode in GB/s of KV read next to the device's copy bandwidth; store_kv; a small sweep
   of tile configs, to tune the defaults.
3. A compact table; JSON to $OUT/gpu_attention.json when OUT is set. Exit status 1 if any check failed.

Usage (GPU machine, repository root): python bench/gpu_attention.py
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccserve.bench.throughput import commit, machine  # noqa: E402
from ccserve.kernels.decode_attention import (DecodeConfig, decode_attention, decode_attention_ref,  # noqa: E402
                                              decode_attention_triton, num_decode_splits, num_sms)
from ccserve.kernels.kv_store import store_kv_ref, store_kv_triton  # noqa: E402
from ccserve.kernels.prefill_attention import (PrefillConfig, prefill_attention_ref,  # noqa: E402
                                               prefill_attention_triton, prefill_config)

DEV = "cuda"
H, HK, D, BS = 32, 8, 128, 16                 # Llama-3-8B attention, block_size 16
DT = torch.bfloat16
TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
PREFILL_SWEEP = [PrefillConfig(128, 64, 8, 3), PrefillConfig(128, 128, 8, 3), PrefillConfig(128, 32, 8, 3),
                 PrefillConfig(64, 64, 4, 3)]
DECODE_SWEEP = [DecodeConfig(64, 4, 2), DecodeConfig(64, 4, 3), DecodeConfig(32, 4, 4), DecodeConfig(128, 4, 2)]


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def paged_cache(num_blocks: int, num_kv_heads: int, head_dim: int, block_size: int,
                k_dtype: torch.dtype, v_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    return torch.randn(shape, device=DEV).to(k_dtype), torch.randn(shape, device=DEV).to(v_dtype)


def block_tables(seq_lens: list[int], block_size: int, num_blocks: int, width: int | None = None) -> torch.Tensor:
    """Each sequence gets distinct, shuffled (non-contiguous) blocks; unused entries stay 0."""
    per_seq = [triton.cdiv(n, block_size) for n in seq_lens]
    width = width or max(max(per_seq), 1)
    ids = torch.randperm(num_blocks, device=DEV)[:sum(per_seq)].to(torch.int32)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32, device=DEV)
    start = 0
    for s, n in enumerate(per_seq):
        tables[s, :n] = ids[start:start + n]
        start += n
    return tables


def prefill_inputs(chunks: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                   dtype: torch.dtype, k_dtype: torch.dtype, v_dtype: torch.dtype) -> dict:
    """chunks: (query tokens, tokens already cached before them) per sequence."""
    seq_lens = [q + c for q, c in chunks]
    num_blocks = sum(triton.cdiv(n, block_size) for n in seq_lens) + 8
    k_cache, v_cache = paged_cache(num_blocks, num_kv_heads, head_dim, block_size, k_dtype, v_dtype)
    cu = torch.tensor([0] + [q for q, _ in chunks], device=DEV).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), num_heads, head_dim, device=DEV).to(dtype)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=cu,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEV),
                block_tables=block_tables(seq_lens, block_size, num_blocks), scale=head_dim ** -0.5,
                max_query_len=max(q for q, _ in chunks))


def compare(name: str, got: torch.Tensor, expect: torch.Tensor, tol: float) -> dict:
    """Pass when |got - expect| <= tol * (1 + |expect|) everywhere (bf16 rounding is relative) and all finite."""
    diff = (got.float() - expect.float()).abs()
    err = diff.max().item()
    ok = bool(torch.isfinite(got).all()) and bool((diff <= tol * (1 + expect.float().abs())).all())
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: max abs err {err:.2e} (tol {tol:.0e})", flush=True)
    return dict(name=name, ok=ok, max_abs_err=err, tol=tol)


# ---- correctness ----------------------------------------------------------------------------------------

CASES = [  # (name, H, Hk, D, block_size, q dtype, K dtype, V dtype)
    ("llama3-8b bf16", H, HK, D, BS, DT, DT, DT),
    ("mha d64 fp16 bs32", 16, 16, 64, 32, torch.float16, torch.float16, torch.float16),
    ("mqa d80 bf16 bs8", 12, 1, 80, 8, DT, DT, DT),
    ("gqa fp32", 8, 2, 128, 16, torch.float32, torch.float32, torch.float32),
    ("gqa bf16 q, fp16 K, fp32 V", 8, 2, 128, 16, DT, torch.float16, torch.float32),
]


def check_store_kv() -> list[dict]:
    results = []
    for name, _, hk, d, bs, dt, kdt, vdt in CASES:
        num_blocks, tokens = 64, 300
        qkv = torch.randn(tokens, (2 + 2 * hk) * d, device=DEV).to(dt)        # strided K/V views, as in a model
        key = qkv[:, 2 * d:(2 + hk) * d].view(tokens, hk, d)
        value = qkv[:, (2 + hk) * d:].view(tokens, hk, d)
        slots = torch.randperm(num_blocks * bs, device=DEV)[:tokens]
        slots[::7] = -1
        k_cache, v_cache = paged_cache(num_blocks, hk, d, bs, kdt, vdt)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        store_kv_ref(key, value, k_ref, v_ref, slots)
        store_kv_triton(key, value, k_cache, v_cache, slots)
        ok = torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
        print(f"  {'ok  ' if ok else 'FAIL'} store_kv {name}: exact", flush=True)
        results.append(dict(name=f"store_kv {name}", ok=ok))
    return results


def check_prefill() -> list[dict]:
    chunks = [(1024, 0), (700, 300), (1, 2000), (2048, 2048), (37, 5), (129, 0)]
    results = []
    for name, h, hk, d, bs, dt, kdt, vdt in CASES:
        inp = prefill_inputs(chunks if name.startswith("llama") else chunks[:3] + chunks[4:], h, hk, d, bs, dt,
                             kdt, vdt)
        expect = prefill_attention_ref(**inp)
        out = torch.full_like(inp["q"], float("nan"))
        got = prefill_attention_triton(**inp, out=out)
        results.append(compare(f"prefill {name}", got, expect, TOL[dt]))
    return results


def check_decode() -> list[dict]:
    results = []
    for name, h, hk, d, bs, dt, kdt, vdt in CASES:
        for batch, max_len in ((64, 4096), (3, 16384)):          # plain, and few long sequences (split-K)
            lens = torch.randint(1, max_len + 1, (batch,)).tolist()
            lens[1] = 0                                          # padded batch row
            num_blocks = sum(triton.cdiv(n, bs) for n in lens) + 8
            k_cache, v_cache = paged_cache(num_blocks, hk, d, bs, kdt, vdt)
            tables = block_tables(lens, bs, num_blocks)
            q = torch.randn(batch, h, d, device=DEV).to(dt)
            seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
            expect = decode_attention_ref(q, k_cache, v_cache, seq_lens, tables, d ** -0.5)
            out = torch.full_like(q, float("nan"))
            got = decode_attention_triton(q, k_cache, v_cache, seq_lens, tables, d ** -0.5, out=out)
            splits = num_decode_splits(batch, hk, tables.shape[1] * bs, num_sms(q.device))
            res = compare(f"decode {name} B={batch} splits={splits}", got, expect, TOL[dt])
            res["ok"] = res["ok"] and bool((got[1] == 0).all())
            results.append(res)
    return results


def check_decode_cuda_graph() -> list[dict]:
    """Capture decode once (with fixed-width tables, split-K on), replay with new lengths, tables and queries."""
    batch, width = 8, 256
    num_blocks = batch * width + 8
    k_cache, v_cache = paged_cache(num_blocks, HK, D, BS, DT, DT)
    q = torch.randn(batch, H, D, device=DEV, dtype=DT)
    seq_lens = torch.full((batch,), width * BS, dtype=torch.int32, device=DEV)
    tables = block_tables(seq_lens.tolist(), BS, num_blocks, width)
    out = torch.empty_like(q)
    decode_attention(q, k_cache, v_cache, seq_lens, tables, D ** -0.5, out=out)       # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, k_cache, v_cache, seq_lens, tables, D ** -0.5, out=out)
    splits = num_decode_splits(batch, HK, width * BS, num_sms(q.device))
    results = []
    for trial in range(3):
        lens = torch.randint(0, width * BS + 1, (batch,)).tolist()
        lens[trial] = 0
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        tables.copy_(block_tables(lens, BS, num_blocks, width))
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        expect = decode_attention_ref(q, k_cache, v_cache, seq_lens, tables, D ** -0.5)
        results.append(compare(f"decode CUDA graph replay {trial} (splits={splits})", out, expect, TOL[DT]))
    return results


# ---- timings ----------------------------------------------------------------------------------------------

def attended_pairs(chunks: list[tuple[int, int]]) -> int:
    return sum(q * c + q * (q + 1) // 2 for q, c in chunks)


def sdpa_flash_ms(chunks: list[tuple[int, int]]) -> tuple[float, float]:
    """SDPA-flash on contiguous [B, H, L, D] (K/V heads repeated): causal when there is no cached context,
    else non-causal over the whole context (the nearest shape it supports). Returns (ms, flops)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q_len, ctx = chunks[0]
    b = len(chunks)
    q = torch.randn(b, H, q_len, D, device=DEV, dtype=DT)
    k = torch.randn(b, H, q_len + ctx, D, device=DEV, dtype=DT)
    v = torch.randn_like(k)
    causal = ctx == 0
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ms = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
    pairs = attended_pairs(chunks) if causal else b * q_len * (q_len + ctx)
    return ms, 4 * H * D * pairs


PREFILL_CASES = {  # name -> chunks (query tokens, cached tokens) per sequence
    "8x1024 fresh": [(1024, 0)] * 8,
    "1x8192 fresh": [(8192, 0)],
    "32x256 fresh": [(256, 0)] * 32,
    "2048 chunk over 2048 cached": [(2048, 2048)],
}


def time_prefill() -> tuple[list[dict], list[dict]]:
    rows, sweep = [], []
    for name, chunks in PREFILL_CASES.items():
        inp = prefill_inputs(chunks, H, HK, D, BS, DT, DT, DT)
        flops = 4 * H * D * attended_pairs(chunks)
        ms = bench_ms(lambda: prefill_attention_triton(**inp))
        sdpa_ms, sdpa_flops = sdpa_flash_ms(chunks)
        rows.append(dict(case=name, ms=ms, tflops=flops / ms / 1e9, sdpa_ms=sdpa_ms,
                         sdpa_tflops=sdpa_flops / sdpa_ms / 1e9, config=str(prefill_config(D, DT))))
        print(f"  prefill {name}: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s | "
              f"sdpa-flash {sdpa_flops / sdpa_ms / 1e9:.0f} TFLOP/s", flush=True)
        if name in ("8x1024 fresh", "1x8192 fresh"):
            for cfg in PREFILL_SWEEP:
                try:
                    cms = bench_ms(lambda: prefill_attention_triton(**inp, config=cfg))
                except Exception as e:  # noqa: BLE001  (a config that does not fit is a result, not a crash)
                    sweep.append(dict(case=name, config=str(cfg), error=repr(e)[:200]))
                    continue
                sweep.append(dict(case=name, config=str(cfg), ms=cms, tflops=flops / cms / 1e9))
                print(f"    {cfg}: {flops / cms / 1e9:.0f} TFLOP/s", flush=True)
        del inp
    return rows, sweep


def time_decode(copy_gbs: float) -> tuple[list[dict], list[dict]]:
    """Tables are 256 blocks wide (max_model_len 4096), as the engine's CUDA graphs see them."""
    width = 4096 // BS
    num_blocks = 256 * width + 8
    k_cache, v_cache = paged_cache(num_blocks, HK, D, BS, DT, DT)
    rows, sweep = [], []
    for batch in (1, 64, 256):
        for ctx in (512, 1024, 2048, 4096):
            lens = [ctx] * batch
            tables = block_tables(lens, BS, num_blocks, width)
            q = torch.randn(batch, H, D, device=DEV, dtype=DT)
            seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
            kv_bytes = batch * ctx * HK * D * 2 * k_cache.element_size()
            ms = bench_ms(lambda: decode_attention_triton(q, k_cache, v_cache, seq_lens, tables, D ** -0.5))
            splits = num_decode_splits(batch, HK, width * BS, num_sms(q.device))
            gbs = kv_bytes / ms / 1e6
            rows.append(dict(batch=batch, ctx=ctx, splits=splits, us=ms * 1e3, gbs=gbs, frac_copy=gbs / copy_gbs))
            print(f"  decode B={batch} ctx={ctx} splits={splits}: {ms * 1e3:.1f} us {gbs:.0f} GB/s "
                  f"({gbs / copy_gbs:.0%} of copy)", flush=True)
            if (batch, ctx) in ((1, 4096), (64, 2048), (256, 512), (256, 4096)):
                for cfg in DECODE_SWEEP:
                    cms = bench_ms(lambda: decode_attention_triton(q, k_cache, v_cache, seq_lens, tables, D ** -0.5,
                                                                   config=cfg))
                    sweep.append(dict(batch=batch, ctx=ctx, config=str(cfg), us=cms * 1e3, gbs=kv_bytes / cms / 1e6))
                    print(f"    {cfg}: {kv_bytes / cms / 1e6:.0f} GB/s", flush=True)
    return rows, sweep


def time_store_kv() -> list[dict]:
    rows = []
    for tokens in (256, 8192):
        num_blocks = 2 * tokens // BS + 8
        k_cache, v_cache = paged_cache(num_blocks, HK, D, BS, DT, DT)
        qkv = torch.randn(tokens, (H + 2 * HK) * D, device=DEV, dtype=DT)
        key = qkv[:, H * D:(H + HK) * D].view(tokens, HK, D)
        value = qkv[:, (H + HK) * D:].view(tokens, HK, D)
        slots = torch.randperm(num_blocks * BS, device=DEV)[:tokens]
        ms = bench_ms(lambda: store_kv_triton(key, value, k_cache, v_cache, slots))
        moved = 2 * 2 * tokens * HK * D * DT.itemsize            # K and V, read and written
        rows.append(dict(tokens=tokens, us=ms * 1e3, gbs=moved / ms / 1e6))
        print(f"  store_kv T={tokens}: {ms * 1e3:.1f} us {moved / ms / 1e6:.0f} GB/s", flush=True)
    return rows


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s, bytes read plus written."""
    src = torch.randn(1 << 29, device=DEV, dtype=DT)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.nbytes / ms / 1e6


def print_table(res: dict) -> None:
    checks = res["checks"]
    print(f"\n== gpu_attention on {res['machine'].get('gpu')}: {sum(c['ok'] for c in checks)}/{len(checks)} "
          f"checks ok; copy bandwidth {res['copy_gbs']:.0f} GB/s")
    for c in checks:
        if not c["ok"]:
            print(f"   FAILED: {c['name']}")
    print(f"{'prefill (bf16, H32 Hk8 D128)':34}{'ms':>9}{'TFLOP/s':>9}{'sdpa':>9}{'ratio':>7}")
    for r in res["prefill"]:
        ratio = r["tflops"] / r["sdpa_tflops"]
        print(f"{r['case']:34}{r['ms']:9.3f}{r['tflops']:9.0f}{r['sdpa_tflops']:9.0f}{ratio:7.2f}")
    print(f"{'decode':20}{'splits':>7}{'us':>9}{'GB/s':>8}{'of copy':>9}")
    for r in res["decode"]:
        print(f"{'B=%d ctx=%d' % (r['batch'], r['ctx']):20}{r['splits']:7d}{r['us']:9.1f}{r['gbs']:8.0f}"
              f"{r['frac_copy']:9.0%}")
    for r in res["store_kv"]:
        print(f"store_kv T={r['tokens']:<10}{r['us']:9.1f} us{r['gbs']:8.0f} GB/s")
    best = {}
    for r in res["prefill_sweep"] + res["decode_sweep"]:
        key = r.get("case") or f"decode B={r['batch']} ctx={r['ctx']}"
        score = r.get("tflops") or r.get("gbs") or 0
        if score > best.get(key, (0, ""))[0]:
            best[key] = (score, r["config"])
    for key, (score, cfg) in best.items():
        print(f"best {key}: {cfg} ({score:.0f})")


def main() -> int:
    torch.manual_seed(0)
    res = dict(machine=machine(), commit=commit(), checks=[])
    print("correctness", flush=True)
    res["checks"] += check_store_kv() + check_prefill() + check_decode() + check_decode_cuda_graph()
    print("timings", flush=True)
    res["copy_gbs"] = copy_bandwidth()
    res["prefill"], res["prefill_sweep"] = time_prefill()
    res["decode"], res["decode_sweep"] = time_decode(res["copy_gbs"])
    res["store_kv"] = time_store_kv()
    print_table(res)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "gpu_attention.json"
        path.write_text(json.dumps(res, indent=1))
        print(f"wrote {path}")
    return 0 if all(c["ok"] for c in res["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
