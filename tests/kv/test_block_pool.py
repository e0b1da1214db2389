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
