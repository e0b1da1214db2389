"""The scheduler's adapter limit on synthetic sequences: at most max_loras distinct adapters run at once, and a
request that does not fit waits at the head of the queue without anything behind it overtaking (FCFS)."""
from ccserve.engine.scheduler import Scheduler
from ccserve.kv.block_pool import BlockPool
from tests.engine.test_scheduler import make_seq, run_step


def test_adapter_limit_keeps_fcfs():
    sched = Scheduler(BlockPool(100), block_size=4, max_num_seqs=8, max_num_batched_tokens=100, max_loras=2)
    seqs = [make_seq(i, 4) for i in range(5)]
    for seq, lora in zip(seqs, ["a", "b", "a", "c", None]):
        seq.lora = lora
        sched.add(seq)
    batch = run_step(sched)
    assert [s.request_id for s, _ in batch.items()] == ["r0", "r1", "r2"]   # "c" would be a third adapter
    assert list(sched.waiting) == seqs[3:]                                  # the base request waits behind it
    sched.finish(seqs[1], "stop")                                           # "b" leaves: "c" fits
    batch = run_step(sched)
    assert {s.request_id for s, _ in batch.items()} == {"r0", "r2", "r3", "r4"}
    assert len({s.lora for s in sched.running} - {None}) == 2
