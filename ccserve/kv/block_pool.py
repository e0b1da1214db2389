"""The fixed set of physical KV-cache blocks: hand them out, take them back, remember what to scrub.

A block freed by any path (finished, aborted, preempted, failed) is queued for scrubbing; the model runner
zeroes the queued blocks in one batched operation before its next forward pass, so no request's keys or
values outlive it in GPU memory, and a block is never read by a new owner before it was written or zeroed.
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
        self._to_scrub: list[int] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, block_ids: list[int]) -> None:
        """Return blocks to the pool (most recently freed are reused last) and queue them for scrubbing."""
        self._free.extend(block_ids)
        self._to_scrub.extend(block_ids)

    def take_blocks_to_scrub(self) -> list[int]:
        ids, self._to_scrub = self._to_scrub, []
        return ids
