"""Confidential mode end to end on tiny models (CPU: the channel's OpenSSL reference backend, real AES-GCM):
every step's inputs and sampled tokens cross as sealed messages, greedy output is the same in every --cc mode,
a byte flipped on the wire fails only the requests of that message, and preemption by encrypted KV swap gives
the output of no preemption while leaving nothing behind (host pool empty, keys destroyed, blocks zeroed)."""
from __future__ import annotations

import pytest
import torch

from ccserve import LLM, SamplingParams
from ccserve.config import EngineConfig
from ccserve.engine.llm_engine import LLMEngine
from ccserve.secure import ChannelClosed, IntegrityError, OwnerEnded
from tests.engine.test_engine import prompts_of
from tests.tiny_models import make_tiny_model_dir

PARAMS = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cc-models")
    dirs = {f: make_tiny_model_dir(root / f, f) for f in ("llama", "qwen3")}
    # head_dim 32: the int4 value groups (32 channels) of the quantized formats fit
    dirs["llama32"] = make_tiny_model_dir(root / "llama32", "llama", head_dim=32)
    return dirs


def tokens(llm: LLM, prompts, params=PARAMS) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params)]


def assert_nothing_left(engine: LLMEngine) -> None:
    """No request, no block in use, every cache byte zero, no host ciphertext and no live per-request key."""
    assert not engine.requests and not engine.has_unfinished_requests()
    assert engine.pool.num_free == engine.pool.num_blocks
    assert all(not t.view(torch.uint8).any() for t in engine.runner.kv_cache.tensors)
    if engine.runner.swapper is not None:
        assert not engine.runner.swapper._outgoing
        assert len(engine.runner.swapper.store) == 0 and len(engine.runner.swapper.store.keys) == 0
        assert engine.runner.swapper.store.num_items == 0


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("steps", [1, 8])
def test_greedy_output_is_the_same_in_every_cc_mode(model_dirs, family, steps):
    path = str(model_dirs[family])
    prompts = prompts_of(5, seed=11)
    off = tokens(LLM(path, max_model_len=128, num_gpu_blocks=64, num_decode_steps=steps), prompts)
    for cc in ("naive", "pipelined"):
        llm = LLM(path, max_model_len=128, num_gpu_blocks=64, num_decode_steps=steps, cc=cc)
        assert tokens(llm, prompts) == off, cc
        stats = llm.engine.runner.boundary.channel.stats
        assert stats.h2d_bytes > 0 and stats.d2h_bytes > 0   # the steps really went through the channel
        assert_nothing_left(llm.engine)


def test_logprobs_cross_the_channel(model_dirs):
    path = str(model_dirs["llama"])
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    off = LLM(path, max_model_len=64, num_gpu_blocks=32).generate(prompts_of(2, seed=5), params)
    cc = LLM(path, max_model_len=64, num_gpu_blocks=32, cc="naive").generate(prompts_of(2, seed=5), params)
    for a, b in zip(off, cc):
        assert a.token_ids == b.token_ids
        assert [lp.logprob for lp in a.logprobs] == pytest.approx([lp.logprob for lp in b.logprobs])


def _flip_once(channel, method: str, after: int) -> None:
    """Play the attacker in the shared bounce buffer: flip one ciphertext byte of the channel's (after+1)-th
    message in one direction (H2D: after the host sealed it; D2H: before the host opens it)."""
    original = getattr(channel, method)
    count = [0]

    def flip(sealed):
        sealed.wire[3] ^= 0x40
        return sealed

    if method == "seal_h2d":
        def patched(src):
            sealed = original(src)
            count[0] += 1
            return flip(sealed) if count[0] == after + 1 else sealed
    else:
        def patched(sealed):
            count[0] += 1
            return original(flip(sealed) if count[0] == after + 1 else sealed)
    setattr(channel, method, patched)


@pytest.mark.parametrize("cc", ["naive", "pipelined"])
@pytest.mark.parametrize("method", ["seal_h2d", "open_d2h"])
def test_a_tampered_step_message_fails_only_its_requests(model_dirs, cc, method):
    """One request runs at a time (max_num_seqs=1): the one whose step message is altered ends with an error
    and gets no token of that step; the channel re-keys, and the next request's output is untouched."""
    path = str(model_dirs["llama"])
    prompts = prompts_of(2, seed=7)
    ref = tokens(LLM(path, max_model_len=96, num_gpu_blocks=32), prompts)
    engine = LLMEngine(EngineConfig(model=path, max_model_len=96, num_gpu_blocks=32, max_num_seqs=1, cc=cc,
                                    num_decode_steps=1))
    engine.add_request("a", prompts[0], PARAMS)
    engine.add_request("b", prompts[1], PARAMS)
    first = engine.runner.boundary.channel
    _flip_once(first, method, after=3)
    seq_a = engine.requests["a"]
    done: dict[str, list[int]] = {}
    failures = 0
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        before = list(seq_a.output_token_ids)
        try:
            outs = engine.step()
        except IntegrityError:
            failures += 1
            assert seq_a.output_token_ids == before          # nothing of the failed message was released
            assert seq_a.finish_reason == "error" and "a" not in engine.requests
            continue
        done.update({o.request_id: o.token_ids for o in outs if o.finished})
    assert failures == 1 and "a" not in done
    assert done["b"] == ref[1]
    assert first.failed and engine.runner.boundary.channel is not first
    assert_nothing_left(engine)


@pytest.mark.parametrize("cc,kv_format", [("naive", "bf16"), ("pipelined", "bf16"), ("pipelined", "K8V4"),
                                          ("naive", "fp8")])
def test_swap_preemption_gives_the_output_of_no_preemption(model_dirs, cc, kv_format):
    """A pool too small for the batch forces preemption; with swap every victim's blocks (quantized codes with
    their scales and zero points) come back bit for bit, so the output equals an unpressured run's."""
    path = str(model_dirs["llama32"])
    prompts = prompts_of(6, seed=3)
    roomy = tokens(LLM(path, max_model_len=96, num_gpu_blocks=80, block_size=8, kv_format=kv_format), prompts)
    llm = LLM(path, max_model_len=96, num_gpu_blocks=12, block_size=8, kv_format=kv_format, cc=cc,
              preemption_mode="swap")
    assert tokens(llm, prompts) == roomy
    engine = llm.engine
    assert engine.scheduler.num_swaps > 0 and engine.runner.swapper.swapped_in_bytes > 0
    if cc == "pipelined":
        assert engine.runner.swapper.channel.pipeline.stats.hits > 0   # swap-ins were sealed ahead
    crypto = engine.stats().crypto                                      # what /metrics shows, summed
    assert crypto.h2d_bytes > engine.runner.swapper.swapped_in_bytes and crypto.d2h_bytes > 0 and crypto.wait_s > 0
    if cc == "pipelined":
        assert crypto.speculated >= crypto.speculation_hits > 0
    else:
        assert crypto.speculated == crypto.speculation_hits == 0
    assert_nothing_left(engine)


@pytest.mark.parametrize("cc", ["naive", "pipelined"])
def test_tensor_parallel_ranks_swap_their_slices(model_dirs, cc):
    """TP=2 (rank 1 in a worker, gloo): every rank swaps its slice of a preempted request's blocks through its own
    swap channel into its own host store, as rank 0 says, and the output is an unpressured run's."""
    path = str(model_dirs["llama32"])
    prompts = prompts_of(6, seed=3)
    roomy = tokens(LLM(path, max_model_len=96, num_gpu_blocks=80, block_size=8), prompts)
    llm = LLM(path, max_model_len=96, num_gpu_blocks=12, block_size=8, cc=cc, preemption_mode="swap",
              tensor_parallel_size=2, device="cpu")
    try:
        assert tokens(llm, prompts) == roomy
        assert llm.engine.scheduler.num_swaps > 0 and llm.engine.runner.swapper.swapped_in_bytes > 0
        assert_nothing_left(llm.engine)
    finally:
        llm.close()


def test_auto_swaps_long_requests_and_recomputes_short_ones(model_dirs):
    path = str(model_dirs["llama"])
    prompts = prompts_of(6, seed=3)
    roomy = tokens(LLM(path, max_model_len=96, num_gpu_blocks=80, block_size=8), prompts)
    llm = LLM(path, max_model_len=96, num_gpu_blocks=12, block_size=8, cc="naive", swap_threshold_tokens=40)
    assert tokens(llm, prompts) == roomy
    sched = llm.engine.scheduler
    assert 0 < sched.num_swaps < sched.num_preemptions
    assert_nothing_left(llm.engine)


def _swap_engine(path: str, cc: str = "naive") -> LLMEngine:
    return LLMEngine(EngineConfig(model=path, max_model_len=96, num_gpu_blocks=12, block_size=8, cc=cc,
                                  preemption_mode="swap", num_decode_steps=1))


def _run(engine: LLMEngine) -> dict[str, list[int]]:
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    return done


def _others_as_before(done: dict[str, list[int]], ref: list[list[int]], ended: str) -> None:
    """Every request but `ended` finished with its reference tokens."""
    for i, r in enumerate(ref):
        if f"r{i}" != ended:
            assert done[f"r{i}"] == r


def _until_swap_out_in_flight(engine: LLMEngine, prompts) -> tuple:
    """(the swap-out not yet settled, its request) at the first step that leaves one in flight."""
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, PARAMS)
    for _ in range(200):
        engine.step()
        if engine.runner.swapper._outgoing:
            out = next(iter(engine.runner.swapper._outgoing.values()))
            return out, next(s for s in engine.requests.values() if s.swap_owner == out.owner)
    raise AssertionError("no swap-out was left in flight: the pool is not small enough")


def _until_swapped(engine: LLMEngine, prompts) -> tuple:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, PARAMS)
    store = engine.runner.swapper.store
    for _ in range(200):
        engine.step()
        if store.num_items:
            owner = next(o for o, own in store._owners.items() if own.items)
            seq = next(s for s in engine.requests.values() if s.swap_owner == owner)
            return seq, owner
    raise AssertionError("no request was swapped out: the pool is not small enough")


def test_swapped_kv_is_ciphertext_and_shredded_when_the_request_ends(model_dirs):
    engine = _swap_engine(str(model_dirs["llama"]))
    seq, owner = _until_swapped(engine, prompts_of(6, seed=3))
    store = engine.runner.swapper.store
    plain = store.get(owner, "kv").view(torch.uint8)
    wire = store.ciphertext(owner, "kv")[:plain.numel()]
    assert plain.any() and (wire == plain).float().mean() < 0.05     # the host pool holds no plaintext KV
    key = store.keys.get(owner)
    engine.abort_request(seq.request_id)
    assert not key.alive                                              # the key bytes are zeroed
    with pytest.raises(OwnerEnded):
        store.get(owner, "kv")
    while engine.has_unfinished_requests():
        engine.step()
    assert_nothing_left(engine)


def test_a_tampered_host_pool_fails_only_that_request(model_dirs):
    path = str(model_dirs["llama"])
    prompts = prompts_of(6, seed=3)
    ref = tokens(LLM(path, max_model_len=96, num_gpu_blocks=80, block_size=8), prompts)
    engine = _swap_engine(path)
    seq, owner = _until_swapped(engine, prompts)
    engine.runner.swapper.store.ciphertext(owner, "kv")[5] ^= 1
    done = _run(engine)
    assert seq.finish_reason == "error" and seq.request_id not in done
    _others_as_before(done, ref, seq.request_id)
    assert_nothing_left(engine)


def test_a_tampered_swap_out_fails_only_its_request(model_dirs):
    """A swap-out is verified when it settles (a step later): the request whose KV message was altered on its
    way to the host ends with an error, the swap channel re-keys (the step channel carries on), and every other
    request's output is untouched."""
    path = str(model_dirs["llama"])
    prompts = prompts_of(6, seed=3)
    ref = tokens(LLM(path, max_model_len=96, num_gpu_blocks=80, block_size=8), prompts)
    engine = _swap_engine(path)
    first, steps = engine.runner.swapper.channel, engine.runner.boundary.channel
    original, flipped = first.open_d2h, []

    def flip_a_swap_out(sealed):
        if not flipped and sealed.nbytes > 4096:    # a request's KV blocks (sampled tokens are a few bytes)
            sealed.wire[3] ^= 0x40
            flipped.append(True)
        return original(sealed)

    first.open_d2h = flip_a_swap_out
    seqs = []
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, PARAMS)
        seqs.append(engine.requests[f"r{i}"])
    done = _run(engine)
    failed = [s for s in seqs if s.finish_reason == "error"]
    assert flipped and len(failed) == 1 and failed[0].request_id not in done
    assert first.failed and engine.runner.swapper.channel is not first
    assert engine.runner.boundary.channel is steps and not steps.failed
    _others_as_before(done, ref, failed[0].request_id)
    assert_nothing_left(engine)


def test_a_request_ended_before_its_swap_out_settled_leaves_nothing(model_dirs):
    """Aborted while its KV is still on the way to the host: the message is opened in its turn (the channel's
    IVs stay in lock-step) and dropped, nothing is stored, the key is destroyed, the others run on."""
    path = str(model_dirs["llama"])
    prompts = prompts_of(6, seed=3)
    ref = tokens(LLM(path, max_model_len=96, num_gpu_blocks=80, block_size=8), prompts)
    engine = _swap_engine(path)
    out, seq = _until_swap_out_in_flight(engine, prompts)
    assert not engine.runner.swapper.store.num_items
    engine.abort_request(seq.request_id)
    assert not engine.runner.swapper._outgoing and out.owner not in engine.runner.swapper.store
    done = _run(engine)
    _others_as_before(done, ref, seq.request_id)
    assert not engine.runner.swapper.channel.failed
    assert_nothing_left(engine)


def test_a_tampered_swap_out_of_an_aborted_request_re_keys_and_swapping_goes_on(model_dirs):
    """The request is aborted while its altered swap-out is in flight: opening it (to keep the IVs in step) fails,
    which is swallowed since the request is gone; the swap channel re-keys and later preemptions swap as usual."""
    path = str(model_dirs["llama"])
    prompts = prompts_of(6, seed=3)
    ref = tokens(LLM(path, max_model_len=96, num_gpu_blocks=80, block_size=8), prompts)
    engine = _swap_engine(path)
    out, seq = _until_swap_out_in_flight(engine, prompts)
    swapper = engine.runner.swapper
    first = swapper.channel
    out.message.sealed.wire[3] ^= 0x40
    swaps = engine.scheduler.num_swaps
    engine.abort_request(seq.request_id)
    assert swapper.channel is not first and not swapper.channel.failed
    done = _run(engine)
    assert engine.scheduler.num_swaps > swaps        # swapping went on, on the new keys
    _others_as_before(done, ref, seq.request_id)
    assert_nothing_left(engine)


def test_cc_settings_are_validated(model_dirs):
    path = str(model_dirs["llama"])
    with pytest.raises(ValueError, match="--cc"):
        EngineConfig(model=path, cc="on")
    with pytest.raises(ValueError, match="needs the encrypted channel"):
        EngineConfig(model=path, preemption_mode="swap")
    with pytest.raises(ValueError, match="preemption_mode"):
        EngineConfig(model=path, cc="naive", preemption_mode="evict")
    assert not EngineConfig(model=path).swap_enabled                  # cc off: auto means recompute
    assert EngineConfig(model=path, cc="naive").swap_enabled


def test_aborting_a_request_sealed_ahead_relinquishes_it_and_the_rest_runs_on(model_dirs):
    """Pipelined mode seals the next swap-in ahead; aborting that request relinquishes the speculation (its IVs
    are skipped, never reused: later messages still verify) and shreds its key."""
    path = str(model_dirs["llama"])
    prompts = prompts_of(6, seed=3)
    ref = tokens(LLM(path, max_model_len=96, num_gpu_blocks=80, block_size=8), prompts)
    engine = _swap_engine(path, "pipelined")
    seq, owner = _until_swapped(engine, prompts)
    assert seq.swap_owner in engine.runner.swapper._staged          # sealed ahead as the next swap-in
    stats = engine.runner.swapper.channel.pipeline.stats
    relinquished = stats.relinquished
    engine.abort_request(seq.request_id)
    assert stats.relinquished == relinquished + 1 and owner not in engine.runner.swapper.store
    assert engine.stats().crypto.relinquished == stats.relinquished
    done = _run(engine)
    _others_as_before(done, ref, seq.request_id)
    assert not engine.runner.swapper.channel.failed
    assert_nothing_left(engine)


def test_close_zeroizes_every_channel_once_and_again(model_dirs):
    """LLM.close releases the engine's channels (steps and swap): keys zeroized, workers stopped; twice is fine."""
    llm = LLM(str(model_dirs["llama"]), max_model_len=96, num_gpu_blocks=12, block_size=8, cc="pipelined",
              preemption_mode="swap")
    tokens(llm, prompts_of(2, seed=1))
    channel = llm.engine.runner.boundary.channel
    llm.close()
    llm.close()
    with pytest.raises(ChannelClosed):
        channel.to_device(torch.zeros(16, dtype=torch.uint8))
