"""The public prefix index: whole blocks of exact token ids, chained from the first token; never the last token."""
import pytest

from ccserve.kv.prefix_cache import PublicPrefixCache


def test_lookup_matches_whole_blocks_from_the_start_only():
    cache = PublicPrefixCache(block_size=4)
    cache.insert(list(range(12)), [7, 3, 5])
    assert cache.lookup(list(range(12)) + [99]) == [7, 3, 5]
    assert cache.lookup(list(range(10))) == [7, 3]              # the partial third block is not shared
    assert cache.lookup([0, 1, 2, 9] + list(range(4, 12))) == []  # one token differs in the first block
    assert cache.lookup(list(range(4, 8))) == []                # block 2's tokens, but not at the start
    assert cache.num_blocks == 3


def test_match_leaves_the_last_prompt_token_to_compute():
    cache = PublicPrefixCache(block_size=4)
    cache.insert(list(range(8)), [0, 1])
    assert cache.match(list(range(8))) == [0]
    assert cache.match(list(range(9))) == [0, 1]


def test_prefixes_that_share_a_start_share_its_blocks():
    cache = PublicPrefixCache(block_size=2)
    cache.insert([1, 2, 3, 4], [10, 11])
    cache.insert([1, 2, 5, 6], [10, 12])
    assert cache.lookup([1, 2, 5, 6, 7]) == [10, 12] and cache.lookup([1, 2, 3, 4]) == [10, 11]
    assert cache.block_ids == [10, 11, 12]
    with pytest.raises(ValueError, match="already cached"):
        cache.insert([1, 2], [13])
    with pytest.raises(ValueError, match="whole blocks"):
        cache.insert([1, 2, 3], [10, 11])
