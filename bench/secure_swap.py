"""FIFO swapping of KV-block-sized chunks through the channel, with 0%, 10%, 50% mispredictions.

A block is 2 MiB (16 tokens of a Llama-3-8B-shaped model: 32 layers x K,V x 8 heads x 128 x bf16). Each step swaps
in one request's blocks, runs GPU compute, and swaps out a new request's blocks (to_host hints them as swapped out,
so the FIFO predictor pre-seals them). A misprediction swaps in a random queued request instead of the oldest.
Modes: off, naive, pipelined with relinquish "skip" (burned IVs jumped) and "drain" (burned ciphertext delivered).
Reports time per step, the extra time of a mispredicted swap-in over a predicted one, and pipeline counters.
"""
from __future__ import annotations

import argparse
import random
import time
from collections import deque

import torch
from secure_common import GpuWork, cuda_device, environment, print_table, write_json

from ccserve.secure import Channel, FifoPredictor, Forget

BLOCK = 2 << 20


def run(dev, work, mode, relinquish, miss_rate, args) -> dict:
    ch = Channel(dev, mode=mode, threads=args.threads, predictor=FifoPredictor(), budget_bytes=args.budget_mb << 20,
                 relinquish=relinquish)
    rng = random.Random(0)
    gpu = torch.randint(0, 256, (args.blocks_per_request, BLOCK), dtype=torch.uint8, device=dev)
    queue: deque[list[torch.Tensor]] = deque()
    for _ in range(args.queued):
        queue.append([ch.to_host(gpu[i]) for i in range(args.blocks_per_request)])
    hit_s, miss_s, steps = [], [], []
    for step in range(args.steps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        miss = rng.random() < miss_rate
        pick = rng.randrange(1, len(queue)) if miss else 0
        req = queue[pick]
        del queue[pick]
        ts = time.perf_counter()
        blocks = [ch.to_device(h) for h in req]
        swap_in = time.perf_counter() - ts
        for h in req:
            ch.hint(Forget((h.data_ptr(), h.nbytes)))
        work.run(args.compute_ms / 1e3, touch=blocks[-1])
        queue.append([ch.to_host(gpu[i]) for i in range(args.blocks_per_request)])
        torch.cuda.synchronize()
        if step >= 2:  # warm-up steps
            steps.append(time.perf_counter() - t0)
            (miss_s if miss else hit_s).append(swap_in)
    row = {"mode": mode, "relinquish": relinquish if mode == "pipelined" else "-", "miss_rate": miss_rate,
           "step_ms": 1e3 * sum(steps) / len(steps),
           "swap_in_ms_predicted": 1e3 * sum(hit_s) / max(1, len(hit_s)),
           "swap_in_ms_mispredicted": 1e3 * sum(miss_s) / max(1, len(miss_s)) if miss_s else None}
    if ch.pipeline:
        s = ch.pipeline.stats
        row.update(hits=s.hits, misses=s.misses, relinquished=s.relinquished,
                   relinquished_MB=s.relinquished_bytes / 1e6)
    ch.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--blocks-per-request", type=int, default=16)
    ap.add_argument("--queued", type=int, default=8, help="requests waiting in host memory")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--compute-ms", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--budget-mb", type=int, default=256)
    args = ap.parse_args()
    dev = cuda_device()
    work = GpuWork(dev)
    result = {"env": environment(), "block_bytes": BLOCK, **vars(args), "runs": []}
    with Channel(dev, mode="naive", threads=2) as warm:  # compile the kernels outside the timings
        warm.to_host(warm.to_device(torch.ones(BLOCK, dtype=torch.uint8)))
    configs = [("off", "skip"), ("naive", "skip"), ("pipelined", "skip"), ("pipelined", "drain")]
    for miss_rate in (0.0, 0.1, 0.5):
        for mode, relinquish in configs:
            result["runs"].append(run(dev, work, mode, relinquish, miss_rate, args))
            print(f"  {result['runs'][-1]}", flush=True)
    write_json("secure_swap", result)
    mib = args.blocks_per_request * BLOCK >> 20
    print_table(f"FIFO swap: {mib} MiB in + {mib} MiB out per step, {args.compute_ms:g} ms compute, "
                f"{args.threads} threads", ["miss", "mode", "relinquish", "step_ms", "in_ms(hit)", "in_ms(miss)",
                                             "hits", "relinq"],
                [[r["miss_rate"], r["mode"], r["relinquish"], r["step_ms"], r["swap_in_ms_predicted"],
                  r["swap_in_ms_mispredicted"] if r["swap_in_ms_mispredicted"] is not None else "-",
                  r.get("hits", "-"), r.get("relinquished", "-")] for r in result["runs"]])


if __name__ == "__main__":
    main()
