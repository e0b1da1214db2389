"""Weight streaming (--gpu-weight-budget) on tiny models, CPU as the "GPU" (plain copies; real AES-GCM through
OpenSSL under cc): streamed forward passes and greedy generation equal the resident ones bit for bit in every cc
mode, the host holds only ciphertext under cc, a byte altered at rest fails the pass, and budgets that cannot
work are refused with the smallest one that can."""
from __future__ import annotations

import argparse

import pytest
import torch

from ccserve import LLM, SamplingParams
from ccserve.cli import add_engine_args
from ccserve.config import EngineConfig
from ccserve.engine.weight_plan import GIB, RING_SLOTS, plan_stream
from ccserve.engine.weight_stream import (
    SealedLoader,
    attach_weight_stream,
    decoder_layers,
    packed_bytes,
    resident_bytes,
)
from ccserve.models.loader import load_model
from ccserve.secure import IntegrityError
from tests.engine.test_engine import prompts_of
from tests.tiny_models import PagedRunner, make_tiny_model_dir

LAYERS = 6
MODES = ("off", "naive", "pipelined")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-models")
    return {f: make_tiny_model_dir(root / f, f, num_hidden_layers=LAYERS) for f in ("llama", "opt")}


def sizes(path) -> tuple[int, int]:
    """(resident bytes, one packed layer's bytes) of the model as the engine builds it on the CPU."""
    model, _ = load_model(EngineConfig(str(path), device="cpu"))
    layers = decoder_layers(model, LAYERS)
    return resident_bytes(model, layers), packed_bytes(layers[0])


def half_budget(path) -> float:
    """A budget (GiB) that keeps 2 of the 6 layers resident under cc (ring of 3), 3 with cc off: 4 stream."""
    resident, layer = sizes(path)
    return (resident + (RING_SLOTS + 1 + 2) * (layer + 256)) / GIB


def streamed_model(path, cc: str):
    config = EngineConfig(str(path), device="cpu")
    model, hf = load_model(config)
    stream = attach_weight_stream(model, LAYERS, half_budget(path), cc, 2, torch.device("cpu"))
    return model, stream


def prompts() -> list[list[int]]:
    return prompts_of(3, seed=7)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_streamed_logits_equal_resident_bit_for_bit(model_dirs, family):
    path = model_dirs[family]
    resident, _ = load_model(EngineConfig(str(path), device="cpu"))
    want = PagedRunner(resident).step([], list(enumerate(prompts())))
    for cc in MODES:
        model, stream = streamed_model(path, cc)
        assert stream.num_streamed >= LAYERS // 2, cc
        runner = PagedRunner(model)
        for _ in range(2):      # the second pass runs from the ring's wrapped-around state
            got = runner.step([], list(enumerate(prompts())))
            runner.lens.clear()
            assert all(torch.equal(a, b) for a, b in zip(got, want)), cc
        stream.close()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_streamed_greedy_generation_equals_resident(model_dirs, family):
    path = str(model_dirs[family])
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = [o.token_ids for o in LLM(path, max_model_len=128, num_gpu_blocks=64).generate(prompts(), params)]
    for cc in MODES:
        llm = LLM(path, max_model_len=128, num_gpu_blocks=64, cc=cc, gpu_weight_budget_gb=half_budget(path))
        assert llm.engine.runner.weights.num_streamed >= LAYERS // 2
        assert [o.token_ids for o in llm.generate(prompts(), params)] == want, cc
        if cc == "pipelined":
            stats = llm.engine.runner.weights.loader.channel.pipeline.stats
            # every layer but the very first was sealed ahead and claimed; nothing was sealed in vain
            assert stats.hits > 0 and stats.misses == 1 and stats.stale == 0 and stats.relinquished == 0
        llm.engine.runner.weights.close()


@pytest.mark.parametrize("cc", ["naive", "pipelined"])
def test_host_holds_only_ciphertext(model_dirs, cc):
    path = model_dirs["llama"]
    plain, _ = load_model(EngineConfig(str(path), device="cpu"))
    model, stream = streamed_model(path, cc)
    assert isinstance(stream.loader, SealedLoader)
    layers = decoder_layers(plain, LAYERS)
    for k, i in enumerate(stream.plan.streamed):
        stored = stream.loader.ciphertext(k).numpy().tobytes()
        for p in layers[i].parameters():
            raw = p.detach().reshape(-1).view(torch.uint8).numpy().tobytes()
            windows = [raw[j:j + 32] for j in range(0, len(raw) - 32, max(32, len(raw) // 8))]
            assert not any(w in stored for w in windows), f"plaintext of layer {i} found at rest"
    stream.close()


@pytest.mark.parametrize("cc", ["naive", "pipelined"])
def test_tampered_host_layer_fails_the_pass(model_dirs, cc):
    model, stream = streamed_model(model_dirs["opt"], cc)
    runner = PagedRunner(model)
    runner.step([], list(enumerate(prompts())))
    stream.loader.ciphertext(2)[100] ^= 0x01     # the host flips one byte of a layer at rest (not opened ahead)
    runner.lens.clear()
    with pytest.raises(IntegrityError):
        runner.step([], list(enumerate(prompts())))
    stream.close()


def test_budget_that_holds_everything_streams_nothing(model_dirs):
    path = str(model_dirs["llama"])
    llm = LLM(path, max_model_len=64, num_gpu_blocks=32, gpu_weight_budget_gb=1.0)
    assert llm.engine.runner.weights is None


@pytest.mark.parametrize("cc", ["off", "naive"])
def test_too_small_budget_names_the_flag_and_the_minimum(model_dirs, cc):
    path = model_dirs["llama"]
    resident, layer = sizes(path)
    with pytest.raises(ValueError, match="--gpu-weight-budget .* too small.*pass at least") as err:
        LLM(str(path), max_model_len=64, num_gpu_blocks=32, cc=cc, gpu_weight_budget_gb=resident / GIB)
    minimum = float(str(err.value).split("pass at least ")[1].split(" GiB")[0])
    ring = RING_SLOTS + (cc != "off")
    assert minimum == pytest.approx((resident + ring * -(-layer // 256) * 256) / GIB, rel=1e-3)
    llm = LLM(str(path), max_model_len=64, num_gpu_blocks=32, cc=cc, gpu_weight_budget_gb=minimum)
    assert llm.engine.runner.weights.num_streamed == LAYERS     # the minimum works: every layer streams
    llm.engine.runner.weights.close()


def test_plan_streams_evenly_spread_layers_in_ring_multiples():
    plan = plan_stream([1000] * 8, 50, (50 + 2 * 1024 + 4 * 1000) / GIB, cc=False)     # ring + 4 resident
    assert plan.ring == RING_SLOTS and plan.slot_bytes == 1024
    assert plan.streamed == (1, 3, 5, 7)
    odd = plan_stream([1000] * 8, 50, (50 + 2 * 1024 + 5 * 1000) / GIB, cc=False)     # 3 would stream: 4 do
    assert odd.streamed == (1, 3, 5, 7)
    assert plan_stream([1000] * 8, 50, 1.0, cc=True).streamed == ()
    with pytest.raises(ValueError, match="positive"):
        plan_stream([100] * 8, 50, 0, cc=False)


def test_config_and_flag():
    with pytest.raises(ValueError, match="--gpu-weight-budget"):
        EngineConfig("bench/models/opt-30b", load_format="dummy", gpu_weight_budget_gb=-1)
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert parser.parse_args(["--gpu-weight-budget", "1.5"]).gpu_weight_budget_gb == 1.5


@pytest.mark.parametrize("cc", ["off", "pipelined"])
def test_every_layer_streamed_with_an_odd_count(tmp_path, cc):
    """All 5 layers stream (odd: the ring's rotation restarts at the wrap), passes after passes stay exact."""
    path = make_tiny_model_dir(tmp_path / "llama5", "llama", num_hidden_layers=5)
    resident, _ = load_model(EngineConfig(str(path), device="cpu"))
    want = PagedRunner(resident).step([], list(enumerate(prompts())))
    model, _ = load_model(EngineConfig(str(path), device="cpu"))
    layers = decoder_layers(model, 5)
    slot = -(-packed_bytes(layers[0]) // 256) * 256
    minimum = (resident_bytes(model, layers) + (RING_SLOTS + (cc != "off")) * slot + 64) / GIB
    stream = attach_weight_stream(model, 5, minimum, cc, 2, torch.device("cpu"))
    assert stream.num_streamed == 5
    runner = PagedRunner(model)
    for _ in range(3):
        got = runner.step([], list(enumerate(prompts())))
        runner.lens.clear()
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    stream.close()


@pytest.mark.parametrize("cc", ["off", "pipelined"])
def test_tensor_parallel_ranks_stream_their_slices(model_dirs, cc):
    """TP=2 (rank 1 in a worker, gloo): each rank streams the layers of its slice that its budget does not hold,
    and the group generates what one process with every weight resident generates."""
    path = str(model_dirs["llama"])
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = [o.token_ids for o in LLM(path, max_model_len=128, num_gpu_blocks=64).generate(prompts(), params)]
    resident, layer = sizes(path)
    per_rank = (resident / 2 + (RING_SLOTS + 2) * (layer / 2 + 256)) / GIB    # about one slice layer resident
    llm = LLM(path, max_model_len=128, num_gpu_blocks=64, cc=cc, gpu_weight_budget_gb=per_rank,
              tensor_parallel_size=2, device="cpu")
    try:
        assert llm.engine.runner.weights.num_streamed >= LAYERS // 2
        assert [o.token_ids for o in llm.generate(prompts(), params)] == want
    finally:
        llm.close()
