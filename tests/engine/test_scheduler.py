"""Scheduler behaviour on synthetic sequences (no model): budget, FCFS, chunking, preemption."""
from ccserve.engine.scheduler import Scheduler
from ccserve.engine.sequence import Sequence, SequenceStatus
from ccserve.kv.block_pool import BlockPool
from ccserve.sampling_params import SamplingParams


def make_seq(i: int, n: int) -> Sequence:
    return Sequence(f"r{i}", list(range(1, n + 1)), SamplingParams(max_tokens=100))


def run_step(sched: Scheduler):
    """Apply a schedule as the engine would: computed tokens advance, full sequences get one new token."""
    batch = sched.schedule()
    for seq, n in batch.items():
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_tokens([7])
    return batch


def test_chunked_prefill_respects_token_budget():
    sched = Scheduler(BlockPool(100), block_size=4, max_num_seqs=8, max_num_batched_tokens=10)
    seqs = [make_seq(0, 25), make_seq(1, 3)]
    for s in seqs:
        sched.add(s)
    batch = run_step(sched)
    assert batch.prefills == [(seqs[0], 10)] and batch.num_tokens == 10
    batch = run_step(sched)
    assert batch.prefills == [(seqs[0], 10)]
    batch = run_step(sched)
    assert [(s.request_id, n) for s, n in batch.prefills] == [("r0", 5), ("r1", 3)]
    batch = run_step(sched)
    assert batch.decodes == seqs and batch.prefills == []


def test_max_num_seqs_and_fcfs_admission():
    sched = Scheduler(BlockPool(100), block_size=4, max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(i, 4) for i in range(4)]
    for s in seqs:
        sched.add(s)
    run_step(sched)
    assert sched.running == seqs[:2] and list(sched.waiting) == seqs[2:]
    sched.finish(seqs[0], "stop")
    run_step(sched)
    assert sched.running == [seqs[1], seqs[2]]


def test_preemption_recomputes_latest_and_oldest_progresses():
    pool = BlockPool(6)
    sched = Scheduler(pool, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = make_seq(0, 8), make_seq(1, 8)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a, b take 2 blocks each + 1 token appended each
    assert pool.num_free == 2
    for _ in range(5):
        run_step(sched)
    # a grows into new blocks; when blocks run out b (the latest) is preempted, never a
    assert sched.num_preemptions >= 1
    assert a.status is SequenceStatus.RUNNING and a.num_computed_tokens == a.num_tokens - 1
    assert len(pool._free) + sum(len(s.block_ids) for s in (a, b)) == 6


def test_no_leak_after_finish_and_abort():
    pool = BlockPool(20)
    sched = Scheduler(pool, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [make_seq(i, 9) for i in range(3)]
    for s in seqs:
        sched.add(s)
    run_step(sched)
    sched.finish(seqs[0], "stop")
    sched.finish(seqs[1], "abort")
    sched.finish(seqs[2], "length")
    assert pool.num_free == 20 and not sched.has_unfinished()


def test_swap_preemption_keeps_progress_and_starves_nobody():
    """With swap, a victim keeps its computed tokens; when admitted again the batch lists exactly the blocks
    that hold them for swap-in, every request finishes, and the oldest running request never waits."""
    pool = BlockPool(12)
    sched = Scheduler(pool, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, swap_threshold=1)
    seqs = [make_seq(i, n) for i, n in enumerate([9, 5, 7, 3, 6])]
    for s in seqs:
        sched.add(s)
    swapped: dict[int, int] = {}     # id(seq) -> computed tokens when swapped out
    for _ in range(400):
        if not sched.has_unfinished():
            break
        oldest = sched.running[0] if sched.running else None
        before = oldest.num_computed_tokens if oldest else 0
        batch = sched.schedule()
        for seq, blocks in batch.swap_out:
            assert seq.status is SequenceStatus.WAITING and seq.num_computed_tokens > 0
            assert len(blocks) == -(-seq.num_computed_tokens // 4)
            swapped[id(seq)] = seq.num_computed_tokens
        for seq, blocks in batch.swap_in:
            assert seq.num_computed_tokens == swapped.pop(id(seq))      # progress kept, nothing recomputed
            assert blocks == seq.block_ids[:len(blocks)] and len(blocks) == -(-seq.num_computed_tokens // 4)
        assert not (batch.swap_out and batch.swap_in)
        for seq, n in batch.items():
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_tokens([7])
                if seq.num_output_tokens >= 24:
                    sched.finish(seq, "length")
        if oldest is not None and oldest in sched.running:
            assert oldest.num_computed_tokens > before                  # the oldest always progresses
    assert not sched.has_unfinished() and pool.num_free == 12
    assert sched.num_swaps > 0 and sched.num_swaps == sched.num_preemptions and not swapped


def test_public_prefix_blocks_are_shared_and_not_counted_against_admission():
    """A sequence starting with shared blocks needs, and frees, only its own; its first own block is where its
    first uncomputed token goes, and recompute preemption gives the shared blocks back at the next admission."""
    pool = BlockPool(6)
    shared = pool.allocate(2)                          # the prefix cache's hold
    sched = Scheduler(pool, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = make_seq(0, 10), make_seq(1, 11)
    a.shared_block_ids = b.shared_block_ids = shared
    sched.add(a)
    sched.add(b)
    batch = run_step(sched)
    assert batch.prefills == [(a, 2), (b, 3)]          # tokens 8.. only
    assert a.block_ids[:2] == shared == b.block_ids[:2] and pool.num_free == 2
    assert sched.num_prefix_hits == 2 and sched.num_prefix_tokens_saved == 16
    sched._preempt(b, batch)
    assert b.num_computed_tokens == 0 and pool.num_free == 3
    run_step(sched)
    assert b.block_ids[:2] == shared and b.num_computed_tokens == 12 and sched.num_prefix_hits == 3
    sched.finish(a, "stop")
    sched.finish(b, "stop")
    scrubbed = pool.take_blocks_to_scrub()
    assert pool.num_free == 4 and scrubbed and not set(scrubbed) & set(shared)
