"""The public prefix cache: KV blocks of operator-declared public prefixes (system prompts), computed once at start.

Why only declared prefixes: a cache filled from requests lets one request's KV outlive it and lets another infer
it from timing (the stateless rule, S). The prefixes here come from the node's configuration, which is measured
with the release (attest/measure.py), so they carry no user data and every client can see which ones a node
serves. Nothing about a request is ever added.

The index maps whole blocks of token ids, chained from the start of the sequence, to the block that holds their
keys and values: a prompt reuses a block only when every token up to the end of that block equals a declared
prefix's, token for token. A partial last block is never shared: the request computes it into its own block.
The cache holds its blocks (one reference in the block pool each) for the process lifetime; requests take extra
references, so the blocks are never freed, scrubbed or handed to anyone to write.
"""
from __future__ import annotations


class PublicPrefixCache:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._index: dict[tuple[int, tuple[int, ...]], int] = {}   # (previous block or -1, tokens) -> block
        self.block_ids: list[int] = []                              # every declared block, in insertion order

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    def lookup(self, token_ids: list[int]) -> list[int]:
        """The blocks holding the longest run of whole declared blocks that token_ids starts with."""
        found: list[int] = []
        parent = -1
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            block = self._index.get((parent, tuple(token_ids[start:start + self.block_size])))
            if block is None:
                break
            found.append(block)
            parent = block
        return found

    def match(self, prompt_token_ids: list[int]) -> list[int]:
        """The shared blocks a prompt may start from: whole declared blocks only, and never its last token,
        which the request must compute itself to sample its first output token."""
        return self.lookup(prompt_token_ids[:-1])

    def insert(self, token_ids: list[int], block_ids: list[int]) -> None:
        """Declare that block_ids hold the keys and values of token_ids' whole blocks (the caller computed them
        and hands over its hold on them)."""
        parent = -1
        for i, block in enumerate(block_ids):
            key = (parent, tuple(token_ids[i * self.block_size:(i + 1) * self.block_size]))
            if len(key[1]) != self.block_size:
                raise ValueError("only whole blocks of a public prefix are cached")
            known = self._index.get(key)
            if known is None:
                self._index[key] = block
                self.block_ids.append(block)
            elif known != block:
                raise ValueError("a public prefix block is already cached elsewhere: extend lookup()'s blocks")
            parent = block
