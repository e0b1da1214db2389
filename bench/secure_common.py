"""Shared bits of the bench/secure_*.py scripts: GPU timing, calibrated GPU work, results as JSON and a table.

Run the scripts from the repository root (python bench/secure_kernel.py); each writes $OUT/<name>.json when OUT
is set and prints its table last.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `import ccserve`

import torch


def cuda_device() -> torch.device:
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    return torch.device("cuda")


def gpu_time(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of fn() between CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def wall_time(fn, reps: int, warmup: int = 1) -> float:
    """Median wall seconds of fn(), the device synchronized before and after."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class GpuWork:
    """GPU compute of a chosen length: bf16 matmuls on all SMs (so it competes with decryption kernels for SMs)."""

    def __init__(self, device: torch.device, n: int = 4096) -> None:
        self.a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        self.b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        self.out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
        self.per_matmul = gpu_time(lambda: torch.matmul(self.a, self.b, out=self.out), reps=20, warmup=5)

    def run(self, seconds: float, touch: torch.Tensor | None = None) -> None:
        """Enqueue about `seconds` of matmuls; `touch` makes the work depend on a transferred tensor."""
        if touch is not None:
            self.out.view(-1)[:1].add_(touch.view(-1)[:1].to(self.out.dtype))
        for _ in range(round(seconds / self.per_matmul)):
            torch.matmul(self.a, self.b, out=self.out)


def write_json(name: str, data: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        path = Path(out) / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))
        print(f"wrote {path}")


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    import cryptography
    import triton
    return {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "cryptography": cryptography.__version__, "cpus": os.cpu_count()}
