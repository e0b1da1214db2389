"""KV-cache formats on the GPU, in one call: kernels against their references first, then decode attention time
per preset against bf16 at 1K/4K/16K context, then B-pressure and C-decode throughput per preset.

Llama-3-8B shape (32 query heads, 8 KV heads, head_dim 128, block_size 16, bf16, dummy weights).

Usage (on the GPU machine, repository root): python bench/gpu_kv_formats.py [PRESET ...]
Env: OUT (directory for the JSON), CCSERVE_COMMIT (commit id; the device copy has no .git), SKIP_CHECK=1,
SKIP_KERNEL=1, SKIP_ENGINE=1, WORKLOADS (default "B-pressure C-decode"), BATCH (decode timing batch, 16),
MAX_NUM_SEQS (engine runs, default 256: a compressed cache only pays on B-pressure when more sequences may run),
CONFIGS (decode tile sweep, see decode_configs), ENGINE_PRESETS (the presets of the engine rows, default all).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccserve import LLM  # noqa: E402
from ccserve.bench.throughput import commit, machine, run_workload  # noqa: E402
from ccserve.kernels.decode_attention import DecodeConfig, decode_attention_ref, decode_attention_triton  # noqa: E402
from ccserve.kernels.kv_quant import dequantize_blocks_ref  # noqa: E402
from ccserve.kernels.kv_store import store_kv_ref, store_kv_triton  # noqa: E402
from ccserve.kernels.prefill_attention import prefill_attention_ref, prefill_attention_triton  # noqa: E402
from ccserve.kv.cache import KVCache  # noqa: E402
from ccserve.kv.formats import PRESETS  # noqa: E402

MODEL = Path(__file__).resolve().parent / "models" / "llama3-8b"
H, HK, D, BS = 32, 8, 128, 16
PEERS = {"B-pressure": 9479, "C-decode": 7036}


def operands(fmt_name: str, num_blocks: int) -> tuple[KVCache, object, object]:
    cache = KVCache(1, HK, BS, D, num_blocks, torch.bfloat16, torch.device("cuda"),
                    PRESETS[fmt_name].resolve(D, BS))
    return cache, cache.keys.layer(0), cache.values.layer(0)


def as_float(op, num_blocks: int) -> torch.Tensor:
    if isinstance(op, torch.Tensor):
        return op.float()
    return dequantize_blocks_ref(op, torch.arange(num_blocks, device="cuda"))


def step_slots(tables: torch.Tensor, starts: list[int], counts: list[int]) -> torch.Tensor:
    slots = []
    for s, (start, n) in enumerate(zip(starts, counts)):
        p = torch.arange(start, start + n, device="cuda")
        slots.append(tables[s, p // BS].long() * BS + p % BS)
    return torch.cat(slots)


def check_kernels(name: str) -> dict:
    """Store (prefill chunk, then decode appends), decode and prefill attention against the references on the GPU.
    GPU fp32 division is not IEEE-exact, so codes may differ by one step: compare dequantized values."""
    torch.manual_seed(0)
    seqs, num_blocks = 4, 4 * 40
    tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(seqs, 40)
    _, k_ref, v_ref = operands(name, num_blocks)
    _, k_got, v_got = operands(name, num_blocks)
    lens = [0] * seqs
    for counts in ([300, 77, 1, 450], [1, 1, 1, 1], [1, 1, 1, 1], [33, 0, 16, 5]):
        slots = step_slots(tables, lens, counts)
        kv = torch.randn(len(slots), 2, HK, D, device="cuda", dtype=torch.bfloat16)
        store_kv_ref(kv[:, 0], kv[:, 1], k_ref, v_ref, slots)
        store_kv_triton(kv[:, 0], kv[:, 1], k_got, v_got, slots)
        lens = [a + b for a, b in zip(lens, counts)]
    out = {}
    for label, got, ref in (("store_k", k_got, k_ref), ("store_v", v_got, v_ref)):
        diff = (as_float(got, num_blocks) - as_float(ref, num_blocks)).abs().max().item()
        step = 0.0 if isinstance(got, torch.Tensor) else got.scale.float().abs().max().item()
        out[label] = dict(max_abs_diff=diff, ok=diff <= step * 1.01 + 1e-2)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(seqs, H, D, device="cuda", dtype=torch.bfloat16)
    expect = decode_attention_ref(q, k_ref, v_ref, seq_lens, tables, D ** -0.5)
    got = decode_attention_triton(q, k_ref, v_ref, seq_lens, tables, D ** -0.5)
    out["decode"] = _compare(got, expect)
    q_lens = [20, 1, 16, 7]                    # each at most its sequence length (335, 79, 19, 457)
    cu = torch.tensor([0] + q_lens, device="cuda").cumsum(0).to(torch.int32)
    qp = torch.randn(sum(q_lens), H, D, device="cuda", dtype=torch.bfloat16)
    expect = prefill_attention_ref(qp, k_ref, v_ref, cu, seq_lens, tables, D ** -0.5, 20)
    got = prefill_attention_triton(qp, k_ref, v_ref, cu, seq_lens, tables, D ** -0.5, 20)
    out["prefill"] = _compare(got, expect)
    return out


def _compare(got: torch.Tensor, expect: torch.Tensor) -> dict:
    """bf16 outputs: within 2e-2 absolute + 2e-2 relative (the kernel tests' bf16 tolerance)."""
    diff = (got.float() - expect.float()).abs()
    return dict(max_abs_diff=diff.max().item(), ok=bool((diff <= 2e-2 + 2e-2 * expect.float().abs()).all()))


def decode_configs() -> list[DecodeConfig | None]:
    """None (the kernel's default) plus each BLOCK_NxWARPSxSTAGESxPROGRAMS_PER_SM of env CONFIGS (e.g.
    "128x4x2x2,64x8x3x8")."""
    configs: list[DecodeConfig | None] = [None]
    for item in filter(None, os.environ.get("CONFIGS", "").split(",")):
        n, w, st, per_sm = (int(x) for x in item.split("x"))
        configs.append(DecodeConfig(block_n=n, num_warps=w, num_stages=st, programs_per_sm=per_sm))
    return configs


def decode_time_us(name: str, batch: int, ctx: int) -> dict:
    """Decode attention over `batch` sequences of `ctx` tokens, timed inside a CUDA graph (as the engine runs it):
    the default config, and each of CONFIGS ('by_config'; 'us' stays the default's)."""
    per_seq = ctx // BS
    num_blocks = batch * per_seq
    _, k, v = operands(name, num_blocks)
    tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, per_seq)
    slots = step_slots(tables, [0] * batch, [ctx] * batch)
    for part in slots.split(1 << 16):                        # fill the cache through the store kernel
        kv = torch.randn(len(part), 2, HK, D, device="cuda", dtype=torch.bfloat16)
        store_kv_triton(kv[:, 0], kv[:, 1], k, v, part)
    q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    timings = {}
    for config in decode_configs():
        fn = lambda: decode_attention_triton(q, k, v, lens, tables, D ** -0.5, out=out, config=config)  # noqa: E731
        fn()
        label = "default" if config is None else \
            f"{config.block_n}x{config.num_warps}x{config.num_stages}x{config.programs_per_sm}"
        timings[label] = round(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3, 1)
    us = timings["default"]
    kv_bytes = sum(t.nbytes for t in _tensors(k) + _tensors(v))
    result = dict(us=us, kv_gb_s=round(kv_bytes / us / 1e3, 1), kv_mb=round(kv_bytes / 1e6, 1))
    if len(timings) > 1:
        result["by_config"] = timings
    return result


def _tensors(op) -> list[torch.Tensor]:
    if isinstance(op, torch.Tensor):
        return [op]
    return [t for t in (op.data, op.scale, op.zero) if t is not None]


def engine_throughput(name: str, workloads: list[str]) -> dict:
    llm = LLM(str(MODEL), load_format="dummy", dtype="bfloat16", max_model_len=4096, gpu_memory_utilization=0.9,
              kv_format=name, max_num_seqs=int(os.environ.get("MAX_NUM_SEQS", 256)))
    result = dict(num_kv_blocks=llm.engine.runner.num_blocks, capacity_tokens=llm.engine.stats().kv_capacity_tokens)
    for workload in workloads:
        r = run_workload(llm, workload, repeats=1)
        r["vs_vllm"] = round(r["output_tok_s"] / PEERS[workload], 3)
        result[workload] = r
        print(name, workload, r, flush=True)
    del llm
    torch.cuda.empty_cache()
    return result


def main() -> None:
    names = sys.argv[1:] or list(PRESETS)
    if "bf16" not in names:
        names = ["bf16"] + names
    workloads = os.environ.get("WORKLOADS", "B-pressure C-decode").split()
    batch = int(os.environ.get("BATCH", 16))
    result = dict(machine=machine(), commit=commit(), presets=names, check={}, decode_us={}, engine={},
                  settings=dict(batch=batch, workloads=workloads, max_num_seqs=int(os.environ.get("MAX_NUM_SEQS", 256)),
                                configs=os.environ.get("CONFIGS", "")))
    out_dir = Path(os.environ.get("OUT", "bench/results"))
    out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out_dir / "gpu_kv_formats.json").write_text(json.dumps(result, indent=1))

    if not os.environ.get("SKIP_CHECK"):
        for name in names:
            result["check"][name] = check_kernels(name)
            print("check", name, result["check"][name], flush=True)
        save()
    if not os.environ.get("SKIP_KERNEL"):
        for ctx in (1024, 4096, 16384):
            result["decode_us"][ctx] = {name: decode_time_us(name, batch, ctx) for name in names}
            print("decode", ctx, result["decode_us"][ctx], flush=True)
            torch.cuda.empty_cache()
        save()
    if not os.environ.get("SKIP_ENGINE"):
        for name in os.environ.get("ENGINE_PRESETS", " ".join(names)).split():
            t = time.perf_counter()
            result["engine"][name] = engine_throughput(name, workloads)
            result["engine"][name]["seconds"] = round(time.perf_counter() - t, 1)
            save()

    print("\n| preset | checks | " + " | ".join(f"decode @{c // 1024}K us (x bf16)" for c in result["decode_us"])
          + " | " + " | ".join(f"{w} out tok/s (x bf16, x vLLM)" for w in workloads) + " | capacity tokens |")
    print("|---" * (3 + len(result["decode_us"]) + len(workloads)) + "|")
    for name in names:
        check = result["check"].get(name)
        ok = "-" if check is None else ("ok" if all(c["ok"] for c in check.values()) else "FAIL")
        cells = []
        for ctx, row in result["decode_us"].items():
            cells.append(f"{row[name]['us']} (x{row['bf16']['us'] / row[name]['us']:.2f})")
        eng = result["engine"].get(name, {})
        for w in workloads:
            if w in eng:
                base = result["engine"].get("bf16", {}).get(w, {}).get("output_tok_s")
                vs_bf16 = f"x{eng[w]['output_tok_s'] / base:.2f}" if base else "bf16 not run"
                cells.append(f"{eng[w]['output_tok_s']} ({vs_bf16}, x{eng[w]['vs_vllm']})")
            else:
                cells.append("-")
        print(f"| {name} | {ok} | " + " | ".join(cells) + f" | {eng.get('capacity_tokens', '-')} |")


if __name__ == "__main__":
    main()
