import pytest

from ccserve.kv.block_pool import BlockPool, OutOfBlocks


def test_allocate_free_and_scrub_queue():
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert sorted(a + b) == list(range(8)) and pool.num_free == 0
    with pytest.raises(OutOfBlocks):
        pool.allocate(1)
    pool.free(a)
    assert pool.num_free == 3
    assert sorted(pool.take_blocks_to_scrub()) == sorted(a)
    assert pool.take_blocks_to_scrub() == []
    pool.free(b)
    assert pool.num_free == 8


def test_rejects_empty_pool():
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)


def test_shared_blocks_return_only_when_the_last_holder_frees_them():
    pool = BlockPool(4)
    held = pool.allocate(2)                 # e.g. the public prefix cache's hold, for the process lifetime
    a = pool.share(held) + pool.allocate(1)
    b = pool.share(held)
    pool.free(a)
    pool.free(b)
    assert pool.num_free == 2 and pool.take_blocks_to_scrub() == [a[2]]   # shared ones: neither freed nor queued
    pool.free(held)
    assert pool.num_free == 4 and sorted(pool.take_blocks_to_scrub()) == sorted(held)
    with pytest.raises(ValueError, match="only held blocks"):
        pool.share([held[0]])
