"""Profile one 8192-token prefill step (64 x 128 tokens) of the Llama-3-8B shape: kernels and host time."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccserve import LLM, SamplingParams  # noqa: E402

MODEL = Path(__file__).resolve().parent / "models" / "llama3-8b"


def prefill_step(llm: LLM, tag: str, n: int, length: int) -> float:
    for i in range(n):
        llm.engine.add_request(f"{tag}{i}", torch.randint(10, 128000, (length,)).tolist(),
                               SamplingParams(temperature=0.6, max_tokens=2, ignore_eos=True, detokenize=False))
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.engine.step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    for i in range(n):
        llm.engine.abort_request(f"{tag}{i}")
    return dt


def main() -> None:
    llm = LLM(str(MODEL), load_format="dummy", dtype="bfloat16", max_model_len=4096, gpu_memory_utilization=0.9)
    for shape in ((64, 128), (8, 1024), (64, 128), (8, 1024), (2, 4096)):
        print("prefill step", shape, f"{prefill_step(llm, 'w', *shape) * 1e3:.1f} ms", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        prefill_step(llm, "p", 64, 128)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
