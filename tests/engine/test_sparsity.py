"""--kv-sparsity through the engine on a tiny random model: R = 1 changes nothing, a small R prunes within each
request's budget and still finishes every request (chunked prefill, decode windows, preemption), scores and flags
are scrubbed with their blocks, and bad flags are named."""
from __future__ import annotations

import pytest
import torch

from ccserve import LLM, SamplingParams
from ccserve.config import EngineConfig
from tests.tiny_models import make_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("kv-sparsity") / "llama", "llama", head_dim=32)


def prompts_of(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 500, (int(torch.randint(20, 60, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)


def test_ratio_one_equals_no_sparsity_exactly(model_dir):
    prompts = prompts_of(3, seed=1)
    full = LLM(str(model_dir), max_model_len=128, num_gpu_blocks=64).generate(prompts, PARAMS)
    dense = LLM(str(model_dir), max_model_len=128, num_gpu_blocks=64, kv_sparsity=1.0).generate(prompts, PARAMS)
    for a, b in zip(full, dense):
        assert a.token_ids == b.token_ids
        assert [x.logprob for x in a.logprobs] == [x.logprob for x in b.logprobs]


def test_small_ratio_prunes_within_budget_and_scrubs(model_dir):
    """Small chunks, decode windows and too few blocks (preemption): every request finishes; while running, each
    sequence keeps at most its budget per layer (plus sinks and window); at the end every tensor is zero."""
    llm = LLM(str(model_dir), max_model_len=128, num_gpu_blocks=24, block_size=8, max_num_batched_tokens=16,
              kv_sparsity=0.25, kv_recent_window=4, kv_sink_tokens=2)
    runner = llm.engine.runner
    seen = []
    original = runner.apply_sparsity

    def checked(meta):
        original(meta)
        nd = meta.num_decode_tokens
        for tables, lens in ((meta.decode_block_tables[:nd], meta.decode_seq_lens[:nd]),
                             (meta.prefill_block_tables, meta.prefill_seq_lens)):
            for table, n in zip(tables, lens.tolist()):
                pos = torch.arange(n)
                pruned = runner.kv_cache.sparse.pruned[:, table[pos // 8].long(), :, pos % 8]     # [n, L, Hk]
                kept = (pruned == 0).sum(dim=(0, 2))
                heads = pruned.shape[2]
                assert torch.all(kept <= max(-(-n // 4), 2 + 4) * heads)
                assert not pruned[:2].any() and not pruned[-4:].any()
                seen.append(int((pruned != 0).sum()))

    runner.apply_sparsity = checked
    shares = []
    original_step = llm.engine.step

    def step():
        outputs = original_step()
        shares.append(llm.engine.stats().kv_kept_share)     # what /metrics reports
        return outputs

    llm.engine.step = step
    outs = llm.generate(prompts_of(5, seed=3), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert all(0 < s <= 1 for s in shares) and min(shares) < 0.6       # long sequences keep about R = 0.25
    assert all(len(o.token_ids) == 30 for o in outs)
    assert max(seen) > 0
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    for t in runner.kv_cache.tensors:
        assert t.abs().sum() == 0


@pytest.mark.parametrize("importance", ["accumulated", "window"])
def test_tensor_parallel_prunes_what_one_process_prunes(model_dir, importance):
    """TP=2 (rank 1 in a worker, gloo): each rank scores its KV heads, the layer's budget is still shared over all
    heads (the step's scores and flags are all-gathered), so the tokens and logprobs are one process's."""
    prompts = prompts_of(3, seed=5)
    settings = dict(max_model_len=128, num_gpu_blocks=64, kv_sparsity=0.3, kv_recent_window=4, kv_sink_tokens=2,
                    kv_importance=importance, device="cpu")
    want = LLM(str(model_dir), **settings).generate(prompts, PARAMS)
    llm = LLM(str(model_dir), tensor_parallel_size=2, **settings)
    try:
        got = llm.generate(prompts, PARAMS)
    finally:
        llm.close()
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids
        assert [x.logprob for x in a.logprobs] == pytest.approx([x.logprob for x in b.logprobs], abs=1e-4)


@pytest.mark.parametrize("field,value,flag", [
    ("kv_sparsity", 0.0, "--kv-sparsity"), ("kv_sparsity", 1.5, "--kv-sparsity"),
    ("kv_sparsity", -0.1, "--kv-sparsity"),
    ("kv_recent_window", 0, "--kv-recent-window"), ("kv_sink_tokens", -1, "--kv-sink-tokens"),
    ("kv_importance", "h2o", "--kv-importance"),
])
def test_bad_flags_are_named(model_dir, field, value, flag):
    with pytest.raises(ValueError, match=flag):
        EngineConfig(model=str(model_dir), **{field: value})


def test_replicated_heads_and_shared_prefixes_are_refused(model_dir, tmp_path):
    mqa = make_tiny_model_dir(tmp_path / "mqa", "llama", num_key_value_heads=1)   # TP=2 replicates its one head
    with pytest.raises(ValueError, match="--kv-sparsity shares each layer's budget over its KV heads"):
        LLM(str(mqa), kv_sparsity=0.5, tensor_parallel_size=2, device="cpu")
    with pytest.raises(ValueError, match="prefix blocks are shared"):
        EngineConfig(model=str(model_dir), kv_sparsity=0.5, public_prefixes=["You are a helpful assistant."])
