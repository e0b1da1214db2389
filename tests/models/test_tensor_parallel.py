"""Tensor parallelism, for real: two processes on gloo each load their share of a tiny checkpoint, and the
logits and greedy tokens they compute together equal those of the whole model in one process (fp32).

One spawn runs every case (starting processes is the slow part); each rank saves what it computed and the tests
below compare it with the single-process model. The cases cover what sharding can get wrong: GQA with the KV
heads split (the defaults: 4 query heads, 2 KV heads), KV heads replicated (MQA), biases of row-parallel layers
(added once, not once per rank), tied and untied LM heads, a vocabulary the ranks do not divide (padding), and
OPT's variants.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ccserve.config import EngineConfig
from ccserve.distributed.group import destroy_tensor_parallel, init_tensor_parallel
from ccserve.distributed.launch import spawn
from ccserve.models.loader import check_tensor_parallel, load_model, read_hf_config
from tests.tiny_models import PagedRunner

CASES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "opt": ("opt", {}),
    "llama-mqa": ("llama", dict(num_key_value_heads=1)),             # 1 KV head replicated on both ranks
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True)),  # o_proj / down_proj biases
    "llama-odd-vocab": ("llama", dict(vocab_size=509)),              # rank 1: 254 rows + 1 of padding
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "opt-350m": ("opt", dict(do_layer_norm_before=False, word_embed_proj_dim=32)),
    "opt-untied": ("opt", dict(tie_word_embeddings=False)),
}
PROMPT_LENGTHS = (5, 13, 2, 12)  # the last one is prefilled in two chunks beside decodes
NEW_TOKENS = 4
ATOL = 1e-5


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(4, 500, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def run_greedy(model) -> dict:
    """Prefill all prompts in one step, then decode NEW_TOKENS greedy steps together, the first two beside the
    chunks of a chunked prefill (the mixed batches the scheduler builds): every step's logits (all prefill
    positions, then each decode row) and the tokens chosen."""
    runner = PagedRunner(model)
    *prompts, chunked = _prompts()
    prefill = runner.step([], list(enumerate(prompts)))
    steps = [torch.cat(prefill)]
    tokens = [[int(x[-1].argmax())] for x in prefill]
    for i in range(NEW_TOKENS - 1):
        chunk = [(len(prompts), chunked[6 * i:6 * i + 6])] if i < 2 else []
        out = runner.step([(s, t[-1]) for s, t in enumerate(tokens)], chunk)
        steps.append(torch.cat(out))
        for t, x in zip(tokens, out):
            t.append(int(x[-1].argmax()))
    kv_heads = [layer.num_kv_heads for layer in model.attention_layers()]
    return dict(logits=steps, tokens=tokens, kv_heads=kv_heads)


def _tp_worker(rank: int, size: int, init_method: str, paths: dict[str, str], out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks share the test machine's cores
    tp = init_tensor_parallel(rank, size, init_method, torch.device("cpu"))
    try:
        results = {}
        for name, path in paths.items():
            model, _ = load_model(EngineConfig(model=path, device="cpu"), tp)
            results[name] = run_greedy(model)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        destroy_tensor_parallel(tp)


@pytest.fixture(scope="module")
def tp2_results(tiny_model_dir, tmp_path_factory) -> tuple[dict[str, Path], list[dict]]:
    paths = {name: tiny_model_dir(family, **overrides) for name, (family, overrides) in CASES.items()}
    out = tmp_path_factory.mktemp("tp2")
    spawn(_tp_worker, 2, {k: str(p) for k, p in paths.items()}, str(out))
    return paths, [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_logits_and_greedy_tokens_equal_tp1(tp2_results, case):
    paths, ranks = tp2_results
    model, hf_config = load_model(EngineConfig(model=str(paths[case]), device="cpu"))
    ref = run_greedy(model)
    for rank, results in enumerate(ranks):
        got = results[case]
        assert len(got["logits"]) == len(ref["logits"])
        for step, (ours, want) in enumerate(zip(got["logits"], ref["logits"])):
            assert ours.shape == want.shape == (want.shape[0], hf_config.vocab_size)
            torch.testing.assert_close(ours, want, atol=ATOL, rtol=0, msg=lambda m: f"rank {rank} step {step}: {m}")
        assert got["tokens"] == ref["tokens"]


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_kv_cache_holds_this_ranks_kv_heads(tp2_results, case):
    """Each rank caches half the KV heads, or the one KV head it shares when there are fewer than ranks."""
    paths, ranks = tp2_results
    cfg = read_hf_config(str(paths[case]))
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    for results in ranks:
        assert results[case]["kv_heads"] == [max(1, kv // 2)] * cfg.num_hidden_layers


@pytest.mark.parametrize("size,overrides,match", [
    (4, dict(num_attention_heads=6, num_key_value_heads=6), "does not divide the attention heads"),
    (4, dict(num_attention_heads=12, num_key_value_heads=6), "does not divide the key/value heads"),
    (4, dict(num_attention_heads=12, num_key_value_heads=3), "not a multiple of it"),
    (2, dict(intermediate_size=101), "does not divide the MLP's intermediate_size"),
])
def test_indivisible_shapes_are_refused_before_loading(tiny_model_dir, size, overrides, match):
    cfg = read_hf_config(str(tiny_model_dir("llama")))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    with pytest.raises(ValueError, match=match + r".*choose a size"):
        check_tensor_parallel(cfg, size)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_size_one_runs_no_collective(tiny_model_dir, monkeypatch, family):
    """A single-GPU server runs exactly the code it ran before tensor parallelism: no collective is called
    (here they would fail: no process group exists in this process)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a collective ran at tensor-parallel size 1")

    monkeypatch.setattr(torch.distributed, "all_reduce", refuse)
    monkeypatch.setattr(torch.distributed, "all_gather", refuse)
    path = tiny_model_dir(family, tie_word_embeddings=False)
    model, _ = load_model(EngineConfig(model=str(path), device="cpu"))
    assert len(run_greedy(model)["tokens"]) == len(PROMPT_LENGTHS) - 1


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_a_rank_reads_only_its_slice_of_split_tensors(tiny_model_dir, monkeypatch, family):
    """Rank 1 of 2 (no collective runs while loading, so no process group is needed here) reads whole only the
    tensors it keeps whole; that its slices are the right ones, the TP=2 logits above show."""
    from ccserve.distributed.group import TensorParallelGroup
    from ccserve.models.loader import CheckpointTensor

    read_whole = []
    read = CheckpointTensor.read
    monkeypatch.setattr(CheckpointTensor, "read", lambda self: read_whole.append(self.name) or read(self))
    config = EngineConfig(model=str(tiny_model_dir(family, tie_word_embeddings=False)), device="cpu")
    whole, _ = load_model(config)
    ours, _ = load_model(config, TensorParallelGroup(rank=1, size=2, group=object()))
    full = dict(whole.named_parameters())
    for name, param in ours.named_parameters():
        if param.shape == full[name].shape:
            assert torch.equal(param, full[name]), name
        else:
            assert param.numel() * 2 == full[name].numel(), name
    assert read_whole and not [n for n in read_whole if n.endswith(("proj.weight", "fc1.weight", "fc2.weight"))]
