"""GPU run of the engine, in one call: correctness first, then the HBM floor, batch-1 decode, workloads.

Usage (on the GPU machine, repository root): python bench/gpu_engine.py [WORKLOAD[:REPEATS] ...]
Env: OUT (directory for the JSON), CCSERVE_COMMIT (commit id; the device copy has no .git),
MAX_NUM_SEQS, MAX_BATCHED, SKIP_CHECK=1, SKIP_BATCH1=1, AB=1 (each workload also without continued decode
windows, runs interleaved on the same GPU: an A/B that machine-to-machine spread cannot blur), SCRUB_AB=1 (each
workload also with KV scrubbing replaced by a no-op, interleaved: what scrubbing costs), TP (tensor-parallel
size: that many visible GPUs, the tiny-model check included), CC_MODE (off/naive/pipelined, default off), KV_FORMAT
(a KV preset such as fp8 or K8V8; default bf16), TP_ALL_REDUCE (nccl or peer, default nccl), KV_SPARSITY (the
--kv-sparsity ratio; default off).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccserve import LLM, SamplingParams  # noqa: E402
from ccserve.bench.throughput import commit, machine, run_workload  # noqa: E402

MODEL = Path(__file__).resolve().parent / "models" / os.environ.get("MODEL", "llama3-8b")
TP = int(os.environ.get("TP", 1))
TP_ALL_REDUCE = os.environ.get("TP_ALL_REDUCE", "nccl")
CC = os.environ.get("CC_MODE", "off")
# vLLM 0.24.0 output tok/s from ../shared/peers/RESULTS.md, by (GPU, model, TP size).
PEERS = {("H100", "llama3-8b", 1): {"A-mixed": 8597, "B-pressure": 9479, "C-decode": 7036},
         ("H200", "llama3-8b", 1): {"A-mixed": 9946, "C-decode": 9050},
         ("H200", "llama3-8b", 2): {"A-mixed": 15741, "C-decode": 13546},
         ("H200", "llama3-70b", 2): {"A-mixed": 2737, "C-decode": 2477}}


def peer_numbers() -> dict[str, int]:
    """The peer's numbers for this GPU, model and TP size; empty where the peer was not measured."""
    gpu = next((g for g in ("H100", "H200") if g in torch.cuda.get_device_name()), "")
    return PEERS.get((gpu, MODEL.name, TP), {})


def check_against_hf() -> dict:
    """Greedy tokens of a tiny random Llama on the GPU (Triton kernels, CUDA graphs) equal HF's."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import make_tiny_model_dir
    results = {}
    for family in ("llama", "qwen3", "opt"):
        with tempfile.TemporaryDirectory() as tmp:
            path = make_tiny_model_dir(Path(tmp) / family, family)
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
            llm = LLM(str(path), dtype="float32", max_model_len=256, gpu_memory_utilization=0.3, num_gpu_blocks=256,
                      tensor_parallel_size=TP, cc=CC, tp_all_reduce=TP_ALL_REDUCE)
            prompts = [[5 + i, 17, 42 + i, 99, 3] * (i + 1) for i in range(4)]
            outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
            same = 0
            for p, o in zip(prompts, outs):
                ref = list(p)
                with torch.inference_mode():
                    for _ in range(32):  # greedy with EOS as an ordinary token, as ignore_eos does
                        ref.append(int(hf(torch.tensor([ref], device="cuda")).logits[0, -1].argmax()))
                ref = ref[len(p):]
                same += ref == o.token_ids
            results[family] = f"{same}/{len(prompts)} greedy sequences identical"
            llm.close()
            del llm, hf
            torch.cuda.empty_cache()
    return results


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s, counting bytes read plus written (the HBM floor's denominator)."""
    import triton.testing
    src = torch.randn(1 << 30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    gbps = 2 * src.nbytes / ms / 1e6
    del src, dst
    return gbps


def batch1_decode(llm: LLM, context: int = 1024, steps: int = 256) -> float:
    """Milliseconds per output token for one sequence at ~context tokens (prefill excluded), median of 5."""
    prompt = torch.randint(10, 128000, (context,)).tolist()

    def seconds(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False))
        torch.cuda.synchronize()
        return time.perf_counter() - t
    per_token = sorted((seconds(steps + 1) - seconds(1)) / steps * 1e3 for _ in range(5))
    return per_token[len(per_token) // 2]


def main() -> None:
    out_dir = Path(os.environ.get("OUT", "bench/results"))
    workloads = sys.argv[1:] or ["A-mixed", "C-decode", "B-pressure"]
    result = dict(machine=machine(), commit=commit(), model=MODEL.name, gpus=TP, results={})
    if not os.environ.get("SKIP_CHECK"):
        result["check"] = check_against_hf()
        print("check", result["check"], flush=True)
    result["copy_gbps"] = round(copy_bandwidth(), 1)
    kwargs = dict(load_format="dummy", dtype="bfloat16", max_model_len=4096, gpu_memory_utilization=0.9,
                  max_num_seqs=int(os.environ.get("MAX_NUM_SEQS", 256)),
                  max_num_batched_tokens=int(os.environ.get("MAX_BATCHED", 8192)), tensor_parallel_size=TP, cc=CC,
                  tp_all_reduce=TP_ALL_REDUCE)
    kv_format = os.environ.get("KV_FORMAT", "bf16")
    if kv_format != "bf16":
        kwargs["kv_format"] = kv_format
    if os.environ.get("KV_SPARSITY"):
        kwargs["kv_sparsity"] = float(os.environ["KV_SPARSITY"])
    t = time.perf_counter()
    llm = LLM(str(MODEL), **kwargs)
    result["startup_s"] = round(time.perf_counter() - t, 1)
    result["settings"] = dict(kwargs, num_kv_blocks=llm.engine.runner.num_blocks)
    weight_bytes = sum(p.nbytes for p in llm.engine.runner.model.parameters())
    floor_ms = weight_bytes / (result["copy_gbps"] * 1e9) * 1e3
    if not os.environ.get("SKIP_BATCH1"):
        ms = batch1_decode(llm)
        result["batch1_decode_1k"] = dict(ms_per_token=round(ms, 3), hbm_floor_ms=round(floor_ms, 3),
                                          ratio_to_floor=round(ms / floor_ms, 3),
                                          weight_gb=round(weight_bytes / 1e9, 2))
        print("batch1", result["batch1_decode_1k"], flush=True)
    peers = peer_numbers()
    if os.environ.get("AB"):
        result["ab_continuation"] = ab_continuation(llm, workloads)
    if os.environ.get("SCRUB_AB"):
        result["ab_scrub"] = ab_scrub(llm, workloads)
    for spec in workloads:
        name, _, repeats = spec.partition(":")
        r = run_workload(llm, name, repeats=int(repeats or os.environ.get("REPEATS", 1)))
        r["vs_vllm"] = round(r["output_tok_s"] / peers[name], 3) if name in peers else None
        result["results"][name] = r
        print(name, r, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    llm.close()
    parts = ((f"tp{TP}", TP > 1), (TP_ALL_REDUCE, TP_ALL_REDUCE != "nccl"), (CC, CC != "off"),
             (kv_format, kv_format != "bf16"))
    suffix = "".join(f"-{part}" for part, on in parts if on)
    (out_dir / f"gpu_engine-{MODEL.name}{suffix}.json").write_text(json.dumps(result, indent=1))
    print("\n| what | value |\n|---|---|")
    print(f"| copy GB/s | {result['copy_gbps']} |")
    if "batch1_decode_1k" in result:
        b = result["batch1_decode_1k"]
        print(f"| batch-1 decode @1K | {b['ms_per_token']} ms (floor {b['hbm_floor_ms']}, x{b['ratio_to_floor']}) |")
    for name, r in result.get("ab_continuation", {}).items():
        print(f"| {name} A/B | continued windows {r['on']} vs not {r['off']} out tok/s (medians): "
              f"{100 * (r['on'] / r['off'] - 1):+.1f}% |")
    for name, r in result.get("ab_scrub", {}).items():
        print(f"| {name} scrub cost | scrubbing {r['on']} vs not {r['off']} out tok/s (medians): "
              f"{100 * (r['on'] / r['off'] - 1):+.1f}% (goal >= -2%) |")
    for name, r in result["results"].items():
        spread = [run["output_tok_s"] for run in r["runs"]]
        print(f"| {name} | {r['output_tok_s']} out tok/s (median of {len(spread)}: {min(spread)}..{max(spread)}), "
              f"x{r['vs_vllm']} vLLM, {r['preemptions']} preemptions |")


def ab_scrub(llm: LLM, workloads: list[str]) -> dict:
    """What scrubbing freed KV blocks costs (issue 8: at most 2% on A-mixed): the runner's scrub as is against a
    no-op. The no-op exists only here, for the measurement; the engine has no switch that turns scrubbing off."""
    return interleaved_ab(llm, workloads, llm.engine.runner, "scrub", lambda block_ids: None)


def ab_continuation(llm: LLM, workloads: list[str]) -> dict:
    """Decode windows continued on the device against not continued."""
    return interleaved_ab(llm, workloads, llm.engine, "_continuation", lambda window: None)


def interleaved_ab(llm: LLM, workloads: list[str], owner: object, method: str, off: object) -> dict:
    """Output tok/s medians with `owner.method` as is ("on") and shadowed by `off` ("off"), runs interleaved on
    one GPU: an A/B that machine-to-machine spread cannot blur."""
    result = {}
    for spec in workloads:
        name, _, repeats = spec.partition(":")
        runs = {"on": [], "off": []}
        for _ in range(int(repeats or 1)):
            for variant in ("on", "off"):
                if variant == "off":
                    setattr(owner, method, off)
                runs[variant].append(run_workload(llm, name, repeats=1)["output_tok_s"])
                owner.__dict__.pop(method, None)
        result[name] = {v: sorted(r)[len(r) // 2] for v, r in runs.items()} | {"runs": runs}
        print(name, method, "A/B", result[name], flush=True)
    return result

if __name__ == "__main__":
    main()
