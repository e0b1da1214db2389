"""What the scrubbing allocator (privacy/hardening.py) costs the host: a real `ccserve serve` on a tiny model,
where the server's time is all host Python (HTTP, JSON, tokenizer, scheduler, detokenizer), with and without
PYTHONMALLOC=malloc + MALLOC_PERTURB_ + no tcache. Requests per second of 16 concurrent clients, median of
rounds alternated between the two servers. On a GPU node the same host work is a small part of each step, so
this is an upper bound of the cost there.

Usage: python bench/host_allocator.py [ROUNDS]; JSON to $OUT/host_allocator.json (default bench/results).
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ccserve.bench.throughput import commit  # noqa: E402
from ccserve.privacy.hardening import REEXEC_MARK  # noqa: E402
from tests.tiny_models import make_tiny_model_dir  # noqa: E402

REQUESTS, CLIENTS = 160, 16


def start(model: Path, scrubbing: bool, log: Path) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONMALLOC", "MALLOC_PERTURB_", "GLIBC_TUNABLES")}
    env["TRITON_INTERPRET"] = "1"
    if not scrubbing:
        env[REEXEC_MARK] = "1"      # pcc hardening without the re-execution under the scrubbing allocator
    cmd = [sys.executable, "-m", "ccserve", "serve", "--model", str(model), "--device", "cpu", "--max-model-len",
           "128", "--num-gpu-blocks", "64", "--port", "0", "--served-model-name", "tiny"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=env, cwd=ROOT)
    for _ in range(600):
        found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", log.read_text())
        if found:
            return proc, f"http://127.0.0.1:{found.group(1)}"
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(log.read_text()[-2000:])


def round_rps(base_url: str) -> float:
    def one(i: int) -> None:
        body = {"prompt": f"request {i} says hello to the server", "max_tokens": 4, "ignore_eos": True}
        assert httpx.post(f"{base_url}/v1/completions", json=body, timeout=60).status_code == 200
    with ThreadPoolExecutor(CLIENTS) as pool:
        t = time.perf_counter()
        list(pool.map(one, range(REQUESTS)))
        return REQUESTS / (time.perf_counter() - t)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model_dir(Path(tmp) / "model", "llama")
        servers = {name: start(model, name == "scrubbing", Path(tmp) / name) for name in ("plain", "scrubbing")}
        try:
            for _, url in servers.values():
                round_rps(url)                                   # warm-up
            rps = {name: [] for name in servers}
            for _ in range(rounds):
                for name, (_, url) in servers.items():
                    rps[name].append(round_rps(url))
        finally:
            for proc, _ in servers.values():
                proc.kill()
    med = {name: statistics.median(v) for name, v in rps.items()}
    cost = 1 - med["scrubbing"] / med["plain"]
    result = {"commit": commit(), "cpus": os.cpu_count(), "requests": REQUESTS, "clients": CLIENTS, "rounds": rps,
              "median_rps": med, "cost": cost}
    out = Path(os.environ.get("OUT", ROOT / "bench" / "results")) / "host_allocator.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"requests/s, median of {rounds}: plain allocator {med['plain']:.1f}, scrubbing allocator "
          f"{med['scrubbing']:.1f} ({100 * cost:+.1f}% cost)")


if __name__ == "__main__":
    main()
