"""Seeded offline workloads, identical to the peers' (../shared/peers/workload.py), so that the same seed
gives the same requests to ccserve and to vLLM and the throughput ratio compares like with like."""
from __future__ import annotations

import random

# name: (num_requests, input_lo, input_hi, output_lo, output_hi)
WORKLOADS: dict[str, tuple[int, int, int, int, int]] = {
    "A-mixed": (256, 100, 1024, 100, 1024),
    "B-pressure": (1024, 512, 512, 1024, 1024),
    "C-decode": (64, 128, 128, 1024, 1024),
}


def make(name: str, vocab: int = 128000, seed: int = 0) -> list[tuple[list[int], int]]:
    """[(prompt token ids, output length)], drawn exactly as the peers' workload.make draws them."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {sorted(WORKLOADS)}")
    n, ilo, ihi, olo, ohi = WORKLOADS[name]
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        il, ol = rng.randint(ilo, ihi), rng.randint(olo, ohi)
        reqs.append(([rng.randint(10, vocab - 1) for _ in range(il)], ol))
    return reqs
