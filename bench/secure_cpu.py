"""Host-side costs of the channel (runs with or without a GPU): AES-GCM seal/open rate per thread count, the two
validation methods (version stamp vs checksum), and the cost of relinquishing a misprediction ("skip" vs "drain").
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from secure_common import print_table, write_json

from ccserve.kernels.aes_gcm import wire_bytes
from ccserve.secure import Channel, FifoPredictor
from ccserve.secure.cpu_crypto import CpuCipher, WorkerPool
from ccserve.secure.keys import SecretKey
from ccserve.secure.stamp import stamp

CHUNK = 1 << 20


def best_of(fn, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def crypto_rate(plain: np.ndarray, threads: int) -> dict:
    nbytes = plain.size
    wire = np.zeros(wire_bytes(nbytes, CHUNK), dtype=np.uint8)
    out = np.zeros(nbytes, dtype=np.uint8)
    pool = WorkerPool(threads)
    cipher = CpuCipher(SecretKey(), pool)
    seal = best_of(lambda: cipher.seal(plain, wire, nbytes, CHUNK, 1, 0))
    opened = best_of(lambda: cipher.open(wire, out, nbytes, CHUNK, 1, 0))
    pool.close()
    return {"threads": threads, "seal_GBps": nbytes / seal / 1e9, "open_GBps": nbytes / opened / 1e9}


def validation_costs(nbytes: int) -> dict:
    t = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    version = statistics.median(timeit_us(lambda: stamp(t, "version")) for _ in range(5))
    checksum = best_of(lambda: stamp(t, "hash"))
    return {"version_stamp_us": version, "hash_GBps": nbytes / checksum / 1e9,
            "hash_ms_per_400MB": 400e6 / (nbytes / checksum) * 1e3}


def timeit_us(fn, n: int = 1000) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def relinquish_costs(device: str, blocks: int, block_bytes: int, threads: int, reps: int = 5) -> list[dict]:
    """Swap in the last of `blocks` pre-sealed blocks (bypassing all others) vs the first one (a hit)."""
    rows = []
    for relinquish in ("skip", "drain"):
        hits, misses = [], []
        for _ in range(reps + 1):
            ch = Channel(device, mode="pipelined", threads=threads, predictor=FifoPredictor(),
                         budget_bytes=2 * blocks * block_bytes, relinquish=relinquish)
            src = torch.randint(0, 255, (blocks, block_bytes), dtype=torch.uint8, device=device)
            host = [ch.to_host(src[i]) for i in range(blocks)]
            for h in host:
                ch.pipeline.pending[(h.data_ptr(), h.nbytes)].wait()
            t0 = time.perf_counter()
            ch.to_device(host[0])                      # predicted: a hit
            hits.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ch.to_device(host[-1])                     # bypasses blocks 1 .. n-2
            misses.append(time.perf_counter() - t0)
            bypassed = ch.pipeline.stats.relinquished_bytes
            ch.close()
        rows.append({"relinquish": relinquish, "hit_ms": statistics.median(hits[1:]) * 1e3,
                     "skip_ahead_ms": statistics.median(misses[1:]) * 1e3, "bypassed_MB": bypassed / 1e6})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--threads", default="1,2,4,8")
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    threads = [t for t in (int(x) for x in args.threads.split(",")) if t <= cpus] or [1]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plain = np.frombuffer(os.urandom(args.mib << 20), dtype=np.uint8)
    result = {"cpus": cpus, "device": device, "message_bytes": args.mib << 20,
              "crypto": [crypto_rate(plain, t) for t in threads], "validation": validation_costs(args.mib << 20),
              "relinquish": relinquish_costs(device, 8, 2 << 20, threads[-1])}
    write_json("secure_cpu", result)
    print_table(f"relinquish on {device}: 8 pre-sealed 2 MiB blocks, swap in the last",
                ["relinquish", "hit_ms", "skip_ahead_ms", "bypassed_MB"],
                [list(r.values()) for r in result["relinquish"]])
    v = result["validation"]
    print_table("validation at use", ["version stamp (us)", "checksum GB/s", "checksum ms per 400 MB"],
                [[v["version_stamp_us"], v["hash_GBps"], v["hash_ms_per_400MB"]]])
    print_table(f"host AES-256-GCM, {args.mib} MiB in 1 MiB chunks, {cpus} CPUs (GB/s)",
                ["threads", "seal", "open"], [[r["threads"], r["seal_GBps"], r["open_GBps"]] for r in result["crypto"]])


if __name__ == "__main__":
    main()
