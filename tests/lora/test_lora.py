"""Multi-LoRA end to end on a tiny llama (CPU, float32): outputs equal HF PEFT's, a batch mixing adapters and the
base model equals each request run alone, the GPU adapter cache evicts least recently used adapters when it has
fewer slots than adapters, every --cc mode gives the same tokens, and bad adapters are refused with a reason."""
from __future__ import annotations

import json

import pytest

from ccserve import LLM, SamplingParams
from ccserve.layers.lora import LoraLinear
from ccserve.secure import IntegrityError
from tests.engine.test_engine import prompts_of
from tests.lora.adapters import make_adapter, peft_greedy
from tests.tiny_models import make_tiny_model_dir

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model = make_tiny_model_dir(root / "llama", "llama")
    return dict(model=model, a=make_adapter(model, root / "a", rank=8, seed=1),
                b=make_adapter(model, root / "b", rank=4, seed=2, targets=["q_proj", "v_proj"]),
                c=make_adapter(model, root / "c", rank=16, seed=3, use_rslora=True))


def llm(dirs, names=("a", "b", "c"), **kwargs) -> LLM:
    return LLM(str(dirs["model"]), max_model_len=128, num_gpu_blocks=64,
               lora_adapters={n: str(dirs[n]) for n in names}, **kwargs)


def tokens(engine: LLM, prompts, lora) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(prompts, PARAMS, lora=lora)]


def test_outputs_equal_hf_peft(dirs):
    prompts = prompts_of(2, seed=3)
    engine = llm(dirs)
    for name in ("a", "b", "c", None):
        ours = tokens(engine, prompts, name)
        for prompt, got in zip(prompts, ours):
            assert got == peft_greedy(dirs["model"], dirs[name] if name else None, prompt, PARAMS.max_tokens), name
    assert tokens(engine, prompts, "a") != tokens(engine, prompts, None)   # the adapter changes the output


@pytest.mark.parametrize("family,targets", [
    ("qwen3", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("opt", ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
])
def test_other_families_equal_hf_peft(tmp_path, family, targets):
    """Every projection of a layer, through the models' own checkpoint-name mapping (fused q/k/v and gate/up)."""
    model = make_tiny_model_dir(tmp_path / family, family)
    adapter = make_adapter(model, tmp_path / "adapter", seed=4, targets=targets)
    engine = LLM(str(model), max_model_len=64, num_gpu_blocks=32, lora_adapters={"x": str(adapter)})
    prompt = prompts_of(1, seed=4)[0]
    assert tokens(engine, [prompt], "x")[0] == peft_greedy(model, adapter, prompt, PARAMS.max_tokens)


@pytest.mark.parametrize("steps", [1, 8])
def test_mixed_batch_equals_each_alone_with_lru_eviction(dirs, steps):
    """Two slots for three adapters: batches hold at most two, the cache evicts and reloads, outputs unchanged."""
    prompts = prompts_of(8, seed=5)
    names = ["a", "b", None, "c", "a", None, "c", "b"]
    engine = llm(dirs, max_loras=2, num_decode_steps=steps)
    alone = [tokens(engine, [p], n)[0] for p, n in zip(prompts, names)]
    loads = engine.engine.runner.lora.loads
    assert tokens(engine, prompts, names) == alone
    cache = engine.engine.runner.lora
    assert cache.num_slots == 2 and len(cache.resident) <= 2
    assert cache.loads > loads and cache.hits > 0
    stats = engine.engine.stats()
    assert (stats.lora_loads, stats.lora_hits) == (cache.loads, cache.hits)


@pytest.mark.parametrize("cc", ["off", "naive"])
def test_tensor_parallel_gives_the_tokens_of_one_process(dirs, cc):
    """TP=2 (rank 1 in a worker process, gloo): each rank holds its slice of every adapter (B's rows of the
    column-parallel projections, A's columns of the row-parallel ones, whose deltas join the all-reduce) and
    loads the same adapters into the same slots; mixed batches with evictions and decode windows give one
    process's tokens, with the adapter loads (and collectives) sealed under --cc too."""
    prompts = prompts_of(6, seed=9)
    names = ["a", "b", None, "c", "a", "c"]
    settings = dict(max_loras=2, num_decode_steps=4, device="cpu", cc=cc)
    want = tokens(llm(dirs, **settings), prompts, names)
    group = llm(dirs, tensor_parallel_size=2, **settings)
    try:
        assert tokens(group, prompts, names) == want
        assert group.engine.runner.lora.loads >= 3    # three adapters through two slots: an eviction
    finally:
        group.close()


def test_batch_never_holds_more_adapters_than_slots(dirs):
    engine = llm(dirs, max_loras=1)
    seen = []
    run = engine.engine.runner.execute

    def spy(batch):
        seen.append({s.lora for s, _ in batch.items()} - {None})
        return run(batch)
    engine.engine.runner.execute = spy
    engine.generate(prompts_of(6, seed=7), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                    lora=["a", "b", "a", None, "c", "b"])
    assert seen and all(len(s) <= 1 for s in seen)


def test_cc_modes_give_identical_tokens(dirs):
    prompts = prompts_of(5, seed=9)
    names = ["a", "c", None, "b", "a"]
    off = tokens(llm(dirs, max_loras=2), prompts, names)
    for cc in ("naive", "pipelined"):
        engine = llm(dirs, max_loras=2, cc=cc)
        assert tokens(engine, prompts, names) == off, cc
        channel = engine.engine.runner.lora.channel
        assert channel.stats.h2d_bytes > 0      # adapters crossed through their own encrypted channel
        if cc == "pipelined":                   # the waiting queue's adapters were sealed ahead
            assert channel.stats.sealed_on_demand_bytes < channel.stats.h2d_bytes


def test_tampered_adapter_message_fails_only_its_requests(dirs):
    """The first adapter message is altered on the wire: its request ends with an error and gets no token; the
    adapter channel re-keys and the next request's output is untouched."""
    prompts = prompts_of(2, seed=1)
    ref = tokens(llm(dirs), prompts[1:], "b")[0]
    engine = llm(dirs, cc="naive", max_num_seqs=1).engine
    engine.add_request("x", prompts[0], PARAMS, lora="a")
    engine.add_request("y", prompts[1], PARAMS, lora="b")
    first = engine.runner.lora.channel
    seal = first.seal_h2d

    def flip(src):
        sealed = seal(src)
        sealed.wire[5] ^= 1
        return sealed
    first.seal_h2d = flip
    seq_x = engine.requests["x"]
    with pytest.raises(IntegrityError):
        engine.step()
    assert seq_x.finish_reason == "error" and not seq_x.output_token_ids
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert done == {"y": ref}
    assert first.failed and engine.runner.lora.channel is not first


def test_unknown_adapter_name_is_refused(dirs):
    engine = llm(dirs, names=("a",))
    with pytest.raises(ValueError, match="unknown LoRA adapter 'zz'.*'a'"):
        engine.generate(prompts_of(1, seed=1), PARAMS, lora="zz")


def test_bad_adapters_are_refused(dirs, tmp_path):
    model = dirs["model"]
    with pytest.raises(ValueError, match="not a LoRA adapter: it has no adapter_config.json"):
        LLM(str(model), lora_adapters={"x": str(model)})
    with pytest.raises(ValueError, match="rank 16, above --max-lora-rank 8"):
        llm(dirs, names=("c",), max_lora_rank=8)
    other = make_tiny_model_dir(tmp_path / "wide", "llama", hidden_size=96)
    foreign = make_adapter(other, tmp_path / "foreign")
    with pytest.raises(ValueError, match="trained on another base model.*hidden_size 96"):
        LLM(str(model), lora_adapters={"f": str(foreign)})
    config = json.loads((foreign / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/some-hub-model"     # not checkable offline: shapes are
    (foreign / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit the served model.*another base model"):
        LLM(str(model), lora_adapters={"f": str(foreign)})
    config["peft_type"] = "PREFIX_TUNING"
    (foreign / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a LoRA adapter: adapter_config.json has peft_type 'PREFIX_TUNING'"):
        LLM(str(model), lora_adapters={"f": str(foreign)})


def test_no_adapters_means_no_lora_in_the_model(dirs):
    engine = LLM(str(dirs["model"]), max_model_len=64, num_gpu_blocks=16)
    assert engine.engine.runner.lora is None
    assert not any(isinstance(m, LoraLinear) for m in engine.engine.runner.model.modules())
