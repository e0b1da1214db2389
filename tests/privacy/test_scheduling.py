"""Scheduling stays non-targeting (issue 8, rule T): what the scheduler reads of a request is its arrival order,
its token count and its KV blocks; nothing of who sent it or what it says can change when it runs."""
from __future__ import annotations

import random
import sys

from ccserve.engine.scheduler import Scheduler
from ccserve.engine.sequence import Sequence
from ccserve.kv.block_pool import BlockPool
from ccserve.sampling_params import SamplingParams

SCHEDULER_FILE = sys.modules[Scheduler.__module__].__file__
# What the scheduler may read of a sequence: progress, size, blocks (its own and the public prefix blocks the engine
# matched when it was added) and its own lifecycle state.
ALLOWED = {"num_computed_tokens", "num_uncomputed_tokens", "num_tokens", "block_ids", "shared_block_ids", "status",
           "finish_reason"}


class Watched(Sequence):
    """A Sequence that records every attribute the scheduler's own code touches."""

    touched: set[str] = set()

    def __getattribute__(self, name: str):
        if sys._getframe(1).f_code.co_filename == SCHEDULER_FILE:
            Watched.touched.add(name)
        return super().__getattribute__(name)

    def __setattr__(self, name: str, value) -> None:
        if sys._getframe(1).f_code.co_filename == SCHEDULER_FILE:
            Watched.touched.add(name)
        super().__setattr__(name, value)


def simulate(requests: list[tuple[str, list[int], SamplingParams]], seq_type: type = Sequence) -> list:
    """Arrivals spread over steps, each step applied as the engine would; returns each step's schedule as
    (arrival index, tokens) pairs, plus the preemption count."""
    sched = Scheduler(BlockPool(24), block_size=4, max_num_seqs=5, max_num_batched_tokens=16)
    seqs = [seq_type(rid, ids, params) for rid, ids, params in requests]
    index = {id(s): i for i, s in enumerate(seqs)}
    trace, pending = [], list(seqs)
    for step in range(400):
        if pending and step % 2 == 0:
            sched.add(pending.pop(0))
        batch = sched.schedule()
        trace.append([(index[id(s)], n) for s, n in batch.items()])
        for seq, n in batch.items():
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_tokens([1])
                if seq.num_output_tokens >= 12:
                    sched.finish(seq, "length")
        if not pending and not sched.has_unfinished():
            break
    return trace + [sched.num_preemptions]


def requests(rng: random.Random, lengths: list[int]) -> list[tuple[str, list[int], SamplingParams]]:
    """Requests of the given prompt lengths with everything else random: ids, contents, sampling settings."""
    return [(f"user-{rng.getrandbits(64):x}", [rng.randrange(1, 50000) for _ in range(n)],
             SamplingParams(temperature=rng.random() * 2, top_p=rng.uniform(0.1, 1), seed=rng.randrange(1000),
                            stop=[f"{rng.getrandbits(32):x}"], max_tokens=rng.randrange(12, 4000)))
            for n in lengths]


def test_schedule_depends_on_arrival_and_size_only():
    lengths = [random.Random(0).randrange(3, 30) for _ in range(12)]
    traces = [simulate(requests(random.Random(seed), lengths)) for seed in (1, 2, 3)]
    assert traces[0][-1] > 0, "the workload should exercise preemption"
    assert traces[0] == traces[1] == traces[2]


def test_scheduler_reads_nothing_of_who_or_what():
    Watched.touched = set()
    simulate(requests(random.Random(4), [5, 17, 9, 30, 2, 11, 25, 8]), Watched)
    assert Watched.touched, "the recorder saw nothing: the test would prove nothing"
    assert Watched.touched <= ALLOWED, f"the scheduler reads {sorted(Watched.touched - ALLOWED)}"
