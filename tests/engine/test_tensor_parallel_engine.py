"""The engine drives a tensor-parallel group, for real: LLM(tensor_parallel_size=2) runs rank 0 in this process
and rank 1 in a spawned worker on gloo, and generates exactly what the single-process engine generates.

Starting a group is the slow part (a process importing torch), so each engine below serves several checks: one
per family, and the llama one with a KV cache small enough to preempt, chunked prefills, multi-step decode
windows that continue each other, and random sampling, seeded and not (the engine seeds torch's host generator,
and rank 0 alone draws the seeds of unseeded rows, so TP=2 draws what TP=1 draws).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ccserve import LLM, SamplingParams
from ccserve.config import EngineConfig
from ccserve.engine.tp_checks import check_fits, weight_bytes
from ccserve.engine.tp_workers import WorkerExited, _abort_nccl
from ccserve.models.loader import load_model, read_hf_config
from tests.tiny_models import make_tiny_model_dir

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "opt")
PROMPTS = [[5, 9, 33, 12, 7], [40, 41, 42], list(range(10, 40)), [7] * 11]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
# Llama: the 4 rows need 19 blocks of 8 tokens at their longest; 8 blocks force preemption (recompute), 16-token
# batches chunk the 30-token prompt, and mixed max_tokens end rows inside multi-step windows.
PRESSURE = dict(block_size=8, num_gpu_blocks=8, max_model_len=64, max_num_batched_tokens=16, max_num_seqs=4,
                num_decode_steps=4)
MIXED = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
         SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=25, ignore_eos=True),
         SamplingParams(temperature=0.7, max_tokens=9, ignore_eos=True),   # unseeded: rank 0 draws the seed
         SamplingParams(temperature=1.0, top_k=20, seed=3, max_tokens=30, ignore_eos=True)]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(family) -> the family's tiny checkpoint, written once."""
    made = {}

    def make(family: str):
        if family not in made:
            made[family] = make_tiny_model_dir(tmp_path_factory.mktemp(family), family)
        return made[family]

    return make


def generate(path, params, **kwargs) -> tuple[list[list[int]], int]:
    """Token ids of every prompt, and the number of preemptions, at the given engine settings."""
    llm = LLM(str(path), device="cpu", **kwargs)
    try:
        outputs = llm.generate(PROMPTS, params)
        return [o.token_ids for o in outputs], llm.engine.scheduler.num_preemptions
    finally:
        llm.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_generates_what_tp1_generates(tiny_model_dir, family):
    path = tiny_model_dir(family)
    params, settings = (MIXED, PRESSURE) if family == "llama" else (GREEDY, {})
    want, _ = generate(path, params, **settings)
    got, preemptions = generate(path, params, tensor_parallel_size=2, **settings)
    assert got == want
    if family == "llama":
        assert preemptions > 0
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("kv_format", ["fp8", "K8V4"])
def test_quantized_kv_formats_shard_by_head(tmp_path, kv_format):
    """Every scale group lies inside one KV head, so each rank quantizes its heads as one process does."""
    path = make_tiny_model_dir(tmp_path / "llama32", "llama", head_dim=32)   # int4 value groups: 32 channels
    want, _ = generate(path, GREEDY, kv_format=kv_format)
    got, _ = generate(path, GREEDY, kv_format=kv_format, tensor_parallel_size=2)
    assert got == want


def test_a_killed_worker_fails_the_requests_and_leaves_no_process(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), device="cpu", tensor_parallel_size=2)
    engine = llm.engine
    workers = engine.runner.peers
    try:
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(str(i), prompt, GREEDY)
        engine.step()
        pid = workers.procs[0].pid
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerExited, match=r"tensor-parallel worker rank 1 exited with code -9"):
            for _ in range(100):
                engine.step()
        assert engine.requests == {} and not engine.has_unfinished_requests()
        with pytest.raises(WorkerExited, match="rank 1 exited"):  # the node stays down, it does not hang
            engine.add_request("late", PROMPTS[0], GREEDY)
            engine.step()
    finally:
        llm.close()
    assert multiprocessing.active_children() == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_worker_lost_during_a_step_voids_the_steps_tokens(tiny_model_dir, monkeypatch):
    """Under NCCL a collective whose peer died is aborted by the monitor and returns partial sums without an
    error: a step during which the group was lost must not hand out its tokens. Here the worker dies right
    after rank 0's step computed (as it would inside it), and the monitor records it before the step returns."""
    llm = LLM(str(tiny_model_dir("llama")), device="cpu", tensor_parallel_size=2)
    engine = llm.engine
    workers = engine.runner.peers
    real_step = engine._step

    def step_then_lose_the_worker():
        outputs = real_step()
        os.kill(workers.procs[0].pid, signal.SIGKILL)
        workers._monitor.join(10)
        return outputs

    try:
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(str(i), prompt, GREEDY)
        engine.step()
        monkeypatch.setattr(engine, "_step", step_then_lose_the_worker)
        with pytest.raises(WorkerExited, match=r"rank 1 exited with code -9"):
            engine.step()
        assert engine.requests == {} and not engine.has_unfinished_requests()
    finally:
        llm.close()
    assert multiprocessing.active_children() == []


def test_workers_ended_by_the_finalizer_are_not_a_failure(tiny_model_dir, caplog):
    """Garbage collection or interpreter exit ends the workers through the finalizer: the monitor must not
    report that as a lost group (nor abort communicators), and aborting a group already destroyed is quiet."""
    llm = LLM(str(tiny_model_dir("opt")), device="cpu", tensor_parallel_size=2)
    workers = llm.engine.runner.peers
    try:
        workers._finalizer()
        workers._monitor.join(10)
        assert not workers._monitor.is_alive()
        assert workers.failure is None
    finally:
        llm.close()
    assert "exited with code" not in caplog.text
    _abort_nccl(workers.tp.group)   # destroyed by close: returns without raising or logging
    assert "aborting" not in caplog.text
    assert multiprocessing.active_children() == []


def test_workers_die_with_the_main_process(tiny_model_dir):
    """A server killed outright (SIGKILL: no cleanup runs) leaves no worker holding its memory."""
    script = ("import sys; from ccserve import LLM; "
              f"llm = LLM({str(tiny_model_dir('opt'))!r}, device='cpu', tensor_parallel_size=2); "
              "print(llm.engine.runner.peers.procs[0].pid, flush=True); sys.stdin.read()")
    server = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              cwd=Path(__file__).parents[2], text=True)
    try:
        worker = int(server.stdout.readline())
    finally:
        server.kill()
        server.wait()
    deadline = time.monotonic() + 10
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(worker)


def _running(pid: int) -> bool:
    """Whether pid is a live process (a zombie waiting for its reaper is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_shapes_that_do_not_split_are_refused_before_any_worker_starts(tiny_model_dir):
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 does not divide the attention heads"):
        LLM(str(tiny_model_dir("llama")), device="cpu", tensor_parallel_size=3)
    assert multiprocessing.active_children() == []


def test_more_gpus_than_visible_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 needs 2 GPUs.*--tensor-parallel-size"):
        LLM(str(tiny_model_dir("llama")), device="cuda", tensor_parallel_size=2)
    assert multiprocessing.active_children() == []


def test_a_model_too_large_for_the_gpus_is_refused():
    gib = 1 << 30
    check_fits(weights=60 * gib, kv_per_sequence=2 * gib, size=2, free=[40 * gib, 40 * gib])
    with pytest.raises(ValueError, match=r"does not fit tensor_parallel_size 2.*GPU 1 has 20.0 GiB free: "
                                         r"raise --tensor-parallel-size \(at least 4 such GPUs\)"):
        check_fits(weights=60 * gib, kv_per_sequence=2 * gib, size=2, free=[40 * gib, 20 * gib])


def test_weight_estimate_counts_the_models_parameters(tiny_model_dir):
    path = str(tiny_model_dir("qwen3"))
    config = EngineConfig(model=path, device="cpu")
    model, _ = load_model(config)
    assert weight_bytes(config, read_hf_config(path)) == sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("settings,match", [
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be >= 1"),
    (dict(tensor_parallel_size=2, device="cuda:1"), "choose GPUs with CUDA_VISIBLE_DEVICES"),
    (dict(tensor_parallel_size=2, tp_all_reduce="ring"), "tp_all_reduce must be one of nccl, peer"),
    (dict(tensor_parallel_size=3, device="cuda", tp_all_reduce="peer"), "peer runs on 2 GPUs"),
    (dict(tensor_parallel_size=2, device="cuda", cc="naive", tp_all_reduce="peer"), "every collective is sealed"),
    (dict(tensor_parallel_size=2, device="cpu", tp_all_reduce="peer"), "use --tp-all-reduce nccl"),
    (dict(tp_all_reduce="peer"), "--tensor-parallel-size 2"),
])
def test_bad_settings_are_refused(tiny_model_dir, settings, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(model=str(tiny_model_dir("llama")), **settings)
