"""The fixed set of physical KV-cache blocks: hand them out, take them back, remember what to scrub.

A block freed by any path (finished, aborted, preempted, failed) is queued for scrubbing; the model runner
zeroes the queued blocks in one batched operation before its next forward pass, so no request's keys or
values outlive it in GPU memory, and a block is never read by a new owner before it was written or zeroed.

Blocks are reference-counted so that the blocks of operator-declared public prefixes (kv/prefix_cache.py) can be
held by the prefix cache for the process lifetime and shared by the requests that start with them: a block goes
back to the pool, and is scrubbed, only when its last holder lets go, so a shared block is never freed or zeroed
while it is declared.
"""
from __future__ import annotations

from collections import deque


class OutOfBlocks(RuntimeError):
    """Raised when more blocks are asked for than are free (the scheduler checks first)."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs: list[int] = [0] * num_blocks
        self._to_scrub: list[int] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} KV blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        for b in ids:
            self._refs[b] = 1
        return ids

    def share(self, block_ids: list[int]) -> list[int]:
        """One more holder of blocks someone already holds (a request reusing public prefix blocks)."""
        for b in block_ids:
            if self._refs[b] == 0:
                raise ValueError(f"KV block {b} is free: only held blocks can be shared")
        for b in block_ids:
            self._refs[b] += 1
        return list(block_ids)

    def free(self, block_ids: list[int]) -> None:
        """Drop one hold on each block; a block nobody holds any more returns to the pool (most recently freed
        are reused last) and is queued for scrubbing."""
        for b in block_ids:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)
                self._to_scrub.append(b)

    def take_blocks_to_scrub(self) -> list[int]:
        ids, self._to_scrub = self._to_scrub, []
        return ids
