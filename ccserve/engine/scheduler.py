"""Continuous batching with chunked prefill under a token budget, first come first served.

Each step, running sequences go first (oldest first), each taking the tokens it still needs (one for a
decode, a chunk for a prefill) out of max_num_batched_tokens; waiting sequences are then admitted in
arrival order while budget, sequence slots and KV blocks last. When blocks run out, the most recently
admitted running sequence is preempted (its blocks freed, its tokens kept, first in line again), so the oldest
request always makes progress and none starves. Nothing is ordered by user or content: a privacy rule.

Preemption either recomputes (drops the KV: the request prefills again) or swaps (the batch lists the victim's
blocks in `swap_out`; the engine moves them to the host before they are scrubbed, and when the request is
admitted again the batch lists its new blocks in `swap_in`). The rule is by size only: swap when the victim has
at least swap_threshold computed tokens (re-running that prefill costs more than moving its blocks twice).
A waiting sequence with computed tokens is a swapped one: its KV is on the host.

Public prefixes (kv/prefix_cache.py): a sequence whose prompt starts with declared public prefix blocks
(`shared_block_ids`, matched by the engine when the request is added) gets them first in its block table, shared,
and its own blocks from the first token it computes; admission counts only its own. Shared blocks never swap (they
stay on the GPU) and come back at every admission, so a preempted request re-matches them.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ccserve.engine.sequence import Sequence, SequenceStatus
from ccserve.kv.block_pool import BlockPool


@dataclass
class ScheduledBatch:
    """One step's work: decodes (one token each) first, then prefill chunks (sequence, token count)."""

    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)
    swap_out: list[tuple[Sequence, list[int]]] = field(default_factory=list)   # before this step's scrub
    swap_in: list[tuple[Sequence, list[int]]] = field(default_factory=list)    # after it, before the forward

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    def items(self) -> list[tuple[Sequence, int]]:
        """All (sequence, tokens this step) pairs in batch order."""
        return [(s, 1) for s in self.decodes] + self.prefills


class Scheduler:
    def __init__(self, pool: BlockPool, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 swap_threshold: int | None = None, max_loras: int | None = None) -> None:
        """swap_threshold None: always recompute (no channel to swap through). max_loras: the most distinct LoRA
        adapters the running requests may use (the GPU adapter cache's slots); None: no adapters."""
        self.pool = pool
        self.max_loras = max_loras
        self.swap_threshold = swap_threshold
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_swaps = 0
        self.num_prefix_hits = 0            # admissions that started from public prefix blocks
        self.num_prefix_tokens_saved = 0    # prompt tokens those admissions did not compute

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch()
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            while not self._grow(seq, seq.num_computed_tokens + n):
                preempted = True
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                scheduled.append((seq, n))
                budget -= n
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            swapped = seq.num_computed_tokens > 0
            n = self._admit(seq, budget) if self._adapter_fits(seq) else 0
            if not n:
                break
            if swapped:     # its KV comes back into its first own blocks
                batch.swap_in.append((seq, seq.block_ids[len(seq.shared_block_ids):self._blocks_held(seq)]))
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        for seq, n in scheduled:
            if n == 1:
                batch.decodes.append(seq)
            else:
                batch.prefills.append((seq, n))
        return batch

    def reserve_decode_steps(self, seqs: list[Sequence], steps: int) -> bool:
        """Give each decoding sequence blocks for `steps` tokens from its first uncomputed one, if that needs
        no preemption (multi-step decode windows reserve ahead)."""
        need = sum(self._blocks_short(s, s.num_computed_tokens + steps) for s in seqs)
        if need > self.pool.num_free:
            return False
        for seq in seqs:
            self._grow(seq, seq.num_computed_tokens + steps)
        return True

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a sequence finished and give its blocks back (they get scrubbed)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._release(seq)

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Give a waiting sequence its blocks for this step's tokens (shared public prefix blocks first, then its
        own) and return how many tokens it computes; 0 when it does not fit. Admit only while a block per running
        sequence stays free afterwards: without that headroom the running sequences outgrow the pool within a
        few steps and the newcomer is preempted right after its prefill (thrashing), and multi-step decode
        windows cannot reserve their blocks."""
        shared = len(seq.shared_block_ids) * self.block_size
        computed = max(seq.num_computed_tokens, shared)
        n = min(seq.num_tokens - computed, budget)
        need = -(-(computed + n) // self.block_size) - len(seq.shared_block_ids)
        if self.pool.num_free - need < len(self.running):
            return 0
        seq.block_ids = self.pool.share(seq.shared_block_ids) + self.pool.allocate(need)
        if seq.num_computed_tokens < shared:
            self.num_prefix_hits += 1
            self.num_prefix_tokens_saved += shared - seq.num_computed_tokens
        seq.num_computed_tokens = computed
        return n

    def _adapter_fits(self, seq: Sequence) -> bool:
        """Admit while the running requests use at most max_loras distinct adapters, so every batch fits the GPU
        adapter cache. A request that does not fit waits at the head of the queue (first come, first served:
        nothing behind it is admitted past it)."""
        if self.max_loras is None or seq.lora is None:
            return True
        active = {s.lora for s in self.running if s.lora is not None}
        return seq.lora in active or len(active) < self.max_loras

    def _blocks_short(self, seq: Sequence, num_tokens: int) -> int:
        """How many more blocks seq needs to hold num_tokens tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_ids))

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give seq enough blocks for num_tokens tokens; False if the pool is short."""
        need = self._blocks_short(seq, num_tokens)
        if need == 0:
            return True
        if need > self.pool.num_free:
            return False
        seq.block_ids.extend(self.pool.allocate(need))
        return True

    def _blocks_held(self, seq: Sequence) -> int:
        """Blocks holding seq's computed tokens (what a swap moves)."""
        return -(-seq.num_computed_tokens // self.block_size)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        """Drop the KV (recompute) or list it for swap-out; keep the tokens, put it first in line again."""
        self.running.remove(seq)
        if self.swap_threshold is not None and seq.num_computed_tokens >= self.swap_threshold:
            batch.swap_out.append((seq, seq.block_ids[len(seq.shared_block_ids):self._blocks_held(seq)]))
            self.num_swaps += 1
        else:
            seq.num_computed_tokens = 0
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        if seq.block_ids:
            self.pool.free(seq.block_ids)
            seq.block_ids = []
