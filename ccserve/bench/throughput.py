"""Offline throughput on the named workloads, run the way the peers' vLLM numbers were taken:
dummy weights, temperature 0.6, ignore_eos, no detokenization, one generate call timed after a warm-up."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ccserve.bench.workloads import make
from ccserve.engine.llm import LLM
from ccserve.sampling_params import SamplingParams


def run_workload(llm: LLM, name: str, repeats: int = 1) -> dict:
    reqs = make(name, vocab=min(128000, llm.engine.vocab_size))  # 128000 for Llama-3, as the peers ran
    prompts = [ids for ids, _ in reqs]
    params = [SamplingParams(temperature=0.6, max_tokens=o, ignore_eos=True, detokenize=False) for _, o in reqs]
    llm.generate(prompts[:4], params[:4])
    preemptions_before = llm.engine.scheduler.num_preemptions
    runs = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=True)
        _sync()
        seconds = time.perf_counter() - start
        out_tok = sum(len(o.token_ids) for o in outs)
        in_tok = sum(len(p) for p in prompts)
        runs.append(dict(seconds=round(seconds, 3), output_tok_s=round(out_tok / seconds, 1),
                         total_tok_s=round((in_tok + out_tok) / seconds, 1), out_tok=out_tok))
    runs.sort(key=lambda r: r["output_tok_s"])
    median = runs[len(runs) // 2]
    return dict(median, runs=runs, preemptions=llm.engine.scheduler.num_preemptions - preemptions_before)


def run(model: str, workloads: list[str], out_dir: str | None, repeats: int = 1, **engine_kwargs) -> dict:
    engine_kwargs.setdefault("load_format", "dummy")
    llm = LLM(model, **engine_kwargs)
    result = dict(machine=machine(), commit=commit(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  model=Path(model).name, settings=dict(engine_kwargs, num_kv_blocks=llm.engine.runner.num_blocks,
                                                        max_model_len=llm.engine.max_model_len),
                  kv_capacity_tokens=llm.engine.stats().kv_capacity_tokens,
                  kv_format_compression=round(llm.engine.runner.kv_format_compression, 3), results={})
    for name in workloads:
        result["results"][name] = run_workload(llm, name, repeats)
        print(name, json.dumps(result["results"][name]), flush=True)
    if out_dir:
        path = Path(out_dir) / f"throughput-{result['model']}-{int(time.time())}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return result


def machine() -> dict:
    info = dict(host=platform.node(), python=platform.python_version(), torch=torch.__version__)
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def commit() -> str:
    """CCSERVE_COMMIT when set (a GPU machine's copy of the tree may carry a stale .git), else git's HEAD."""
    if os.environ.get("CCSERVE_COMMIT"):
        return os.environ["CCSERVE_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL, cwd=os.path.dirname(__file__)).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
