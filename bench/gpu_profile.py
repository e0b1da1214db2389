"""Where a decode step's time goes: host-side phases timed with a wall clock, GPU kernels with the torch profiler.

Usage (GPU machine, repository root): python bench/gpu_profile.py [BATCH] [CONTEXT]
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccserve import LLM, SamplingParams  # noqa: E402
from ccserve.layers.sampler import SamplingBatch  # noqa: E402

MODEL = Path(__file__).resolve().parent / "models" / "llama3-8b"


def phase_times(llm: LLM, steps: int) -> dict[str, float]:
    """Median milliseconds of each phase of engine.step(), synchronizing around the GPU part."""
    engine, runner = llm.engine, llm.engine.runner
    times = defaultdict(list)
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = engine.scheduler.schedule()
        t1 = time.perf_counter()
        step, seqs = runner._host_step(batch)
        inputs = runner._device_step(step)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        with torch.inference_mode():
            hidden = runner._forward(inputs, step.decode_only)
            torch.cuda.synchronize()
            t3 = time.perf_counter()
            logits = runner.model.compute_logits(hidden[inputs.sample_indices])
            sb = inputs.sampling or SamplingBatch.build([s.params for s in seqs], runner.device)
            sampled = runner.sampler(logits, sb, inputs.positions[inputs.sample_indices])
            torch.cuda.synchronize()
        t4 = time.perf_counter()
        for seq, n in batch.items():
            seq.num_computed_tokens += n
        engine._apply(seqs, [[t] for t in sampled.token_ids.tolist()], None)
        t5 = time.perf_counter()
        for name, a, b in (("schedule", t0, t1), ("prepare+h2d", t1, t2), ("forward", t2, t3),
                           ("logits+sample", t3, t4), ("apply", t4, t5), ("total", t0, t5)):
            times[name].append((b - a) * 1e3)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def workload_breakdown(llm: LLM, name: str) -> None:
    """Wall time of a whole workload split by step kind: prefill-only, mixed, and decode (by batch size)."""
    from ccserve.bench.workloads import make
    engine = llm.engine
    for ids, out in make(name):
        engine.add_request(str(len(engine.requests)) + name, ids, SamplingParams(
            temperature=0.6, max_tokens=out, ignore_eos=True, detokenize=False))
    kinds = defaultdict(lambda: [0, 0.0, 0])
    schedule, last = engine.scheduler.schedule, {}

    def recording_schedule():
        last["batch"] = schedule()
        return last["batch"]
    engine.scheduler.schedule = recording_schedule
    runner, events, starts = engine.runner, [], []

    def after_prepare(fn):
        """Start the GPU span once the step's inputs are on the device (host preparation excluded)."""
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            starts.append(torch.cuda.Event(enable_timing=True))
            starts[-1].record()
            return result
        return wrapper

    def timed(fn):
        """End the GPU span after the runner call has enqueued all of the step's work."""
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            events.append((starts[-1], end))
            return result
        return wrapper
    runner._device_step = after_prepare(runner._device_step)
    runner._device_continuation = after_prepare(runner._device_continuation)
    runner.execute, runner.execute_decodes = timed(runner.execute), timed(runner.execute_decodes)
    origin = torch.cuda.Event(enable_timing=True)
    origin.record()
    events.append((origin, origin))
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        batch = last["batch"]
        size = len(batch.decodes)
        kind = "prefill+decode" if batch.prefills else f"decode bs<={1 << max(size - 1, 0).bit_length():<4d}"
        kinds[kind][0] += 1
        kinds[kind][1] += dt
        kinds[kind][2] += sum(len(o.new_token_ids) for o in outs)
    total = time.perf_counter() - start
    del runner.execute, runner.execute_decodes, runner._device_step, runner._device_continuation
    gpu = busy_seconds(events)
    print(f"\n{name}: {total:.2f} s wall, {gpu:.2f} s inside runner calls on the GPU, host gaps "
          f"{total - gpu:.2f} s ({100 * (total - gpu) / total:.1f}%), {len(events)} runner calls")
    for kind, (n, secs, tokens) in sorted(kinds.items()):
        print(f"  {kind:16s} calls {n:5d}  {secs:7.2f} s  {secs / n * 1e3:7.2f} ms/call  {tokens:7d} tokens")


def busy_seconds(spans: list) -> float:
    """Length of the union of GPU spans (windows continued on the device overlap the previous span)."""
    origin = spans[0][0]
    intervals = sorted((origin.elapsed_time(a), origin.elapsed_time(b)) for a, b in spans)
    busy, end = 0.0, float("-inf")
    for lo, hi in intervals:
        busy += max(0.0, hi - max(lo, end))
        end = max(end, hi)
    return busy / 1e3


def main() -> None:
    if len(sys.argv) > 1 and not sys.argv[1].isdigit():
        llm = LLM(str(MODEL), load_format="dummy", dtype="bfloat16", max_model_len=4096, gpu_memory_utilization=0.9)
        for name in sys.argv[1:]:
            workload_breakdown(llm, name)
        return
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    context = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    llm = LLM(str(MODEL), load_format="dummy", dtype="bfloat16", max_model_len=4096, gpu_memory_utilization=0.9)
    prompts = [torch.randint(10, 128000, (context,)).tolist() for _ in range(batch)]
    params = SamplingParams(temperature=0.6, max_tokens=4000 - context, ignore_eos=True, detokenize=False)
    for i, p in enumerate(prompts):
        llm.engine.add_request(str(i), p, params)
    while any(s.num_output_tokens < 2 for s in llm.engine.requests.values()):
        llm.engine.step()
    phases = phase_times(llm, 30)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            llm.engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(f"\nbatch {batch} context ~{context}: median ms per phase of one decode step")
    for k, v in phases.items():
        print(f"  {k:14s} {v:8.3f}")


if __name__ == "__main__":
    main()
