"""Per-head dynamic sparsity (--kv-sparsity): which cached tokens each KV head keeps.

Every KV head of every layer carries, per cached token, an importance score (the attention mass its query heads
gave the token: the attention reference adds it in, kernels/decode_attention.py) and a pruned flag (attention
skips a pruned token for that head only). Both live in the cache's pages, [layers, blocks, kv_heads, block_size],
so one block id addresses them with the token's keys and values, and scrubbing a freed block zeroes them:
a fresh block's tokens start unpruned with score 0.

After every step, `prune` re-selects for each sequence of the step, per layer, over all its KV heads together:

- score: "accumulated" (LeanKV, H2O): the mass summed over every query since the token was written, divided by
  the number of those queries (seq_len - position), so old and new tokens compare fairly; "window" (SnapKV-style):
  the mass from this step's queries only (the step's queries are the observation window; the scores are cleared
  after each selection).
- budget: ceil(R x seq_len) tokens per head on average, i.e. R x seq_len x kv_heads per layer, shared unequally:
  a global top-k over the layer's heads. A head that concentrates its attention puts a few tokens high and the
  rest near zero, so it loses more of them; a diffuse head's tokens all sit near 1/L and stay (LeanKV's
  observation, with its per-token thresholds replaced by a fixed ratio so that the budget is predictable).
- always kept: the first `sinks` tokens and the last `window` tokens (and so nothing is pruned while a sequence
  is shorter than sinks + window); these count against the budget, which never drops below them.
- pruned stays pruned (the token's attention mass no longer accumulates, so it could not earn its way back).

Under tensor parallelism each rank holds some KV heads; the global top-k still runs over all of a layer's heads:
every rank all-gathers the step's scores and flags over the heads, selects as one process would, and keeps the
selection of its own heads (so TP=N prunes what TP=1 prunes).

Phase 1 keeps pruned tokens' memory allocated: the blocks stay in the sequence's table; freeing needs per-head
block tables (unified paging, phase 2). Everything here is tensor ops without host reads, so it can run inside
a multi-step decode window.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ccserve.distributed.group import SINGLE, TensorParallelGroup

IMPORTANCE_MODES = ("accumulated", "window")
STATE_BYTES = 5     # per token, KV head and layer: a float32 score and a one-byte flag (cache sizing counts them)


@dataclass(frozen=True)
class SparsityPolicy:
    """ratio: share of each request's tokens kept per layer (0, 1]; sinks / window: first / last tokens kept."""

    ratio: float
    sinks: int = 4
    window: int = 32
    importance: str = "accumulated"


class SparseState:
    """The per-token scores and pruned flags of every layer, paged like the KV cache."""

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int,
                 device: torch.device) -> None:
        shape = (num_layers, num_blocks, num_kv_heads, block_size)
        self.importance = torch.zeros(shape, dtype=torch.float32, device=device)
        self.pruned = torch.zeros(shape, dtype=torch.uint8, device=device)

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.importance, self.pruned]


def _token_index(tables: torch.Tensor, num_kv_heads: int, block_size: int) -> torch.Tensor:
    """[B, Hk, W * block_size] flat index into one layer's [blocks * Hk * block_size] state, token-major per head."""
    width = tables.shape[1] * block_size
    pos = torch.arange(width, device=tables.device)
    pages = tables.long()[:, pos // block_size]                                     # [B, N]
    heads = torch.arange(num_kv_heads, device=tables.device)
    return (pages[:, None, :] * num_kv_heads + heads[None, :, None]) * block_size + (pos % block_size)


def select(score: torch.Tensor, pruned: torch.Tensor, seq_lens: torch.Tensor, policy: SparsityPolicy
           ) -> torch.Tensor:
    """Which tokens to prune now. score / pruned: [L, B, Hk, N] gathered per sequence (positions >= seq_len are
    padding); returns a bool [L, B, Hk, N]: newly pruned tokens (valid, not yet pruned, not selected)."""
    num_layers, batch, heads, n = score.shape
    pos = torch.arange(n, device=score.device)
    lens = seq_lens.long()[None, :, None, None]
    valid = pos < lens
    was_pruned = pruned != 0
    protected = valid & ((pos < policy.sinks) | (pos >= lens - policy.window))
    if policy.importance == "accumulated":
        score = score / (lens - pos).clamp(min=1)           # mean mass per query that saw the token
    score = score.masked_fill(protected, float("inf")).masked_fill(~valid | was_pruned, float("-inf"))
    budget = torch.ceil(policy.ratio * seq_lens.double()).long() * heads            # [B]
    flat = score.reshape(num_layers, batch, heads * n)
    order = flat.argsort(dim=-1, descending=True, stable=True)
    chosen_sorted = torch.arange(heads * n, device=score.device) < budget[None, :, None]
    chosen = torch.zeros_like(flat, dtype=torch.bool).scatter(-1, order, chosen_sorted.expand_as(flat))
    keep = chosen.view_as(score) | protected
    return valid & ~was_pruned & ~keep


def prune(state: SparseState, tables: torch.Tensor, seq_lens: torch.Tensor, policy: SparsityPolicy,
          tp: TensorParallelGroup = SINGLE) -> None:
    """Re-select the kept tokens of the sequences with these block tables [B, W] and lengths [B] (after a step).
    Under tensor parallelism every rank calls it for the same step (it runs collectives)."""
    if tables.shape[0] == 0:
        return
    num_layers, _, heads, block_size = state.pruned.shape
    idx = _token_index(tables, heads, block_size)
    pruned = state.pruned.view(num_layers, -1)
    importance = state.importance.view(num_layers, -1)
    score = importance[:, idx]
    if tp.size == 1:
        newly = select(score, pruned[:, idx], seq_lens, policy)
    else:
        every = select(_all_heads(tp, score), _all_heads(tp, pruned[:, idx]), seq_lens, policy)
        newly = every.narrow(2, tp.rank * heads, heads)
    layers = torch.arange(num_layers, device=idx.device)[:, None, None, None]
    index = (layers, idx[None].expand_as(newly))
    # Padding entries of a table repeat block 0, which may be another sequence's: add zeros there, never write.
    pruned.index_put_(index, newly.to(torch.uint8), accumulate=True)
    if policy.importance == "window":
        valid = torch.arange(idx.shape[2], device=idx.device) < seq_lens.long()[:, None, None]
        importance.index_put_(index, -(score * valid), accumulate=True)


def _all_heads(tp: TensorParallelGroup, x: torch.Tensor) -> torch.Tensor:
    """[L, B, heads of this rank, N] -> [L, B, heads of every rank, N], in rank order (the heads' order)."""
    return tp.all_gather(x.movedim(2, -1).contiguous()).movedim(-1, 2)


def kept_share(state: SparseState, tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """[B] share of each sequence's (token, layer, head) entries still kept: its achieved R."""
    num_layers, _, heads, block_size = state.pruned.shape
    idx = _token_index(tables, heads, block_size)
    valid = torch.arange(idx.shape[2], device=idx.device) < seq_lens.long()[:, None, None]
    gone = (state.pruned.view(num_layers, -1)[:, idx] != 0) & valid
    total = valid.sum(dim=(1, 2)) * heads * num_layers
    return 1 - gone.sum(dim=(0, 2, 3)) / total.clamp(min=1)
