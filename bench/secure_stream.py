"""Weight streaming through the channel (the issue's experiment): L layers of S MB streamed in order, each followed by
GPU compute of adjustable length; time per cycle for off / naive / pipelined with 1, 2, 4, 8 threads.

Defaults are the issue's 32 layers x 400 MB (12.8 GB of pinned host memory; the layers are pinned so that "off" is
the fastest plain copy). Use --layer-mb / --layers to scale down when host memory or time demands it; the JSON
records what ran. Each layer is fetched right after the previous layer's compute is enqueued (one layer of
prefetch, as offloading engines do) and each cycle ends with a device synchronize (the end of a decode step).
"""
from __future__ import annotations

import argparse
import time

import torch
from secure_common import GpuWork, cuda_device, environment, print_table, wall_time, write_json

from ccserve.kernels.aes_gcm import alloc_wire
from ccserve.secure import Channel, Cycle, CyclicPredictor
from ccserve.secure.cpu_crypto import CpuCipher, WorkerPool
from ccserve.secure.keys import SecretKey


def seal_ms(layer: torch.Tensor, threads: int) -> float:
    """CPU time to seal one layer on `threads` workers (the encryption time the target compares compute to)."""
    pool = WorkerPool(threads)
    cipher = CpuCipher(SecretKey(), pool)
    wire = alloc_wire(layer.nbytes, 1 << 20, "cpu", pin=True)
    plain, out = layer.numpy(), wire.numpy()
    cipher.seal(plain, out, layer.nbytes, 1 << 20, 1, 0)
    t0 = time.perf_counter()
    for i in range(3):
        cipher.seal(plain, out, layer.nbytes, 1 << 20, 1, 1 + i)
    pool.close()
    return (time.perf_counter() - t0) / 3 * 1e3


def run(dev, layers, work, mode, threads, compute_ms, budget, cycles) -> dict:
    ch = Channel(dev, mode=mode, threads=threads, predictor=CyclicPredictor(), budget_bytes=budget)
    ch.hint(Cycle(tuple(ch.register(t) for t in layers)))

    def cycle():
        for t in layers:
            work.run(compute_ms / 1e3, touch=ch.to_device(t))
        torch.cuda.synchronize()

    cycle_s = wall_time(cycle, reps=cycles, warmup=1)
    row = {"mode": mode, "threads": threads, "compute_ms": compute_ms, "cycle_s": cycle_s,
           "sealed_on_demand_MB": ch.stats.sealed_on_demand_bytes / 1e6}
    if ch.pipeline:
        s = ch.pipeline.stats
        row.update(hits=s.hits, misses=s.misses, stale=s.stale, wait_s=s.wait_s)
    ch.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--layer-mb", type=int, default=400)
    ap.add_argument("--compute-ms", default="0,40", help="GPU compute per layer, comma-separated")
    ap.add_argument("--threads", default="1,2,4,8")
    ap.add_argument("--cycles", type=int, default=1, help="timed cycles per configuration (after one warm-up)")
    args = ap.parse_args()
    dev = cuda_device()
    nbytes = args.layer_mb * 10**6
    t0 = time.perf_counter()
    layers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(i) for i in range(args.layers)]
    print(f"pinned {args.layers} x {args.layer_mb} MB in {time.perf_counter() - t0:.1f} s")
    work = GpuWork(dev)
    threads = [int(t) for t in args.threads.split(",")]
    computes = [float(c) for c in args.compute_ms.split(",")]
    result = {"env": environment(), "layers": args.layers, "layer_bytes": nbytes, "matmul_ms": work.per_matmul * 1e3,
              "seal_ms_per_layer": {t: seal_ms(layers[0], t) for t in threads}, "runs": []}
    print("seal ms per layer by threads:", {t: round(v, 1) for t, v in result["seal_ms_per_layer"].items()})
    budget = int(2.5 * nbytes)
    with Channel(dev, mode="naive", threads=2) as warm:  # compile the kernels outside the timings
        warm.to_device(layers[0][: 3 << 20])
    for c in computes:
        result["runs"].append(run(dev, layers, work, "off", 1, c, budget, args.cycles))
        for mode in ("naive", "pipelined"):
            for t in threads:
                result["runs"].append(run(dev, layers, work, mode, t, c, budget, args.cycles))
                r = result["runs"][-1]
                print(f"  {mode:9s} threads={t} compute={c:g} ms: cycle {r['cycle_s']:.3f} s", flush=True)
    off = {r["compute_ms"]: r["cycle_s"] for r in result["runs"] if r["mode"] == "off"}
    for r in result["runs"]:
        r["overhead_vs_off"] = r["cycle_s"] / off[r["compute_ms"]] - 1
    write_json("secure_stream", result)
    print_table(f"weight streaming: {args.layers} layers x {args.layer_mb} MB, cycle time (s) and overhead vs off",
                ["compute_ms/layer", "mode", "threads", "cycle_s", "overhead", "hits", "seal_ms/layer"],
                [[r["compute_ms"], r["mode"], r["threads"], r["cycle_s"], f"{100 * r['overhead_vs_off']:.1f}%",
                  r.get("hits", "-"), result["seal_ms_per_layer"].get(r["threads"], 0.0) if r["mode"] != "off"
                  else "-"] for r in result["runs"]])


if __name__ == "__main__":
    main()
