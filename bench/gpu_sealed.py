"""Where a sealed all-reduce spends its time (issue 10, phase 3): one collective at decode-step sizes, on 2 GPUs.

For each message of ROWS x HIDDEN bf16 values (a decode step's all-reduce at batch ROWS), both ranks capture
CALLS back-to-back calls of one operation in a CUDA graph and rank 0 times replays (median of REPEATS, per call):
  nccl        dist.all_reduce (the plain collective)
  peer        the one-shot all-reduce over peer memory (distributed/peer_reduce.py)
  sealed      SealedTensorParallelGroup.all_reduce (seal, exchange, open, sum)
  encrypt     gcm_encrypt of the sealed message alone (no communication)
  decrypt     gcm_decrypt of it alone
  all_to_all  the exchange alone (dist.all_to_all_single of the sealed width)
Then a torch.profiler table of the kernels one sealed all-reduce at PROFILE_ROWS launches (graph replays).
Before timing, the sealed sum is checked equal to the plain one.

Usage (GPU machine, repository root): python bench/gpu_sealed.py
Env: ROWS (default "1,64,256"), HIDDEN (4096), CALLS (20), REPEATS (20), PROFILE_ROWS (64), OUT, CCSERVE_COMMIT.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccserve.bench.throughput import commit, machine  # noqa: E402
from ccserve.distributed.env import device_for_rank  # noqa: E402
from ccserve.distributed.group import destroy_tensor_parallel, init_tensor_parallel  # noqa: E402
from ccserve.distributed.peer_reduce import PeerAllReduce  # noqa: E402
from ccserve.distributed.sealed import TRAILER_BYTES, SealedTensorParallelGroup  # noqa: E402
from ccserve.kernels.aes_gcm import alloc_plain, gcm_decrypt, gcm_encrypt  # noqa: E402
from ccserve.secure.iv import Lane  # noqa: E402

CALLS = int(os.environ.get("CALLS", 20))
REPEATS = int(os.environ.get("REPEATS", 20))


def per_call_us(fn, graphs: list) -> float:
    """Median microseconds per call of fn, CALLS calls captured in one graph (kept in `graphs` until the end)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    graphs.append(graph)
    times = []
    for _ in range(REPEATS + 2):
        dist.barrier()
        torch.cuda.synchronize()
        t = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e6 / CALLS)
    return sorted(times[2:])[REPEATS // 2]


def operations(plain, peer: PeerAllReduce, sealed: SealedTensorParallelGroup, x: torch.Tensor) -> dict:
    """The operations timed at one message size; each closure allocates inside the graph as the model does."""
    links = sealed._links
    nbytes = x.numel() * x.element_size()
    size = -(-nbytes // 16) * 16 + TRAILER_BYTES
    width = links.wire_width(size)
    src = alloc_plain(size, x.device)
    wire = torch.zeros(width, dtype=torch.uint8, device=x.device)
    back = alloc_plain(size, x.device)
    key = links._send_keys[1 - plain.rank]
    at = torch.zeros(1, dtype=torch.int64, device=x.device)
    gcm_encrypt(key, src, wire, size, links.chunk_bytes, Lane.TP_LINK, 0, counter_at=at)
    send, recv = torch.zeros(width, dtype=torch.uint8, device=x.device), torch.empty(width, dtype=torch.uint8,
                                                                                      device=x.device)
    splits = [0 if p == plain.rank else width for p in range(2)]
    return {
        "nccl": lambda: dist.all_reduce(x, group=plain.group),
        "peer": lambda: peer.all_reduce(x),
        "sealed": lambda: sealed.all_reduce(x),
        "encrypt": lambda: gcm_encrypt(key, src, wire, size, links.chunk_bytes, Lane.TP_LINK, 0, counter_at=at),
        # decrypting under the encrypt counter fails the tag (the counter moved on): the same work is done
        "decrypt": lambda: gcm_decrypt(key, wire, back, size, links.chunk_bytes, Lane.TP_LINK, 0, counter_at=at),
        "all_to_all": lambda: dist.all_to_all_single(recv, send, splits, splits, group=plain.group),
    }


def profile_table(fn) -> list[dict]:
    """Kernels one call of fn runs on the GPU, from a profiled graph replay: name, count, microseconds each."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        cuda_us = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
        if cuda_us > 0:
            rows.append(dict(kernel=e.key[:90], calls=e.count // 10, us_each=cuda_us / e.count))
    del graph
    return sorted(rows, key=lambda r: -r["us_each"] * r["calls"])


@torch.inference_mode()
def rank_main(rank: int, size: int, init_method: str, out: str) -> None:
    device = device_for_rank(rank, size, "cuda")
    plain = init_tensor_parallel(rank, size, init_method, device)
    peer = PeerAllReduce(plain.group, device)
    sealed = SealedTensorParallelGroup(plain, device)
    graphs: list[torch.cuda.CUDAGraph] = []
    hidden = int(os.environ.get("HIDDEN", 4096))
    result = {}
    try:
        gen = torch.Generator(device=device).manual_seed(rank)
        for rows in [int(r) for r in os.environ.get("ROWS", "1,64,256").split(",")]:
            x = torch.randn(rows, hidden, device=device, generator=gen).bfloat16()
            want = x.clone()
            dist.all_reduce(want, group=plain.group)
            got = sealed.all_reduce(x.clone())
            sealed.verify()
            if not torch.equal(got, want):
                raise AssertionError(f"sealed all-reduce differs from NCCL's at {rows} rows")
            result[rows] = {name: per_call_us(fn, graphs) for name, fn in operations(plain, peer, sealed, x).items()}
        rows = int(os.environ.get("PROFILE_ROWS", 64))
        x = torch.randn(rows, hidden, device=device, generator=gen).bfloat16()
        table = profile_table(lambda: sealed.all_reduce(x))
        sealed.verify()     # no message failed authentication along the way
        if rank == 0:
            Path(out, "sealed.json").write_text(json.dumps(dict(per_call_us=result, profile_rows=rows,
                                                                profile=table)))
    finally:
        graphs.clear()
        destroy_tensor_parallel(sealed)


def main() -> None:
    from ccserve.distributed.launch import spawn
    out_dir = Path(os.environ.get("OUT", "bench/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        spawn(rank_main, 2, tmp)
        result = json.loads(Path(tmp, "sealed.json").read_text())
    record = dict(commit=commit(), machine=machine(), nccl=".".join(map(str, torch.cuda.nccl.version())),
                  hidden=int(os.environ.get("HIDDEN", 4096)), calls=CALLS, repeats=REPEATS, **result)
    (out_dir / "gpu_sealed.json").write_text(json.dumps(record, indent=1))
    print(f"{'rows':>5} " + " ".join(f"{k:>10}" for k in next(iter(result["per_call_us"].values()))))
    for rows, ops in result["per_call_us"].items():
        print(f"{rows:>5} " + " ".join(f"{v:10.1f}" for v in ops.values()))
    print(f"kernels of one sealed all-reduce at {result['profile_rows']} rows:")
    for r in result["profile"]:
        print(f"  {r['calls']:3d} x {r['us_each']:7.1f} us  {r['kernel']}")


if __name__ == "__main__":
    main()
