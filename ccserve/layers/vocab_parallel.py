"""Vocabulary-parallel token embedding and LM head: rank r keeps vocabulary rows [r * n, (r + 1) * n) with
n = ceil(vocab / size); the last rank's rows past the vocabulary are padding (zero when loaded) that no token
id reaches and whose logits are cut off.

The embedding looks up the ids that fall in its rows, zeroes the others and all-reduces, so every rank ends
with the full hidden state. The LM head computes its rows' logits and all-gathers them, so every rank holds the
full [N, vocab] logits and can run the same sampler on them: with counter-based sampling noise every rank draws
the same tokens, and multi-step decode can feed them to the next step without a broadcast. At size 1 both are
exactly the plain lookup and matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ccserve.distributed.group import TensorParallelGroup
from ccserve.layers.embedding import Embedding
from ccserve.layers.sharding import Sharded, narrow_checked


class VocabParallelEmbedding(Embedding, Sharded):
    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TensorParallelGroup) -> None:
        self.vocab_size, self.rows = num_embeddings, -(-num_embeddings // tp.size)
        super().__init__(self.rows, embedding_dim)
        self.tp, self.start = tp, tp.rank * self.rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0.0))

    def rank_slice(self, param_name: str, tensor: torch.Tensor, shard: int | None) -> torch.Tensor:
        """This rank's rows, zero-padded to `rows` on the last rank."""
        length = max(0, min(self.rows, self.vocab_size - self.start))
        mine = narrow_checked(tensor, 0, self.vocab_size, min(self.start, self.vocab_size), length)
        return F.pad(mine, (0, 0, 0, self.rows - length)) if length < self.rows else mine

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 [N, vocab] on every rank (the tied LM head of models that share the table)."""
        return parallel_logits(hidden, self.weight, self.vocab_size, self.tp)


class ParallelLMHead(VocabParallelEmbedding):
    """An untied LM head: the same sharding as the embedding, used only through logits()."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        raise TypeError("ParallelLMHead is an output projection: call logits(hidden_states)")


def parallel_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int,
                    tp: TensorParallelGroup) -> torch.Tensor:
    """Each rank's slice of the logits, gathered in the model's dtype (half the bytes of float32) and cut to
    the vocabulary; float32 for the sampler."""
    if tp.size == 1:
        return F.linear(hidden, weight).float()
    return tp.all_gather(F.linear(hidden, weight))[..., :vocab_size].float()
