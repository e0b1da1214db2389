"""Tensor parallelism on one host's GPUs, model level (phases 1 and 3 of issue 10: no engine), plain or sealed.

For each size in SIZES, `size` processes (one per visible GPU, NCCL, NVLink multicast off) load the model shape
with dummy weights and time, on rank 0: a decode step of batch B at CONTEXT tokens (CUDA graph, all-reduces
captured inside it) for each B in BATCHES, and one prefill forward of PREFILL tokens (eager). Before timing,
a tiny random Llama's fp32 logits at that size are checked against the whole model on rank 0's GPU.
Each size > 1 runs once per mode in CC_MODES: "off" (NCCL collectives) or "naive"/"pipelined" (sealed collectives,
ccserve/distributed/sealed.py; the two modes seal collectives alike, captured in the decode graphs too). Every run
also times the eager decode ("decode_eager_ms"); a sealed run's "cc_cost_vs_off" compares its graph decode with the
same size's "off" graph decode (what a user sees), "cc_cost_vs_off_eager" the eager ones.

Usage (on the GPU machine, repository root): python bench/gpu_tp.py
Env: MODEL (bench/models/<name>, default llama3-8b), SIZES (default "1,2"), BATCHES (default "1,64,256"),
CONTEXT (1024), PREFILL (8192), CC_MODES (default "off"; e.g. "off,pipelined"; not CC, which Triton reads as the C
compiler), ALL_REDUCES (default "nccl"; "nccl,peer" also times sizes > 1 with the one-shot all-reduce over peer
memory, off mode only), OUT (directory for the JSON), CCSERVE_COMMIT; CPU_SMOKE=1 runs the same code on
the CPU with gloo and a tiny model (checks the script itself, times nothing of interest).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccserve.bench.throughput import commit, machine  # noqa: E402
from ccserve.config import EngineConfig  # noqa: E402
from ccserve.distributed.env import MULTICAST_OFF, device_for_rank  # noqa: E402
from ccserve.distributed.group import SINGLE, destroy_tensor_parallel, init_tensor_parallel  # noqa: E402
from ccserve.distributed.launch import spawn  # noqa: E402
from ccserve.distributed.sealed import SealedTensorParallelGroup  # noqa: E402
from ccserve.layers.attention import AttentionMetadata  # noqa: E402
from ccserve.models.loader import load_model  # noqa: E402

SMOKE = os.environ.get("CPU_SMOKE") == "1"
DEVICE_TYPE = "cpu" if SMOKE else "cuda"
BLOCK = 16


def _ints(name: str, default: str) -> list[int]:
    return [int(x) for x in os.environ.get(name, default).split(",")]


def decode_meta(batch: int, context: int, device: torch.device) -> tuple[AttentionMetadata, int]:
    """A decode step of `batch` sequences, each at `context` tokens, in disjoint blocks; and the blocks used."""
    per_seq = -(-(context + 1) // BLOCK)
    tables = torch.arange(batch * per_seq, dtype=torch.int32, device=device).view(batch, per_seq)
    pos = torch.full((batch,), context, dtype=torch.int64, device=device)
    slots = tables[:, context // BLOCK].long() * BLOCK + context % BLOCK
    i32 = dict(dtype=torch.int32, device=device)
    meta = AttentionMetadata(slot_mapping=slots, num_decode_tokens=batch, decode_seq_lens=(pos + 1).int(),
                             decode_block_tables=tables, prefill_cu_seqlens_q=torch.zeros(1, **i32),
                             prefill_seq_lens=torch.zeros(0, **i32), prefill_block_tables=torch.zeros(0, 1, **i32))
    return meta, batch * per_seq


def prefill_meta(tokens: int, seq_len: int, device: torch.device) -> tuple[AttentionMetadata, torch.Tensor]:
    n = tokens // seq_len
    per_seq = -(-seq_len // BLOCK)
    tables = torch.arange(n * per_seq, dtype=torch.int32, device=device).view(n, per_seq)
    pos = torch.arange(seq_len, device=device).repeat(n)
    seq = torch.arange(n, device=device).repeat_interleave(seq_len)
    slots = tables[seq, pos // BLOCK].long() * BLOCK + pos % BLOCK
    lens = torch.full((n,), seq_len, dtype=torch.int32, device=device)
    meta = AttentionMetadata(slot_mapping=slots, num_decode_tokens=0, decode_seq_lens=lens[:0],
                             decode_block_tables=tables[:0], prefill_seq_lens=lens, prefill_block_tables=tables,
                             prefill_cu_seqlens_q=torch.cat([lens.new_zeros(1), lens.cumsum(0).int()]),
                             max_prefill_query_len=seq_len)
    return meta, pos


def bind_cache(model, num_blocks: int, device: torch.device, dtype: torch.dtype) -> None:
    """A plain bf16 cache per attention layer, sized by this rank's KV heads."""
    for layer in model.attention_layers():
        shape = (num_blocks, layer.num_kv_heads, BLOCK, layer.head_dim)
        layer.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        layer.v_cache = torch.zeros_like(layer.k_cache)


def timed_ms(fn, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` runs, after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if DEVICE_TYPE == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if DEVICE_TYPE == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def check_tiny(tp, device: torch.device, tiny_dir: str) -> float:
    """Max |logits difference| between this size and the whole tiny model (computed on rank 0)."""
    config = EngineConfig(model=tiny_dir, device=DEVICE_TYPE, dtype="float32")
    meta, pos = prefill_meta(64, 32, device)
    ids = torch.randint(4, 500, (64,), generator=torch.Generator().manual_seed(0)).to(device)
    model, _ = load_model(config, tp, device)
    bind_cache(model, 4, device, torch.float32)
    got = model.compute_logits(model(ids, pos, meta))
    if tp.rank != 0:
        return 0.0
    whole, _ = load_model(config, SINGLE, device)
    bind_cache(whole, 4, device, torch.float32)
    return float((whole.compute_logits(whole(ids, pos, meta)) - got).abs().max())


@torch.inference_mode()
def rank_main(rank: int, size: int, init_method: str, model_dir: str, tiny_dir: str, out: str, cc: str,
              all_reduce: str) -> None:
    device = device_for_rank(rank, size, DEVICE_TYPE)
    tp = init_tensor_parallel(rank, size, init_method, device, all_reduce)
    if cc != "off":
        tp = SealedTensorParallelGroup(tp, device)
    graphs: list[torch.cuda.CUDAGraph] = []   # destroyed before the group: NCCL waits for them otherwise
    step = None
    try:
        result = dict(size=size, cc=cc, all_reduce=all_reduce, tiny_max_abs_diff=check_tiny(tp, device, tiny_dir), decode_ms={},
                      decode_eager_ms={})
        dtype = "float32" if SMOKE else "bfloat16"
        model, hf = load_model(EngineConfig(model=model_dir, load_format="dummy", dtype=dtype, device=DEVICE_TYPE),
                               tp, device)
        context, batches, prefill = int(os.environ.get("CONTEXT", 1024)), _ints("BATCHES", "1,64,256"), \
            int(os.environ.get("PREFILL", 8192))
        param_dtype = next(model.parameters()).dtype
        blocks = max(decode_meta(max(batches), context, device)[1], prefill // BLOCK + 1)
        bind_cache(model, blocks, device, param_dtype)
        for batch in batches:
            meta, _ = decode_meta(batch, context, device)
            ids = torch.randint(4, hf.vocab_size, (batch,), device=device)
            pos = torch.full((batch,), context, dtype=torch.int64, device=device)
            step = lambda: model(ids, pos, meta)  # noqa: E731
            result["decode_eager_ms"][batch] = timed_ms(step, 20)
            if DEVICE_TYPE == "cuda":
                graphs.append(torch.cuda.CUDAGraph())
                with torch.cuda.graph(graphs[-1]):
                    model(ids, pos, meta)
                step = graphs[-1].replay
            result["decode_ms"][batch] = timed_ms(step, 20)
        meta, pos = prefill_meta(prefill, min(prefill, context), device)
        ids = torch.randint(4, hf.vocab_size, (prefill,), device=device)
        result["prefill_ms"] = timed_ms(lambda: model(ids, pos, meta), 5)
        tp.verify()     # sealed: no message failed authentication along the way
        if rank == 0:
            Path(out, f"size{size}-{cc}-{all_reduce}.json").write_text(json.dumps(result))
    finally:
        step = None
        graphs.clear()
        destroy_tensor_parallel(tp)


def main() -> None:
    out_dir = Path(os.environ.get("OUT", "bench/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        from tests.tiny_models import make_tiny_model_dir
        tiny = str(make_tiny_model_dir(Path(tmp) / "tiny", "llama"))
        model_dir = tiny if SMOKE else str(Path(__file__).resolve().parent / "models" /
                                           os.environ.get("MODEL", "llama3-8b"))
        results = []
        modes = os.environ.get("CC_MODES", "off").split(",")
        runs = []
        for size in _ints("SIZES", "1,2"):
            runs += [(size, cc, "nccl") for cc in (modes if size > 1 else ["off"])]   # size 1: nothing to seal
            if size == 2 and "peer" in os.environ.get("ALL_REDUCES", "nccl").split(","):
                runs.append((size, "off", "peer"))
        for size, cc, all_reduce in runs:
            spawn(rank_main, size, model_dir, tiny, tmp, cc, all_reduce)
            results.append(json.loads(Path(tmp, f"size{size}-{cc}-{all_reduce}.json").read_text()))
            print(results[-1], flush=True)
    base = results[0]
    plain = {r["size"]: r for r in results if r["cc"] == "off" and r["all_reduce"] == "nccl"}
    for r in results:
        r["decode_speedup_vs_first"] = {b: base["decode_ms"][b] / ms for b, ms in r["decode_ms"].items()}
        if r["cc"] != "off" and r["size"] in plain:
            off = plain[r["size"]]
            r["cc_cost_vs_off"] = {b: ms / off["decode_ms"][b] - 1 for b, ms in r["decode_ms"].items()}
            r["cc_cost_vs_off_eager"] = {b: ms / off["decode_eager_ms"][b] - 1 for b, ms in r["decode_eager_ms"].items()}
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if DEVICE_TYPE == "cuda" else None
    record = dict(commit=commit(), machine=machine(), gpus=torch.cuda.device_count(), nccl=nccl,
                  env={k: os.environ.get(k) for k in MULTICAST_OFF},
                  model="tiny-llama" if SMOKE else os.environ.get("MODEL", "llama3-8b"),
                  results=results)
    name = "gpu_tp-cpu-smoke.json" if SMOKE else f"gpu_tp-{record['model']}.json"
    (out_dir / name).write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
