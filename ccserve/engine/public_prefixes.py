"""Compute the KV blocks of the operator-declared public prefixes once, at start (kv/prefix_cache.py says why).

A prefix is tokenized exactly as the requests it is meant for are, so that they start with the same token ids:
- text: as a text prompt (/v1/completions, `generate`): `tokenizer.encode(text, add_special_tokens=True)`;
- `{"system": text}`: as a chat (/v1/chat/completions) that opens with that system message: the chat template's
  rendering of that one message, encoded without special tokens, as the server encodes a rendered chat;
- a list of token ids: as is.
Only its whole blocks are computed and kept; each runs through the model runner as prefill chunks of a sequence
that never samples, so nothing but the prefix's own tokens enters those blocks.
"""
from __future__ import annotations

from ccserve.engine.model_runner import ModelRunner
from ccserve.engine.scheduler import ScheduledBatch
from ccserve.engine.sequence import Sequence
from ccserve.kv.block_pool import BlockPool
from ccserve.kv.prefix_cache import PublicPrefixCache
from ccserve.sampling_params import SamplingParams


def prefix_token_ids(prefix: str | dict[str, str] | list[int], tokenizer) -> list[int]:
    """A declared prefix as token ids (text needs the model's tokenizer, a system message its chat template)."""
    if isinstance(prefix, list):
        return list(prefix)
    if tokenizer is None:
        raise ValueError("public prefixes given as text need a tokenizer; this model has none: declare token ids")
    if isinstance(prefix, str):
        return tokenizer.encode(prefix, add_special_tokens=True)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("a public prefix {\"system\": ...} needs a chat template; this model's tokenizer has none")
    text = tokenizer.apply_chat_template([{"role": "system", "content": prefix["system"]}], tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def build_prefix_cache(prefixes: list[str | dict[str, str] | list[int]], tokenizer, runner: ModelRunner,
                       pool: BlockPool, block_size: int, chunk_tokens: int) -> PublicPrefixCache:
    """Compute every declared prefix's whole blocks (those already cached by an earlier prefix are reused) and
    hand them to a new cache, which holds them for the process lifetime."""
    cache = PublicPrefixCache(block_size)
    for prefix in prefixes:
        ids = prefix_token_ids(prefix, tokenizer)
        whole = ids[:len(ids) // block_size * block_size]
        cached = cache.lookup(whole)
        if len(cached) * block_size == len(whole):
            continue
        if len(whole) // block_size - len(cached) > pool.num_free:
            raise ValueError(f"the public prefixes need more KV blocks than the cache has ({pool.num_blocks}): "
                             "declare fewer or shorter prefixes, or give the KV cache more memory")
        block_ids = cached + pool.allocate(len(whole) // block_size - len(cached))
        _compute(runner, whole, block_ids, len(cached) * block_size, chunk_tokens)
        cache.insert(whole, block_ids)
    return cache


def _compute(runner: ModelRunner, token_ids: list[int], block_ids: list[int], start: int, chunk_tokens: int) -> None:
    """Prefill token_ids[start:] into block_ids. The sequence carries one extra token that is never computed, so
    no chunk completes it and nothing is sampled."""
    seq = Sequence("public-prefix", token_ids + [0], SamplingParams(max_tokens=1, detokenize=False))
    seq.block_ids = block_ids
    seq.num_computed_tokens = start
    while seq.num_computed_tokens < len(token_ids):
        n = min(chunk_tokens, len(token_ids) - seq.num_computed_tokens)
        runner.execute(ScheduledBatch(prefills=[(seq, n)]))
        seq.num_computed_tokens += n
