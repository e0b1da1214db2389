"""Encrypted KV swap: a preempted request's KV blocks leave the GPU through the channel and rest on the host as
ciphertext under that request's own key, until the scheduler brings the request back or it ends.

Why per-request keys (secure/host_store.py): when a request ends its key is zeroized, so any copy of its swapped
KV left in host memory (or a later disk spill) is noise: crypto-shredding, the stateless rule. Why one message:
all of a request's blocks (keys and values of every layer, with the scales and zero points of a quantized
--kv-format, still compressed) are gathered on the device into one flat tensor, so a swap is one sealed
transfer each way. Owners are numbered here; nothing of the request (id, content) reaches secure/.

In pipelined mode the engine tells the swapper which swapped requests the scheduler will bring back next
(`prefetch`, in the scheduler's order); the swapper opens their ciphertext from the host store into private
staging memory and hints the channel's FIFO predictor, so their H2D message is sealed ahead on worker threads.
A prefetched request that ends instead is forgotten: the channel relinquishes its speculation (skipping its IVs,
never reusing one).
"""
from __future__ import annotations

import itertools

import torch

from ccserve.engine.boundary import Boundary
from ccserve.engine.sequence import Sequence
from ccserve.kv.cache import KVCache
from ccserve.secure import Forget, HostStore, SwapOut, WorkerPool

ITEM = "kv"


class KVSwapper:
    def __init__(self, boundary: Boundary, cache: KVCache, threads: int) -> None:
        self.boundary, self.cache = boundary, cache
        self.store = HostStore(WorkerPool(threads))
        self._owner: dict[int, int] = {}            # id(seq) -> owner number in the host store
        self._staged: dict[int, torch.Tensor] = {}  # id(seq) -> plaintext opened ahead (pipelined prefetch)
        self._numbers = itertools.count()
        self.swapped_out_bytes = 0
        self.swapped_in_bytes = 0

    def swap_out(self, seq: Sequence, block_ids: list[int]) -> None:
        """Move the blocks' contents to the host store (the caller frees and scrubs the blocks afterwards)."""
        owner = self._owner.get(id(seq))
        if owner is None:
            owner = self._owner[id(seq)] = next(self._numbers)
            self.store.open(owner)
        channel = self.boundary.channel
        plain = channel.open_d2h(channel.seal_d2h(self.cache.gather(block_ids)))
        self.store.put(owner, ITEM, plain)
        plain.zero_()                                # the plaintext lived only between two decryptions
        self.swapped_out_bytes += plain.nbytes

    def prefetch(self, seqs: list[Sequence]) -> None:
        """These swapped requests come back next, in this order: seal them ahead (pipelined mode only)."""
        channel = self.boundary.channel
        if channel.pipeline is None:
            return
        for seq in seqs:
            if id(seq) in self._staged:
                continue
            owner = self._owner[id(seq)]
            plain = self.store.get(owner, ITEM)
            self._staged[id(seq)] = plain
            channel.register(plain, key=(ITEM, owner))
            channel.hint(SwapOut((ITEM, owner)))

    def swap_in(self, seq: Sequence, block_ids: list[int]) -> None:
        """Bring the request's blocks back into `block_ids` and drop its host copy (its key stays until it ends:
        it may be swapped out again)."""
        owner = self._owner[id(seq)]
        plain = self._staged.pop(id(seq), None)
        if plain is None:
            plain = self.store.get(owner, ITEM)
        try:
            data = self.boundary.channel.to_device(plain, key=(ITEM, owner))
            self.cache.scatter(block_ids, data)
        finally:
            plain.zero_()
        self.store.discard(owner, ITEM)
        self.swapped_in_bytes += plain.nbytes

    def end(self, seq: Sequence) -> None:
        """The request ended (finished, aborted, failed): forget any speculation and destroy its key."""
        owner = self._owner.pop(id(seq), None)
        if owner is None:
            return
        plain = self._staged.pop(id(seq), None)
        if plain is not None:
            if self.boundary.channel is not None and not self.boundary.channel.failed:
                self.boundary.channel.hint(Forget((ITEM, owner)))
            plain.zero_()
        self.store.end(owner)

    def close(self) -> None:
        self.store.pool.close()
