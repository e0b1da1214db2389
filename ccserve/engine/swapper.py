"""Encrypted KV swap: a preempted request's KV blocks leave the GPU through the channel and rest on the host as
ciphertext under that request's own key, until the scheduler brings the request back or it ends.

Why per-request keys (secure/host_store.py): when a request ends its key is zeroized, so any copy of its swapped
KV left in host memory (or a later disk spill) is noise: crypto-shredding, the stateless rule. Why a channel of its
own (keys, IV lanes, CUDA streams): swap traffic is bulk and must not queue in front of a step's sampled tokens, and
a swap message that fails authentication re-keys this channel only, ending just the requests whose KV was in it,
never the step in flight. Why one message:
all of a request's blocks (keys and values of every layer, with the scales and zero points of a quantized
--kv-format, still compressed) are gathered on the device into one flat tensor, so a swap is one sealed
transfer each way. Requests are owner numbers the engine gives; nothing of the request (id, content) reaches
secure/. Under tensor parallelism every rank runs a swapper for its slice of the blocks, driven by rank 0 with the
same owner numbers (engine/model_runner.py).

A swap-out does not wait for the GPU: the blocks are gathered into one tensor on the compute stream (so the
caller may scrub and reuse them at once), sealed on the channel's D2H stream, and copied to pinned memory while
the following steps compute. The engine calls `settle` every step: messages that have arrived are verified,
decrypted and stored under the request's key, in the channel's order. A swap-in (or the end) of a request whose
swap-out has not settled yet waits for it.

In pipelined mode the engine tells the swapper which swapped requests the scheduler will bring back next
(`prefetch`, in the scheduler's order); the swapper opens their ciphertext from the host store into private
staging memory and hints the channel's FIFO predictor, so their H2D message is sealed ahead on worker threads.
A prefetched request that ends instead is forgotten: the channel relinquishes its speculation (skipping its IVs,
never reusing one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ccserve.kv.cache import KVCache
from ccserve.secure import (
    Channel,
    ChannelClosed,
    FifoPredictor,
    Forget,
    HostStore,
    IntegrityError,
    PendingHost,
    SwapOut,
    WorkerPool,
)
from ccserve.secure.rekeying import RekeyingChannel
from ccserve.secure.totals import CryptoTotals

ITEM = "kv"


@dataclass
class Outgoing:
    """A swap-out on its way to the host store."""

    owner: int
    message: PendingHost


class KVSwapper:
    """One rank's swapper. Requests are known by owner numbers the engine gives them (the same on every rank of a
    tensor-parallel group, where each rank swaps its slice of the blocks, under its own keys)."""

    def __init__(self, cache: KVCache, mode: str, threads: int, device: torch.device) -> None:
        """mode: the channel's (naive or pipelined; swap needs --cc)."""
        self.cache, self.mode, self.threads, self.device = cache, mode, threads, device
        self._channels = RekeyingChannel(self._new_channel)
        self.store = HostStore(WorkerPool(threads))
        self._staged: dict[int, torch.Tensor] = {}  # owner -> plaintext opened ahead (pipelined prefetch)
        self._outgoing: dict[int, Outgoing] = {}    # owner -> swap-out not yet stored, in the channel's order
        self.swapped_out_bytes = 0
        self.swapped_in_bytes = 0

    def swap_out(self, owner: int, block_ids: list[int]) -> None:
        """Start moving the blocks' contents to the host store (the caller may free and scrub the blocks at once:
        they were copied on the compute stream); `settle` stores them."""
        self.reset_if_failed()
        if owner not in self.store:
            self.store.open(owner)
        data = self.cache.gather(block_ids)
        self._outgoing[owner] = Outgoing(owner, self.channel.to_host_async(data))
        self.swapped_out_bytes += data.nbytes

    def settle(self, until: int | None = None) -> list[tuple[int, IntegrityError]]:
        """Store the swap-outs whose message has reached the host, oldest first; with `until`, wait for every
        swap-out up to and including that owner's. Returns the owners whose KV could not leave intact (the message
        failed authentication, or its channel failed on an earlier one): their requests must end."""
        if until is not None and until not in self._outgoing:
            return []
        failed = []
        while self._outgoing:
            owner, out = next(iter(self._outgoing.items()))
            if until is None and not out.message.ready:
                break
            del self._outgoing[owner]
            try:
                plain = out.message.result()
            except (IntegrityError, ChannelClosed) as exc:
                failed.append((owner, _as_integrity_error(exc)))
            else:
                self.store.put(owner, ITEM, plain)
                plain.zero_()                        # the plaintext lived only between two decryptions
            if owner == until:
                break
        return failed

    def prefetch(self, owners: list[int]) -> None:
        """These swapped requests come back next, in this order: seal them ahead (pipelined mode only)."""
        self.reset_if_failed()
        channel = self.channel
        if channel.pipeline is None:
            return
        for owner in owners:
            if owner in self._staged or owner in self._outgoing:     # (not stored yet: swap_in waits for it)
                continue
            plain = self.store.get(owner, ITEM)
            self._staged[owner] = plain
            channel.register(plain, key=(ITEM, owner))
            channel.hint(SwapOut((ITEM, owner)))

    def swap_in(self, owner: int, block_ids: list[int]) -> None:
        """Bring the request's blocks back into `block_ids` and drop its host copy (its key stays until it ends:
        it may be swapped out again). Its swap-out must have settled."""
        if owner in self._outgoing:
            raise RuntimeError("swap_in before the request's swap-out settled: call settle(until=owner) first")
        self.reset_if_failed()
        plain = self._staged.pop(owner, None)
        if plain is None:
            plain = self.store.get(owner, ITEM)
        try:
            data = self.channel.to_device(plain, key=(ITEM, owner))
            self.cache.scatter(block_ids, data)
        finally:
            plain.zero_()
        self.store.discard(owner, ITEM)
        self.swapped_in_bytes += plain.nbytes

    def end(self, owner: int) -> None:
        """The request ended (finished, aborted, failed): forget any speculation and destroy its key."""
        out = self._outgoing.pop(owner, None)
        if out is not None:     # its message still takes its place in the channel's order: open it and drop it
            try:
                out.message.result().zero_()
            except (IntegrityError, ChannelClosed):
                pass
        plain = self._staged.pop(owner, None)
        if plain is not None:
            if not self.channel.failed:
                self.channel.hint(Forget((ITEM, owner)))
            plain.zero_()
        self.store.end(owner)
        self.reset_if_failed()      # its message may have failed (swallowed above): the next swap needs new keys

    @property
    def channel(self) -> Channel:
        """The swap channel in use."""
        return self._channels.channel

    def reset_if_failed(self) -> None:
        """Re-key after an integrity failure. Swap-outs still in the old channel are lost (settle ends their
        requests)."""
        self._channels.reset_if_failed()

    def totals(self) -> CryptoTotals:
        """Crypto counters of KV swap since the engine started."""
        return self._channels.totals()

    def close(self) -> None:
        self._channels.close()
        self.store.pool.close()

    def _new_channel(self) -> Channel:
        """Fresh keys and IV streams; the FIFO predictor learns swap-ins from the scheduler's hints."""
        return Channel(self.device, mode=self.mode, threads=self.threads, predictor=FifoPredictor())


def _as_integrity_error(exc: IntegrityError | ChannelClosed) -> IntegrityError:
    """A swap-out lost with a channel that failed on an earlier message is lost to the same attack."""
    if isinstance(exc, IntegrityError):
        return exc
    return IntegrityError(f"swapped KV could not reach the host intact: {exc}")
