"""Every supported family against HF transformers on the same tiny checkpoint: batched prefill, chunked prefill
mixed with batched decodes, and greedy generation, all through the paged KV cache."""
from __future__ import annotations

import pytest
import torch
import transformers

from tests.tiny_models import hf_logits

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "opt"]
ATOL = 1e-4


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 512, (n,), generator=gen).tolist() for n in lengths]


def _assert_prefill_matches(runner, hf, lengths=(5, 17, 30)) -> None:
    prompts = _prompts(list(lengths))
    ours = runner.step([], list(enumerate(prompts)))
    for prompt, logits in zip(prompts, ours):
        torch.testing.assert_close(logits, hf_logits(hf, prompt), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_prefill_matches_hf(load_pair, family):
    _assert_prefill_matches(*load_pair(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_batched_decode_match_hf(load_pair, family):
    runner, hf = load_pair(family)
    a, b, c = _prompts([20, 9, 6], seed=1)
    history: dict[int, list[int]] = {}

    def check(items, ours):
        """Each item's logits equal HF's last rows over the sequence so far, this step's tokens included."""
        for (seq, tokens), logits in zip(items, ours):
            history[seq] = history.get(seq, []) + tokens
            torch.testing.assert_close(logits, hf_logits(hf, history[seq])[-len(tokens):], atol=ATOL, rtol=0)

    check([(0, a[:12]), (1, b)], runner.step([], [(0, a[:12]), (1, b)]))
    # Decode of b beside the second chunk of a and a new prompt c: the mixed batch the scheduler builds.
    items = [(1, [7]), (0, a[12:]), (2, c)]
    check(items, runner.step([(1, 7)], items[1:]))
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        next_tokens = torch.randint(4, 512, (3,), generator=gen).tolist()
        items = [(seq, [tok]) for seq, tok in enumerate(next_tokens)]
        check(items, runner.step(list(enumerate(next_tokens)), []))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_hf_generate(load_pair, family):
    runner, hf = load_pair(family)
    prompts = _prompts([3, 11, 24], seed=3)
    ours = runner.generate(prompts, max_new_tokens=32)
    greedy = transformers.GenerationConfig(do_sample=False, max_new_tokens=32, eos_token_id=None, pad_token_id=1)
    for prompt, tokens in zip(prompts, ours):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([prompt]), generation_config=greedy)[0, len(prompt):].tolist()
        assert tokens == ref


@pytest.mark.parametrize("family,overrides", [
    ("llama", dict(tie_word_embeddings=True)),
    ("qwen2", dict(tie_word_embeddings=True)),  # Qwen2.5-0.5B / 1.5B / 3B
    ("qwen3", dict(tie_word_embeddings=True)),  # Qwen3-0.6B ... 4B
    ("llama", dict(num_key_value_heads=1)),  # MQA
    ("llama", dict(num_key_value_heads=4)),  # plain MHA
    ("llama", dict(attention_bias=True, mlp_bias=True)),
    ("qwen3", dict(attention_bias=True)),
    ("mistral", dict(head_dim=32)),  # Mistral-Nemo style head_dim != hidden / heads
    ("mistral", dict(sliding_window=4096)),  # a window longer than any sequence never slides
    ("llama", dict(rope_theta=500000.0)),
    ("llama", dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=64))),
    ("llama", dict(rope_scaling=dict(rope_type="linear", factor=4.0))),
    ("llama", dict(rope_scaling=dict(rope_type="dynamic", factor=2.0))),
    ("qwen2", dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32))),
    ("qwen3", dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32))),
    ("opt", dict(do_layer_norm_before=False, word_embed_proj_dim=32)),  # OPT-350m layout
    ("opt", dict(enable_bias=False)),
    ("opt", dict(tie_word_embeddings=False)),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={v}" for k, v in v.items())[:60])
def test_config_variants_match_hf(load_pair, family, overrides):
    _assert_prefill_matches(*load_pair(family, **overrides), lengths=(7, 60))


def test_tied_embeddings_share_one_tensor(load_pair):
    runner, _ = load_pair("llama", tie_word_embeddings=True)
    assert runner.model.lm_head.weight is runner.model.model.embed_tokens.weight
