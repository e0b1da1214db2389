"""Sharding arithmetic of the tensor-parallel layers at sizes the CPU test machine cannot spawn cheaply (3, 4,
8 ranks): every rank's layer is built in this process with a group whose collectives are the identity, and the
test does the all-reduce (sum over ranks) and all-gather (concatenation) itself. The real collectives run in
tests/distributed and tests/models/test_tensor_parallel.py."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from ccserve.distributed.group import SINGLE, TensorParallelGroup
from ccserve.layers.linear import Linear
from ccserve.layers.parallel_linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                            RowParallelLinear, kv_heads_of_rank)
from ccserve.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding


@dataclass(frozen=True)
class LocalRank(TensorParallelGroup):
    """One rank of a simulated group: collectives return this rank's part, the test combines them."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _ranks(size: int) -> list[TensorParallelGroup]:
    return [LocalRank(r, size, group="simulated") for r in range(size)]


def _load(layer, full: dict[str, torch.Tensor], shard: int | None = None) -> None:
    """What the loader does for one checkpoint tensor per parameter."""
    for name, tensor in full.items():
        param = getattr(layer, name)
        dest = param if shard is None else layer.shard(param, shard)
        dest.copy_(layer.rank_slice(name, tensor, shard))


@torch.no_grad()
@pytest.mark.parametrize("size", [2, 4])
def test_column_then_row_equals_the_whole_mlp(size):
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    w1, b1, w2, b2 = torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8)
    want = F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)
    total = 0
    for tp in _ranks(size):
        fc1 = ColumnParallelLinear(8, 16, tp, bias=True)
        fc2 = RowParallelLinear(16, 8, tp, bias=True)
        _load(fc1, dict(weight=w1, bias=b1))
        _load(fc2, dict(weight=w2, bias=b2))
        total = total + fc2(F.relu(fc1(x)))
    torch.testing.assert_close(total, want)


@torch.no_grad()
def test_gate_and_up_are_sharded_alike():
    """Rank r's gate_up output is [gate_r, up_r]: SiLU(gate_r) * up_r pairs the same features."""
    torch.manual_seed(0)
    x, gate, up = torch.randn(3, 8), torch.randn(12, 8), torch.randn(12, 8)
    parts = []
    for tp in _ranks(4):
        layer = MergedColumnParallelLinear(8, [12, 12], tp)
        _load(layer, dict(weight=gate), shard=0)
        _load(layer, dict(weight=up), shard=1)
        g, u = layer(x).chunk(2, dim=-1)
        parts.append(F.silu(g) * u)
    torch.testing.assert_close(torch.cat(parts, -1), F.silu(x @ gate.T) * (x @ up.T))


@pytest.mark.parametrize("kv_heads,size,want", [
    (8, 4, [(2, 0), (2, 2), (2, 4), (2, 6)]),   # split
    (2, 4, [(1, 0), (1, 0), (1, 1), (1, 1)]),   # each KV head replicated on two ranks
    (1, 8, [(1, 0)] * 8),                       # MQA
])
def test_kv_heads_of_each_rank(kv_heads, size, want):
    assert [kv_heads_of_rank(kv_heads, tp) for tp in _ranks(size)] == want


@torch.no_grad()
def test_qkv_rank_reads_the_kv_heads_its_query_heads_use():
    """8 query heads, 2 KV heads (GQA groups of 4), 4 ranks: rank r computes query heads 2r, 2r+1 and holds KV
    head r // 2, the one those queries read."""
    d, heads, kv = 2, 8, 2
    q_w = torch.arange(heads * d, dtype=torch.float32).view(-1, 1).expand(-1, 3).clone()
    k_w = 100 + torch.arange(kv * d, dtype=torch.float32).view(-1, 1).expand(-1, 3).clone()
    for tp in _ranks(4):
        layer = QKVParallelLinear(3, d, heads, kv, tp)
        for shard, w in enumerate((q_w, k_w, k_w)):
            _load(layer, dict(weight=w), shard)
        q, k, _ = layer.weight[:, 0].split(layer.output_sizes)
        assert q.tolist() == list(range(tp.rank * 2 * d, (tp.rank + 1) * 2 * d))
        assert k.tolist() == [100 + (tp.rank // 2) * d + i for i in range(d)]
        assert (layer.num_heads, layer.num_kv_heads) == (2, 1)


@torch.no_grad()
@pytest.mark.parametrize("vocab,size", [(10, 3), (7, 2), (9, 3)])
def test_vocab_parallel_embedding_and_head_with_padding(vocab, size):
    torch.manual_seed(0)
    table, ids, hidden = torch.randn(vocab, 4), torch.tensor([0, vocab - 1, 3, 5 % vocab]), torch.randn(2, 4)
    looked_up, logits = 0, []
    for tp in _ranks(size):
        emb = VocabParallelEmbedding(vocab, 4, tp)
        _load(emb, dict(weight=table))
        looked_up = looked_up + emb(ids)
        logits.append(emb.logits(hidden))
    torch.testing.assert_close(looked_up, table[ids])
    torch.testing.assert_close(torch.cat(logits, -1)[:, :vocab], hidden @ table.T)
    assert emb.weight.shape[0] * size >= vocab and (emb.weight[vocab - emb.start:] == 0).all()


def test_lm_head_is_not_a_lookup():
    with pytest.raises(TypeError, match="call logits"):
        ParallelLMHead(8, 4, SINGLE)(torch.tensor([1]))


@torch.no_grad()
def test_size_one_layers_compute_what_the_plain_layers_compute():
    """At size 1 no parameter is sliced or padded and forward is the base class's: same shapes, same values."""
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    plain = Linear(8, 6, bias=True)
    plain.weight.copy_(torch.randn(6, 8))
    plain.bias.copy_(torch.randn(6))
    row = RowParallelLinear(8, 6, SINGLE, bias=True)
    row.load_state_dict(plain.state_dict())
    assert row.weight.shape == plain.weight.shape
    torch.testing.assert_close(row(x), plain(x), atol=0, rtol=0)
    emb = VocabParallelEmbedding(7, 8, SINGLE)
    assert emb.weight.shape == (7, 8)
