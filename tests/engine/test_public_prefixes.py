"""The public prefix cache end to end on tiny models (CPU, float32): declared prefixes give the same greedy tokens
as no cache while their prefill is skipped; their blocks are never written, freed or scrubbed by requests (finish,
abort, recompute and swap preemption); only whole declared blocks are reused; per-request prefix caching is refused."""
from __future__ import annotations

import pytest
import torch

from ccserve import LLM, SamplingParams
from ccserve.config import EngineConfig
from ccserve.engine.llm_engine import LLMEngine
from ccserve.privacy.policy import PolicyViolation, enforce
from tests.tiny_models import make_tiny_model_dir

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PREFIX = list(range(7, 44))       # 37 tokens: 4 whole blocks of 8 and a partial one


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-models")
    return {f: make_tiny_model_dir(root / f, f) for f in ("llama", "opt")}


def prompts() -> list[list[int]]:
    """Prompts that extend the prefix, equal it, stop inside it, end on a block boundary of it, share only its
    first partial block, and do not start with it at all."""
    return [PREFIX + [300, 301, 302], PREFIX + list(range(100, 140)), PREFIX, PREFIX[:20] + [400] * 9,
            PREFIX[:16], PREFIX[:5] + [9, 9, 9], [401, 402, 403] + PREFIX]


def counting(llm: LLM) -> list[int]:
    """Wrap the runner so every prefill and decode token it computes is counted (returned list, one total)."""
    count = [0]
    runner = llm.engine.runner
    execute, execute_decodes = runner.execute, runner.execute_decodes

    def counted(batch):
        count[0] += batch.num_tokens
        return execute(batch)

    def counted_decodes(seqs, steps, after=None):
        count[0] += len(seqs) * steps
        return execute_decodes(seqs, steps, after)

    runner.execute, runner.execute_decodes = counted, counted_decodes
    return count


def prefix_snapshot(engine: LLMEngine) -> list[torch.Tensor]:
    blocks = engine.prefix_cache.block_ids
    return [t[:, blocks].clone() for t in engine.runner.kv_cache.tensors]


def assert_only_prefix_left(engine: LLMEngine, snapshot: list[torch.Tensor]) -> None:
    """After every request ended: the declared blocks are held and intact, every other block is free and zero."""
    assert not engine.requests and not engine.has_unfinished_requests()
    blocks = engine.prefix_cache.block_ids
    assert engine.pool.num_free == engine.pool.num_blocks - len(blocks)
    assert engine.stats().num_public_prefix_blocks == len(blocks)
    others = [b for b in range(engine.pool.num_blocks) if b not in blocks]
    for t, before in zip(engine.runner.kv_cache.tensors, snapshot):
        assert torch.equal(t[:, blocks], before), "a request wrote into a public prefix block"
        assert not t[:, others].view(torch.uint8).any(), "a freed block was not scrubbed"


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_same_greedy_tokens_with_less_prefill(model_dirs, family):
    path = str(model_dirs[family])
    plain = LLM(path, max_model_len=128, num_gpu_blocks=64, block_size=8)
    cached = LLM(path, max_model_len=128, num_gpu_blocks=64, block_size=8, public_prefixes=[PREFIX])
    assert cached.engine.prefix_cache.num_blocks == 4
    snapshot = prefix_snapshot(cached.engine)
    assert all(t.view(torch.uint8).any() for t in snapshot)
    plain_count, cached_count = counting(plain), counting(cached)
    expected = [o.token_ids for o in plain.generate(prompts(), GREEDY)]
    assert [o.token_ids for o in cached.generate(prompts(), GREEDY)] == expected
    # Reused: 4 blocks for the two that extend it, 4 (not the last token's) for PREFIX itself, 2 for PREFIX[:20]
    # and 1 for PREFIX[:16] (its second block holds its last token); nothing for the partial or foreign starts.
    saved = 8 * (4 + 4 + 4 + 2 + 1)
    stats = cached.engine.stats()
    assert stats.prefix_cache_hits == 5 and stats.prefix_cache_tokens_saved == saved
    assert cached_count[0] == plain_count[0] - saved
    assert_only_prefix_left(cached.engine, snapshot)


def test_text_prefixes_and_prefixes_sharing_blocks(model_dirs):
    """Text is tokenized as a text prompt is; a second prefix that starts like the first reuses its blocks."""
    path = str(model_dirs["llama"])
    text = "You are a careful assistant. Answer briefly and cite sources where you can."
    longer = PREFIX + list(range(200, 220))
    llm = LLM(path, max_model_len=128, num_gpu_blocks=64, block_size=8, public_prefixes=[text, PREFIX, longer])
    ids = llm.tokenizer.encode(text, add_special_tokens=True)
    assert llm.engine.prefix_cache.num_blocks == len(ids) // 8 + 4 + 3
    plain = LLM(path, max_model_len=128, num_gpu_blocks=64, block_size=8)
    asks = [text + " What is 2+2?", longer + [5, 6]]
    assert [o.token_ids for o in llm.generate(asks, GREEDY)] == [o.token_ids for o in plain.generate(asks, GREEDY)]
    assert llm.engine.stats().prefix_cache_tokens_saved == 8 * (len(ids) // 8 + 7)


def test_prefix_blocks_survive_aborts_and_recompute_preemption(model_dirs):
    path = str(model_dirs["llama"])
    many = [PREFIX + [300 + i] * (5 + 3 * i) for i in range(6)]
    alone = LLM(path, max_model_len=96, num_gpu_blocks=64, block_size=8)
    expected = [o.token_ids for o in alone.generate(many, GREEDY)]
    engine = LLMEngine(EngineConfig(model=path, max_model_len=96, num_gpu_blocks=20, block_size=8,
                                    public_prefixes=[PREFIX]))
    snapshot = prefix_snapshot(engine)
    for i, p in enumerate(many):
        engine.add_request(str(i), p, GREEDY)
    engine.add_request("gone", PREFIX + [7, 7], GREEDY)
    engine.step()
    engine.abort_request("gone")
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert [done[str(i)] for i in range(6)] == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.stats().prefix_cache_hits > 7      # preempted requests matched the prefix again
    assert_only_prefix_left(engine, snapshot)


def test_swap_preemption_keeps_prefix_blocks_on_the_gpu(model_dirs):
    """Under --cc with swap, a victim's own blocks move to the host and back; the shared ones never leave."""
    path = str(model_dirs["llama"])
    many = [PREFIX + [300 + i] * (5 + 3 * i) for i in range(6)]
    unpressured = LLM(path, max_model_len=96, num_gpu_blocks=64, block_size=8)
    expected = [o.token_ids for o in unpressured.generate(many, GREEDY)]
    llm = LLM(path, max_model_len=96, num_gpu_blocks=20, block_size=8, cc="naive", preemption_mode="swap",
              public_prefixes=[PREFIX])
    snapshot = prefix_snapshot(llm.engine)
    assert [o.token_ids for o in llm.generate(many, GREEDY)] == expected
    assert llm.engine.scheduler.num_swaps > 0
    assert len(llm.engine.runner.swapper.store) == 0
    assert_only_prefix_left(llm.engine, snapshot)


def test_only_exact_token_ids_from_the_first_token_match(model_dirs):
    """Only exact token ids from the prompt's first token match: a shifted prefix reuses nothing."""
    engine = LLMEngine(EngineConfig(model=str(model_dirs["llama"]), max_model_len=96, num_gpu_blocks=32,
                                    block_size=8, public_prefixes=[PREFIX]))
    engine.add_request("shifted", [1] + PREFIX, GREEDY)
    engine.add_request("changed", PREFIX[:31] + [2] + PREFIX[32:], GREEDY)
    assert engine.requests["shifted"].shared_block_ids == []
    assert len(engine.requests["changed"].shared_block_ids) == 3


def test_bad_prefix_settings_are_named(model_dirs):
    path = str(model_dirs["llama"])
    with pytest.raises(ValueError, match="public_prefixes"):
        EngineConfig(model=path, public_prefixes=[[1, -2]])
    with pytest.raises(ValueError, match="public_prefixes"):
        EngineConfig(model=path, public_prefixes=[""])
    with pytest.raises(ValueError, match="kv-sparsity"):
        EngineConfig(model=path, public_prefixes=[PREFIX], kv_sparsity=0.5)
    with pytest.raises(ValueError, match="more KV blocks"):
        LLMEngine(EngineConfig(model=path, max_model_len=16, num_gpu_blocks=3, block_size=8, public_prefixes=[PREFIX]))
    with pytest.raises(ValueError, match="max_model_len"):
        LLMEngine(EngineConfig(model=path, max_model_len=64, num_gpu_blocks=10, block_size=8, public_prefixes=[PREFIX]))


def test_per_request_prefix_caching_is_refused(model_dirs):
    path = str(model_dirs["llama"])
    enforce(EngineConfig(model=path, public_prefixes=[PREFIX]))      # declared public prefixes: allowed under pcc
    with pytest.raises(PolicyViolation, match=r"refuses prefix caching .*stateless computation \(S\).*--public-prefix"):
        enforce(EngineConfig(model=path, enable_prefix_caching=True))
    enforce(EngineConfig(model=path, enable_prefix_caching=True, privacy="open"))
    with pytest.raises(ValueError, match="not built yet"):
        LLMEngine(EngineConfig(model=path, max_model_len=64, num_gpu_blocks=16, enable_prefix_caching=True,
                               privacy="open"))


def test_requests_through_a_lora_adapter_compute_the_prefix_themselves(model_dirs, tmp_path):
    """The prefix's blocks hold the base model's keys and values: an adapter's request must not reuse them."""
    from tests.lora.adapters import make_adapter

    path = model_dirs["llama"]
    adapter = str(make_adapter(path, tmp_path / "adapter", seed=5))
    asks = [PREFIX + [300, 301], PREFIX + [302]]
    plain = LLM(str(path), max_model_len=96, num_gpu_blocks=32, block_size=8, lora_adapters={"x": adapter})
    cached = LLM(str(path), max_model_len=96, num_gpu_blocks=32, block_size=8, lora_adapters={"x": adapter},
                 public_prefixes=[PREFIX])
    for lora in ("x", None):
        got = [o.token_ids for o in cached.generate(asks, GREEDY, lora=lora)]
        assert got == [o.token_ids for o in plain.generate(asks, GREEDY, lora=lora)], lora
    assert cached.engine.stats().prefix_cache_hits == 2       # the two base-model requests only


def test_tensor_parallel_ranks_compute_and_share_the_prefix(model_dirs):
    """Every rank computes its slice of the prefix blocks at start (the warm-up steps reach the workers too)."""
    import multiprocessing

    path = str(model_dirs["llama"])
    asks = [PREFIX + [300, 301], PREFIX[:30]]
    want = [o.token_ids for o in LLM(path, max_model_len=96, num_gpu_blocks=32, block_size=8).generate(asks, GREEDY)]
    llm = LLM(path, device="cpu", max_model_len=96, num_gpu_blocks=32, block_size=8, tensor_parallel_size=2,
              public_prefixes=[PREFIX])
    try:
        assert [o.token_ids for o in llm.generate(asks, GREEDY)] == want
        assert llm.engine.stats().prefix_cache_hits == 2
    finally:
        llm.close()
    assert multiprocessing.active_children() == []
