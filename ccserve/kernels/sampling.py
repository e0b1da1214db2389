"""Drawing one token per row from softmax(logits / T) in one read of the logits (Gumbel-max).

argmax(x / T + G) with G = -log(-log U) independent per token draws from softmax(x / T); the softmax itself is
never formed. The uniform U of (row, token) is a counter-based hash of a per-row key and the token id, so
nothing is materialized, nothing is read back on the host, and the kernel and its PyTorch reference draw the
very same numbers: the reference is exact, not just equal in distribution. The row key mixes the request's
seed with the position being sampled, so a seeded request gets the same tokens alone or in any batch, in
single steps or multi-step windows, and again after a recompute preemption.

The sampler (layers/sampler.py) masks top-k / top-p / min-p rows beforehand; greedy rows take a plain argmax
of the same pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ccserve.kernels.device import num_sms

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9
MUL1, MUL2 = 0x7FEB352D, 0x846CA68B      # Wellons' lowbias32 constants: good avalanche, two multiplies
TILE = 1024


def hash32_ref(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on uint32 values held in int64 (low 32 bits of each product kept)."""
    x = x ^ (x >> 16)
    x = (x * MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL2) & MASK32
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, 2] int64 (two uint32 words) from each row's 63-bit seed and the position being sampled."""
    seeds, positions = seeds.long(), positions.long()
    lo = hash32_ref((seeds & MASK32) ^ hash32_ref((positions & MASK32) ^ GOLDEN32))
    hi = hash32_ref(((seeds >> 32) & MASK32) ^ hash32_ref(lo ^ ((positions >> 32) & MASK32)))
    return torch.stack([lo, hi], dim=1)


def gumbel_ref(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] float32 Gumbel noise of the rows' keys."""
    cols = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    h = hash32_ref(hash32_ref(cols[None, :] ^ keys[:, :1]) ^ keys[:, 1:])
    u = ((h >> 8).float() + 0.5) * (1.0 / 16777216.0)        # 24 bits, strictly inside (0, 1)
    return -torch.log(-torch.log(u))


def sample_ref(logits: torch.Tensor, inv_temperature: torch.Tensor, keys: torch.Tensor,
               greedy: torch.Tensor) -> torch.Tensor:
    """Token per row: argmax of logits (greedy rows) or of logits * inv_temperature + Gumbel noise."""
    x = logits.float()
    noisy = x * inv_temperature.float()[:, None] + gumbel_ref(keys, x.shape[1])
    return torch.where(greedy[:, None], x, noisy).argmax(dim=-1)


@triton.jit
def _hash32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit(do_not_specialize=["vocab", "stride_row", "span"])
def _sample_kernel(Logits, InvTemperature, Keys, Greedy, PartValue, PartId, vocab, stride_row, span,
                   TILE: tl.constexpr):
    """One program per (row, piece of the vocabulary): each lane keeps its own running (max, id) across the
    tiles, so the only cross-lane reduction is the last one; ties keep the lowest id."""
    row = tl.program_id(0)
    piece = tl.program_id(1)
    inv_t = tl.load(InvTemperature + row)
    key_lo = tl.load(Keys + 2 * row).to(tl.uint32)
    key_hi = tl.load(Keys + 2 * row + 1).to(tl.uint32)
    greedy = tl.load(Greedy + row) != 0
    offs = tl.arange(0, TILE)
    best = tl.full([TILE], float("-inf"), tl.float32)
    best_id = tl.zeros([TILE], tl.int32)
    start = piece * span
    end = tl.minimum(start + span, vocab)
    for tile in range(start, end, TILE):
        cols = tile + offs
        mask = cols < end
        x = tl.load(Logits + row.to(tl.int64) * stride_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        h = _hash32(_hash32(cols.to(tl.uint32) ^ key_lo) ^ key_hi)
        u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        v = tl.where(greedy, x, x * inv_t - tl.log(-tl.log(u)))
        better = mask & (v > best)
        best_id = tl.where(better, cols, best_id)
        best = tl.where(better, v, best)
    top = tl.max(best, 0)
    top_id = tl.min(tl.where(best == top, best_id, 2147483647), 0)
    tl.store(PartValue + row * tl.num_programs(1) + piece, top)
    tl.store(PartId + row * tl.num_programs(1) + piece, top_id)


def sample_triton(logits: torch.Tensor, inv_temperature: torch.Tensor, keys: torch.Tensor,
                  greedy: torch.Tensor) -> torch.Tensor:
    """Same contract as sample_ref; logits [B, V] of any float dtype with unit stride along V.

    Each row is cut into as many pieces as keep every SM busy (two programs per SM), whole tiles each; the
    pieces' winners are merged by one argmax over [B, pieces] (the first piece wins ties: lowest id)."""
    batch, vocab = logits.shape
    if batch == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    tiles = triton.cdiv(vocab, TILE)
    pieces = max(1, min(tiles, triton.cdiv(2 * num_sms(logits.device), batch)))
    span = triton.cdiv(tiles, pieces) * TILE
    pieces = triton.cdiv(vocab, span)
    values = torch.empty(batch, pieces, dtype=torch.float32, device=logits.device)
    ids = torch.empty(batch, pieces, dtype=torch.int32, device=logits.device)
    _sample_kernel[(batch, pieces)](logits, inv_temperature.float().contiguous(), keys.contiguous(),
                                    greedy.to(torch.int32), values, ids, vocab, logits.stride(0), span,
                                    TILE=TILE, num_warps=4)
    return ids.gather(1, values.argmax(dim=1, keepdim=True)).squeeze(1).long()


def sample(logits: torch.Tensor, inv_temperature: torch.Tensor, keys: torch.Tensor,
           greedy: torch.Tensor) -> torch.Tensor:
    if logits.is_cuda:
        return sample_triton(logits, inv_temperature, keys, greedy)
    return sample_ref(logits, inv_temperature, keys, greedy)
