"""The pruning policy of --kv-sparsity (ccserve/kv/sparsity.py) on hand-made scores: sinks and the recent window
stay, each request's budget holds per layer, heads share it unequally, pruned tokens stay pruned, padding entries
of a block table (block 0, another sequence's) are never written."""
import math

import torch

from ccserve.kv.sparsity import SparseState, SparsityPolicy, kept_share, prune

LAYERS, BLOCKS, HEADS, BS = 2, 12, 3, 4


def state(seed: int = 0) -> SparseState:
    torch.manual_seed(seed)
    s = SparseState(LAYERS, BLOCKS, HEADS, BS, torch.device("cpu"))
    s.importance.uniform_()
    return s


def per_sequence(s: SparseState, table: list[int], seq_len: int) -> torch.Tensor:
    """[L, Hk, seq_len] pruned flags of one sequence, in position order."""
    pos = torch.arange(seq_len)
    return s.pruned[:, torch.tensor(table)[pos // BS], :, pos % BS].permute(1, 2, 0)     # indexed: [N, L, Hk]


TABLES = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]], dtype=torch.int32)      # padding: block 0
LENS = torch.tensor([19, 6], dtype=torch.int32)


def test_budget_sinks_and_window():
    s = state()
    policy = SparsityPolicy(0.5, sinks=2, window=4)
    prune(s, TABLES, LENS, policy)
    seq0 = per_sequence(s, [1, 2, 3, 4, 5], 19)
    assert not seq0[:, :, :2].any() and not seq0[:, :, -4:].any()           # sinks, recent window
    kept_per_layer = (seq0 == 0).sum(dim=(1, 2))
    assert torch.all(kept_per_layer <= math.ceil(0.5 * 19) * HEADS)          # the request's budget, per layer
    assert torch.all(kept_per_layer >= 6 * HEADS)
    assert not per_sequence(s, [6, 7], 6).any()                              # 6 tokens = sinks + window: all kept
    assert s.pruned[:, 0].sum() == 0                                         # padding block never written
    share = kept_share(s, TABLES, LENS)
    assert 0.5 - 1e-6 <= share[0] <= 0.5 + 1 / 19 and share[1] == 1


def test_ratio_one_prunes_nothing():
    s = state()
    prune(s, TABLES, LENS, SparsityPolicy(1.0, sinks=0, window=1))
    assert s.pruned.sum() == 0


def test_heads_share_the_budget_unequally():
    """Head 0 puts all its mass on two tokens, head 2 spreads it evenly: head 0 keeps fewer tokens."""
    s = SparseState(1, BLOCKS, HEADS, BS, torch.device("cpu"))
    imp = s.importance[0]
    table = [1, 2, 3, 4]
    for p in range(16):
        block, row = table[p // BS], p % BS
        imp[block, 0, row] = 5.0 if p in (5, 6) else 0.01
        imp[block, 1, row] = 0.5 + 0.01 * p
        imp[block, 2, row] = 1.0
    prune(s, torch.tensor([table]), torch.tensor([16]), SparsityPolicy(0.5, sinks=1, window=2,
                                                                        importance="window"))
    kept = (per_sequence(s, table, 16)[0] == 0).sum(dim=1)
    assert kept.sum() <= 8 * HEADS and kept[0] < kept[2]
    assert per_sequence(s, table, 16)[0, 0, 5] == 0 and per_sequence(s, table, 16)[0, 0, 6] == 0
    assert s.importance.sum() == 0          # "window" scores are cleared after each selection


def test_pruned_stays_pruned_and_budget_tracks_growth():
    s = state()
    policy = SparsityPolicy(0.25, sinks=1, window=2)
    prune(s, TABLES[:1], torch.tensor([10]), policy)
    before = per_sequence(s, [1, 2, 3, 4, 5], 10).clone()
    s.importance.fill_(100.0)               # pruned tokens cannot come back, however their scores look now
    prune(s, TABLES[:1], torch.tensor([14]), policy)
    after = per_sequence(s, [1, 2, 3, 4, 5], 14)
    assert torch.all(after[:, :, :10] >= before)
    assert torch.all((after == 0).sum(dim=(1, 2)) <= math.ceil(0.25 * 14) * HEADS)
