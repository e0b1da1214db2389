"""The engine end to end on tiny random models (CPU, float32): against HF transformers, under batching,
chunking and preemption, with bad input, and without leaking or leaving KV blocks unscrubbed."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from ccserve import LLM, SamplingParams
from ccserve.config import EngineConfig
from ccserve.engine.llm_engine import LLMEngine
from tests.tiny_models import make_tiny_model_dir

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-models")
    return {f: make_tiny_model_dir(root / f, f) for f in ("llama", "qwen2", "qwen3", "mistral", "opt")}


def prompts_of(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 500, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def hf_greedy(model_dir, prompt: list[int], n: int) -> list[int]:
    """HF's greedy tokens with EOS treated as an ordinary token (generate's min_new_tokens would mask it)."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def assert_no_leak(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert not llm.engine.requests and not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("seed,family", list(enumerate(["llama", "qwen2", "qwen3", "mistral", "opt"])))
def test_greedy_matches_hf_in_a_batch(model_dirs, seed, family):
    llm = LLM(str(model_dirs[family]), max_model_len=256, num_gpu_blocks=64)
    prompts = prompts_of(3, seed=seed)
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(model_dirs[family], prompt, 32)
        assert out.finish_reason == "length" and out.finished
    assert_no_leak(llm)


def test_alone_equals_batched_chunked_and_preempted(model_dirs):
    """Same greedy tokens alone, batched, with tiny chunks, and when blocks run out and force recompute."""
    path = str(model_dirs["llama"])
    prompts = prompts_of(6, seed=3)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    alone = [LLM(path, max_model_len=256, num_gpu_blocks=64).generate([p], params)[0].token_ids for p in prompts]
    batched = LLM(path, max_model_len=256, num_gpu_blocks=64)
    assert [o.token_ids for o in batched.generate(prompts, params)] == alone
    chunked = LLM(path, max_model_len=256, num_gpu_blocks=64, max_num_batched_tokens=7)
    assert [o.token_ids for o in chunked.generate(prompts, params)] == alone
    tight = LLM(path, max_model_len=96, num_gpu_blocks=12, block_size=8)
    assert [o.token_ids for o in tight.generate(prompts, params)] == alone
    assert tight.engine.scheduler.num_preemptions > 0
    for llm in (batched, chunked, tight):
        assert_no_leak(llm)


def test_seeded_sampling_is_independent_of_batch(model_dirs):
    llm = LLM(str(model_dirs["qwen2"]), max_model_len=256, num_gpu_blocks=64)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    noisy = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    prompt = prompts_of(1, seed=9)[0]
    alone = llm.generate([prompt], seeded)[0].token_ids
    mixed = llm.generate(prompts_of(3, seed=1) + [prompt], [noisy] * 3 + [seeded])[3].token_ids
    assert alone == mixed
    assert_no_leak(llm)


def test_stop_conditions(model_dirs):
    llm = LLM(str(model_dirs["llama"]), max_model_len=64, num_gpu_blocks=64)
    prompt = prompts_of(1, seed=5)[0]
    free_run = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    stop_id = free_run.token_ids[5]
    first = free_run.token_ids.index(stop_id)
    stopped = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                    stop_token_ids=[stop_id]))[0]
    assert stopped.token_ids == free_run.token_ids[:first + 1] and stopped.finish_reason == "stop"
    text = free_run.text
    stop_str = text[len(text) // 2:len(text) // 2 + 3]
    by_str = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop_str]))[0]
    assert by_str.finish_reason == "stop" and by_str.text == text[:text.index(stop_str)]
    long_prompt = prompts_of(1, seed=6)[0] * 3
    capped = llm.generate([long_prompt[:60]], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert len(capped.token_ids) == 4 and capped.finish_reason == "length"  # max_model_len 64
    assert_no_leak(llm)


def test_abort_frees_and_scrubs_blocks(model_dirs):
    engine = LLMEngine(EngineConfig(model=str(model_dirs["llama"]), max_model_len=128, num_gpu_blocks=32))
    engine.add_request("a", prompts_of(1, seed=2)[0] * 2, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", prompts_of(1, seed=4)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    used = list(engine.requests["a"].block_ids)
    assert used and engine.runner.kv_cache.k[:, used].abs().sum() > 0
    engine.abort_request("a")
    assert engine.runner.kv_cache.k[:, used].abs().sum() == 0 and engine.runner.kv_cache.v[:, used].abs().sum() == 0
    while engine.has_unfinished_requests():
        engine.step()
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert engine.runner.kv_cache.k.abs().sum() == 0, "finished requests' KV must be scrubbed"


def test_bad_input_is_named(model_dirs, tmp_path):
    llm = LLM(str(model_dirs["llama"]), max_model_len=64, num_gpu_blocks=16)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([list(range(5, 70))], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[1, 10**9]], SamplingParams())
    for bad, field in ((dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-1), "temperature"),
                       (dict(max_tokens=0), "max_tokens"), (dict(top_k=-3), "top_k"), (dict(min_p=2), "min_p")):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)
    assert_no_leak(llm)
    # a good request still works after the bad ones
    assert len(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "missing"))
    odd = tmp_path / "odd"
    odd.mkdir()
    config = json.loads((model_dirs["llama"] / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        LLM(str(odd), load_format="dummy")


def test_chat_text_prompt_and_logprobs(model_dirs):
    llm = LLM(str(model_dirs["qwen3"]), max_model_len=128, num_gpu_blocks=32)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}], tokenize=False,
                                               add_generation_prompt=True)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3))[0]
    assert len(out.logprobs) == 8
    for lp, token in zip(out.logprobs, out.token_ids):
        assert lp.token_id == token and len(lp.top) == 3 and lp.logprob <= 0
        assert max(lp.top.values()) == pytest.approx(lp.logprob, abs=1e-5)  # greedy picks the top token
    assert_no_leak(llm)


def test_multi_step_decode_equals_single_step(model_dirs):
    """Decoding several steps per host round trip changes nothing: greedy and seeded tokens, stops inside a
    multi-step window (stop token, max_tokens), logprobs, and block accounting."""
    path = str(model_dirs["qwen3"])
    prompts = prompts_of(5, seed=11)
    one = LLM(path, max_model_len=128, num_gpu_blocks=64, num_decode_steps=1)
    free_run = one.generate(prompts[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[free_run.token_ids[13]]),
              SamplingParams(temperature=0.9, top_k=40, seed=7, max_tokens=21, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=3, max_tokens=30, ignore_eos=True)]
    expected = one.generate(prompts, params)
    many = LLM(path, max_model_len=128, num_gpu_blocks=64, num_decode_steps=8)
    got = many.generate(prompts, params)
    for e, g in zip(expected, got):
        assert g.token_ids == e.token_ids and g.finish_reason == e.finish_reason
    assert [(lp.token_id, lp.top) for lp in got[0].logprobs] == [(lp.token_id, lp.top) for lp in expected[0].logprobs]
    assert_no_leak(many)


def run_engine(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams],
               abort_in_flight: str | None = None) -> tuple[dict[str, list[int]], int]:
    """Drive the engine to the end; returns each request's tokens and how many steps found a window in
    flight. abort_in_flight names a request to abort the first time one of its windows is in flight."""
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
    tokens, in_flight = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] = list(out.token_ids)
        window = engine._window
        if window is not None:
            in_flight += 1
            if abort_in_flight in engine.requests and engine.requests[abort_in_flight] in window.seqs:
                engine.abort_request(abort_in_flight)
    return tokens, in_flight


def test_windows_continued_on_the_device_change_nothing(model_dirs):
    """A decode window enqueued before the host has read the previous one (the host's work overlaps the
    GPU's) gives the same tokens as single steps: stops and length limits inside the earlier window,
    max_model_len, seeded sampling, an abort while a window is in flight; every block ends free and zeroed."""
    path = str(model_dirs["llama"])
    prompts = prompts_of(5, seed=21)
    one = LLMEngine(EngineConfig(model=path, max_model_len=96, num_gpu_blocks=64, num_decode_steps=1))
    free, _ = run_engine(one, prompts[:1], [GREEDY])
    params = [GREEDY,
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=[free["0"][10]]),
              SamplingParams(temperature=0.8, seed=5, max_tokens=37, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=11, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)]     # stops at max_model_len
    one = LLMEngine(EngineConfig(model=path, max_model_len=96, num_gpu_blocks=64, num_decode_steps=1))
    expected, _ = run_engine(one, prompts, params)
    many = LLMEngine(EngineConfig(model=path, max_model_len=96, num_gpu_blocks=64, num_decode_steps=4))
    got, in_flight = run_engine(many, prompts, params)
    assert in_flight > 0, "no window was ever continued on the device"
    assert got == expected
    assert len(got["4"]) == 96 - len(prompts[4])
    many = LLMEngine(EngineConfig(model=path, max_model_len=96, num_gpu_blocks=64, num_decode_steps=4))
    got, _ = run_engine(many, prompts, params, abort_in_flight="0")
    assert len(got["0"]) < len(expected["0"])
    assert {k: v for k, v in got.items() if k != "0"} == {k: v for k, v in expected.items() if k != "0"}
    for engine in (one, many):
        stats = engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks
        assert engine.runner.kv_cache.k.abs().sum() == 0 and engine.runner.kv_cache.v.abs().sum() == 0


def test_no_window_outlives_its_requests(model_dirs):
    """A window enqueued for rows that then all finish (stop token inside the earlier window, or abort) is
    dropped: the engine keeps no finished sequence (and none of its tokens) once nothing is left to run."""
    path = str(model_dirs["llama"])
    prompt = prompts_of(1, seed=31)[0]
    probe = LLMEngine(EngineConfig(model=path, max_model_len=96, num_gpu_blocks=32, num_decode_steps=1))
    free, _ = run_engine(probe, [prompt], [GREEDY])
    stop_early = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, stop_token_ids=[free["0"][5]])
    engine = LLMEngine(EngineConfig(model=path, max_model_len=96, num_gpu_blocks=32, num_decode_steps=4))
    run_engine(engine, [prompt], [stop_early])
    assert engine._window is None
    engine.add_request("x", prompt, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    while engine._window is None:
        engine.step()
    engine.abort_request("x")
    assert engine._window is None and not engine.has_unfinished_requests()


def test_runner_state_is_scrubbed_when_the_engine_goes_idle(model_dirs):
    """Once the last request is done (finished or aborted) the runner clears what it still holds of it
    (ModelRunner.scrub_idle), once: a window's pinned token copy is zeroed as soon as it is read."""
    engine = LLMEngine(EngineConfig(model=str(model_dirs["llama"]), max_model_len=128, num_gpu_blocks=32))
    calls = []
    scrub_idle = engine.runner.scrub_idle
    engine.runner.scrub_idle = lambda: calls.append(engine.runner.ran_since_scrub) or scrub_idle()
    engine.add_request("a", prompts_of(1, seed=5)[0], SamplingParams(max_tokens=12, ignore_eos=True))
    windows = []
    start = engine.runner.execute_decodes
    engine.runner.execute_decodes = lambda *a, **k: windows.append(start(*a, **k)) or windows[-1]
    while engine.has_unfinished_requests():
        assert not any(calls), "scrubbed while a request was still running"
        engine.step()
    assert calls[-1] is True and not engine.runner.ran_since_scrub
    assert windows and all(not w.host_tokens.any() for w in windows), "read token copies must be zeroed"
    engine.step()                                   # idle: nothing ran since, nothing to do
    assert not engine.runner.ran_since_scrub
    engine.add_request("b", prompts_of(1, seed=6)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort_request("b")
    assert calls[-1] is True and not engine.runner.ran_since_scrub
