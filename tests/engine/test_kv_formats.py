"""The engine with quantized KV caches (--kv-format) on tiny random models: close to the model-dtype cache,
preemption and chunked prefill work, every block (codes, scales, zero points) is freed and scrubbed, and bad
formats are named."""
from __future__ import annotations

import pytest
import torch

from ccserve import LLM, SamplingParams
from ccserve.config import EngineConfig
from ccserve.kv.formats import PRESETS
from ccserve.privacy.policy import enforce
from tests.tiny_models import make_tiny_model_dir

QUANTIZED = [name for name, f in PRESETS.items() if f.quantized]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # head_dim 32: the int4/int2 value groups (32 channels) fit
    return make_tiny_model_dir(tmp_path_factory.mktemp("kv-formats") / "llama", "llama", head_dim=32)


def prompts_of(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 500, (int(torch.randint(8, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def assert_freed_and_scrubbed(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    for t in llm.engine.runner.kv_cache.tensors:
        assert t.view(torch.uint8).abs().sum() == 0 if t.dtype == torch.float8_e4m3fn else t.abs().sum() == 0


def test_k8v8_greedy_and_logprobs_stay_close_to_model_dtype(model_dir):
    prompts = prompts_of(4, seed=1)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    full = LLM(str(model_dir), max_model_len=256, num_gpu_blocks=64).generate(prompts, params)
    quant = LLM(str(model_dir), max_model_len=256, num_gpu_blocks=64, kv_format="K8V8").generate(prompts, params)
    agreed = 0
    for f, q in zip(full, quant):
        for a, b in zip(f.logprobs, q.logprobs):
            if a.token_id != b.token_id:
                break
            agreed += 1
            assert abs(a.logprob - b.logprob) < 0.03        # int8 K/V moves log-probabilities by < 0.01 here
    # tiny random models have near-ties (K8V8 diverges at tokens 24, 20, 14, 24 of 24 here: 85%)
    assert agreed >= 0.75 * sum(len(f.token_ids) for f in full)


@pytest.mark.parametrize("name", QUANTIZED)
def test_chunked_preempted_requests_finish_free_and_scrub(model_dir, name):
    """Tiny chunks and too few blocks (recompute preemption) with a quantized cache: every request finishes,
    and afterwards every block is free and every KV tensor, scales and zero points included, is zero."""
    prompts = prompts_of(6, seed=3)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    llm = LLM(str(model_dir), max_model_len=96, num_gpu_blocks=14, block_size=8, max_num_batched_tokens=12,
              kv_format=name)
    outs = llm.generate(prompts, params)
    assert all(o.finished and len(o.token_ids) == 30 for o in outs)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_freed_and_scrubbed(llm)
    alone = LLM(str(model_dir), max_model_len=96, num_gpu_blocks=64, block_size=8, kv_format=name)
    agree = sum(a == b for o, p in zip(outs, prompts)
                for a, b in zip(o.token_ids, alone.generate([p], params)[0].token_ids))
    assert agree >= 0.5 * 30 * len(prompts)          # same tokens mostly, though chunking changes rounding


def test_abort_scrubs_scales_too(model_dir):
    llm = LLM(str(model_dir), max_model_len=128, num_gpu_blocks=32, kv_format="K4V2")
    engine = llm.engine
    engine.add_request("a", prompts_of(1, seed=2)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    used = list(engine.requests["a"].block_ids)
    cache = engine.runner.kv_cache
    assert all(t[:, used].abs().sum() > 0 for t in cache.tensors)
    engine.abort_request("a")
    assert all(t[:, used].abs().sum() == 0 for t in cache.tensors)
    assert_freed_and_scrubbed(llm)


def test_format_sizes_the_cache_and_reports_capacity(model_dir):
    base = LLM(str(model_dir), max_model_len=128, num_gpu_blocks=20).engine
    k4v2 = LLM(str(model_dir), max_model_len=128, num_gpu_blocks=20, kv_format="K4V2").engine
    assert k4v2.runner.kv_cache.nbytes == 20 * k4v2.runner._bytes_per_block()
    assert base.runner.kv_cache.nbytes == 20 * base.runner._bytes_per_block()
    # float32 on the CPU: 8 bytes of K+V per channel against 0.75 (int4 keys + scales) ... (int2 values + scales)
    assert base.runner._bytes_per_block() > 5 * k4v2.runner._bytes_per_block()
    assert k4v2.stats().kv_capacity_tokens == 20 * 16
    ratio = base.runner._bytes_per_block() / k4v2.runner._bytes_per_block()
    assert k4v2.stats().kv_format_compression == pytest.approx(ratio) and base.stats().kv_format_compression == 1.0


def test_bad_formats_are_named(model_dir, tmp_path):
    with pytest.raises(ValueError, match="--kv-format 'K3V1'.*K8V4"):
        EngineConfig(model=str(model_dir), kv_format="K3V1")
    small = make_tiny_model_dir(tmp_path / "small", "llama")        # head_dim 16: no groups of 32 channels
    with pytest.raises(ValueError, match="--kv-format K8V4 does not fit this model: head_dim 16"):
        LLM(str(small), max_model_len=64, num_gpu_blocks=16, kv_format="K8V4")
    assert LLM(str(small), max_model_len=64, num_gpu_blocks=16, kv_format="K8V8")   # whole-head groups fit


def test_quantized_kv_is_allowed_under_pcc(model_dir):
    for name in PRESETS:
        enforce(EngineConfig(model=str(model_dir), kv_format=name, privacy="pcc"))      # raises if refused
