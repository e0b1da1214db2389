"""A tensor-parallel worker killed under NCCL, on two GPUs: the node goes down in seconds with a clear error.

The CPU tests prove the lifecycle on gloo, whose collectives fail by themselves when a peer dies. NCCL's do not:
a collective whose peer is gone spins until the watchdog kills the process (10 minutes), unless the monitor aborts
the communicators (engine/tp_workers.py). This checks, on the GPUs, with a tiny random Llama at TP=2:

1. killed: SIGKILL rank 1 between steps; the next steps raise WorkerExited within seconds, every request fails,
   no worker process is left.
2. inside: rank 1 killed while rank 0 is inside a step's collectives (a thread kills it a moment after the step
   starts, over many steps); the step raises WorkerExited and hands out no tokens.
3. closed: close() after normal serving records no failure (the monitor stays quiet).
Each case starts its own engine. A short table last; JSON to $OUT/gpu_tp_crash.json.

Usage (2 GPUs, repository root): python bench/gpu_tp_crash.py
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccserve import LLM, SamplingParams  # noqa: E402
from ccserve.bench.throughput import commit, machine  # noqa: E402
from ccserve.engine.tp_workers import WorkerExited  # noqa: E402
from tests.tiny_models import make_tiny_model_dir  # noqa: E402

PARAMS = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
PROMPTS = [[5 + i, 17, 42 + i, 99, 3] * (i + 1) for i in range(8)]


def engine(path: Path) -> LLM:
    return LLM(str(path), dtype="float32", max_model_len=512, gpu_memory_utilization=0.3, num_gpu_blocks=256,
               tensor_parallel_size=2)


def serve_until_lost(llm: LLM, kill_after_s: float | None) -> dict:
    """Step until WorkerExited; kill rank 1 now (None) or from a thread kill_after_s into a step."""
    eng, workers = llm.engine, llm.engine.runner.peers
    pid = workers.procs[0].pid
    for i, prompt in enumerate(PROMPTS):
        eng.add_request(str(i), prompt, PARAMS)
    eng.step()
    killer = None
    if kill_after_s is None:
        os.kill(pid, signal.SIGKILL)
    else:
        killer = threading.Timer(kill_after_s, os.kill, (pid, signal.SIGKILL))
        killer.start()
    start, steps, error = time.monotonic(), 0, None
    try:
        while eng.has_unfinished_requests() and time.monotonic() - start < 120:
            eng.step()
            steps += 1
    except WorkerExited as exc:
        error = str(exc)
    if killer is not None:
        killer.join()
    return dict(error=error, seconds_to_error=round(time.monotonic() - start, 2), steps_after_kill=steps,
                requests_left=len(eng.requests))


def case(path: Path, name: str) -> dict:
    llm = engine(path)
    try:
        if name == "killed":
            row = serve_until_lost(llm, None)
        elif name == "inside":
            row = serve_until_lost(llm, 0.05)
        else:
            llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
            row = {}
    finally:
        llm.close()
        row["failure_recorded"] = llm.engine.runner.peers.failure
    row["children_left"] = len(multiprocessing.active_children())
    if name == "closed":
        row["ok"] = row["failure_recorded"] is None and row["children_left"] == 0
    else:
        row["ok"] = (row["error"] is not None and "rank 1 exited" in row["error"] and row["requests_left"] == 0
                     and row["seconds_to_error"] < 30 and row["children_left"] == 0)
    print(name, row, flush=True)
    return row


def main() -> None:
    result = dict(machine=machine(), commit=commit(), cases={})
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model_dir(Path(tmp) / "llama", "llama")
        for name in ("killed", "inside", "closed"):
            result["cases"][name] = case(path, name)
    out = Path(os.environ.get("OUT", "bench/results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_tp_crash.json").write_text(json.dumps(result, indent=1))
    print("\n| case | ok | seconds to error | error |\n|---|---|---|---|")
    for name, row in result["cases"].items():
        print(f"| {name} | {row['ok']} | {row.get('seconds_to_error', '-')} | {row.get('error') or '-'} |")


if __name__ == "__main__":
    main()
