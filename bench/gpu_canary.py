"""GPU canary for rule S (stateless computation): after a request ends and the engine is idle, its prompt must not
be readable from GPU memory the process can reach. Checks the freed memory of eager steps, which
ModelRunner.scrub_idle zeroes (privacy/free_memory.py), with that step and without it (the run without shows
that the search finds the canary when it is there).

The canary is the prompt itself: 2048 token ids in a fixed pattern (7, 11, 13, ...), which the step's input ids
carry to the device as int64 and which nothing in the model rewrites (the first attempt marked embedding rows;
their block went to the next layer's activations within the same forward, and nothing was found either way).
After the request, a run of RUN consecutive ids of the pattern (any phase) is searched:
- "allocator": every free block of the caching allocator is allocated and searched (the scrub's reach);
- "driver": the allocator's free segments go back to the driver (empty_cache) and as much memory as is free is
  allocated in one piece and searched (memory the allocator can no longer hand out, seen from this process).
Usage (GPU machine, repository root): python bench/gpu_canary.py   (OUT: directory for the JSON)
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ccserve.engine.model_runner as model_runner  # noqa: E402
from ccserve import LLM, SamplingParams  # noqa: E402
from ccserve.bench.throughput import commit, machine  # noqa: E402
from ccserve.privacy.free_memory import take_free_blocks  # noqa: E402

CANARY_IDS = [7, 11, 13]
PROMPT_TOKENS = 2048        # one eager prefill step carries them all
RUN = 256                   # consecutive ids of the pattern that count as a find (2 KiB of int64)
SEARCH_CHUNK = 16 << 20     # int64 words per search step: ~600 MiB of temporaries


def marker_runs(buf: torch.Tensor, run: int = RUN) -> int:
    """Places in a uint8 buffer where `run` consecutive int64 words follow the canary pattern, in any phase
    (chunked: the sums need memory). Only 8-byte-aligned words are searched, as the device copy of the ids is."""
    words = buf[: buf.numel() // 8 * 8].view(torch.int64)
    pattern = torch.tensor(CANARY_IDS, dtype=torch.int64, device=buf.device)
    found = 0
    for start in range(0, words.numel(), SEARCH_CHUNK):
        part = words[start:start + SEARCH_CHUNK + run]
        if part.numel() <= run:
            break
        index = torch.arange(part.numel(), device=buf.device) + start
        for phase in range(len(CANARY_IDS)):
            expect = pattern[(index + phase) % len(CANARY_IDS)]
            sums = (part == expect).to(torch.int32).cumsum(0, dtype=torch.int32)
            found += int(((sums[run:] - sums[:-run]) == run).sum())
    return found


def search_allocator(device: torch.device) -> tuple[int, int]:
    """(bytes searched, marker runs) over the caching allocator's free blocks of the default pool (the scrub's
    reach: privacy/free_memory.py)."""
    taken = take_free_blocks(device)
    return sum(b.numel() for b in taken), sum(marker_runs(b) for b in taken)


def search_driver(device: torch.device) -> tuple[int, int]:
    """(bytes searched, marker runs) over memory handed back to the driver and allocated again in one piece."""
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info(device)[0] - (2 << 30)     # leave room for the search's own temporaries
    block = torch.empty(max(free, 0), dtype=torch.uint8, device=device)
    found = marker_runs(block)
    del block
    torch.cuda.empty_cache()
    return free, found


def run_mode(llm: LLM, scrub: bool) -> dict:
    real = model_runner.zero_cached_free_memory
    model_runner.zero_cached_free_memory = real if scrub else (lambda device: 0)
    try:
        prompt = (CANARY_IDS * PROMPT_TOKENS)[:PROMPT_TOKENS]
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        assert not llm.engine.has_unfinished_requests()     # idle: scrub_idle ran after the last step
    finally:
        model_runner.zero_cached_free_memory = real
    device = llm.engine.runner.device
    torch.cuda.synchronize(device)
    a_bytes, a_found = search_allocator(device)
    d_bytes, d_found = search_driver(device)
    return dict(scrub=scrub, allocator_bytes=a_bytes, allocator_marker_runs=a_found, driver_bytes=d_bytes,
                driver_marker_runs=d_found)


def main() -> None:
    from tests.tiny_models import make_tiny_model_dir
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model_dir(Path(tmp) / "llama", "llama", hidden_size=256, intermediate_size=512,
                                   max_position_embeddings=4096)
        llm = LLM(str(path), dtype="bfloat16", max_model_len=4096, max_num_batched_tokens=4096,
                  gpu_memory_utilization=0.5)
        # With the scrub first: memory the "off" run leaves would still hold its canary when handed back to the
        # driver, and a later driver search would find it.
        results = [run_mode(llm, scrub=True), run_mode(llm, scrub=False)]
        llm.close()
    record = dict(machine=machine(), commit=commit(), prompt_tokens=PROMPT_TOKENS, run=RUN, results=results)
    out = Path(os.environ.get("OUT", "bench/results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_canary.json").write_text(json.dumps(record, indent=1))
    print("| scrub of freed memory | allocator free MB searched | canary runs | driver-free MB | canary runs |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {'on' if r['scrub'] else 'off'} | {r['allocator_bytes'] >> 20} | {r['allocator_marker_runs']} | "
              f"{r['driver_bytes'] >> 20} | {r['driver_marker_runs']} |")


if __name__ == "__main__":
    main()
