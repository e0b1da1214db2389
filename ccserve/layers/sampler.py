"""Token sampling on the device: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Nothing here reads a tensor value on the host, so the step never waits for the GPU inside the sampler.
Which work a batch needs (a sort, logprobs, any random sampling at all) is decided on the host from the
requests' parameters when the batch is built; the common all-greedy batch is a single argmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ccserve.kernels.sampling import row_keys, sample
from ccserve.sampling_params import SamplingParams


@dataclass
class SamplingBatch:
    """Per-row settings of one step as device tensors, plus host flags that choose the code path.

    top_k is 0 where disabled. Greedy rows carry temperature 1 so that dividing all rows is harmless (their
    token comes from the argmax of the raw logits). seeds: the request's seed where it set one, else a fresh
    random one per batch (drawn from torch's host generator, which the engine seeds). max_logprobs is None
    when no row asks for logprobs, else the largest number of alternatives any row asks for (0: only the
    sampled token's logprob).
    """

    temperatures: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    greedy: torch.Tensor
    seeds: torch.Tensor
    all_greedy: bool
    need_top_k: bool
    need_top_p: bool
    need_min_p: bool
    max_logprobs: int | None

    @classmethod
    def build(cls, params: list[SamplingParams], device: torch.device | str) -> SamplingBatch:
        """Two host->device copies: the float fields packed in one float32 tensor (top_k goes through float32
        exactly: vocabularies are far below 2**24 tokens), the seeds in one int64 tensor."""
        sampled = [p for p in params if not p.greedy]
        packed = torch.tensor([[p.temperature if not p.greedy else 1.0 for p in params],
                               [p.top_k for p in params], [p.top_p for p in params],
                               [p.min_p for p in params], [p.greedy for p in params]], dtype=torch.float32)
        fresh = torch.randint(0, 2 ** 62, (len(params),), dtype=torch.int64).tolist()
        seeds = torch.tensor([p.seed if p.seed is not None else f for p, f in zip(params, fresh)], dtype=torch.int64)
        device = torch.device(device)
        temperatures, top_k, top_p, min_p, greedy = _to_device(packed, device)
        asked = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperatures=temperatures, top_k=top_k.long(), top_p=top_p, min_p=min_p, greedy=greedy.bool(),
            seeds=_to_device(seeds, device), all_greedy=not sampled,
            need_top_k=any(p.top_k > 0 for p in sampled), need_top_p=any(p.top_p < 1 for p in sampled),
            need_min_p=any(p.min_p > 0 for p in sampled), max_logprobs=max(asked) if asked else None)


@dataclass
class SamplerOutput:
    """token_ids [B] int64; when logprobs were asked: logprobs [B] of the sampled tokens and, when any row
    wants alternatives, top_ids / top_logprobs [B, max_logprobs] in descending order."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


class Sampler:
    """Picks one token per row of last-position logits ([B, V] float32); never modifies the logits."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, positions: torch.Tensor) -> SamplerOutput:
        """positions [B]: the position of each row's last input token (keys the row's random draw)."""
        tokens = logits.argmax(dim=-1) if batch.all_greedy else _sample(logits, batch, positions)
        if batch.max_logprobs is None:
            return SamplerOutput(tokens)
        return SamplerOutput(tokens, *_logprobs(logits, tokens, batch.max_logprobs))


def _sample(logits: torch.Tensor, batch: SamplingBatch, positions: torch.Tensor) -> torch.Tensor:
    """Gumbel-max in one pass over the logits (kernels/sampling.py); rows with filters are masked first.

    min-p keeps tokens whose probability is at least min_p times the top one's, i.e. x >= max(x) + log(min_p)
    on the tempered logits: no softmax needed."""
    keys = row_keys(batch.seeds, positions)
    if not (batch.need_top_k or batch.need_top_p or batch.need_min_p):
        return sample(logits, 1.0 / batch.temperatures, keys, batch.greedy)
    x = logits / batch.temperatures.unsqueeze(1)
    if batch.need_top_k or batch.need_top_p:
        x = _top_k_top_p(x, batch.top_k if batch.need_top_k else None, batch.top_p if batch.need_top_p else None)
    if batch.need_min_p:
        floor = x.amax(dim=-1, keepdim=True) + batch.min_p.unsqueeze(1).log()
        x.masked_fill_(x < floor, float("-inf"))
    # Greedy rows keep their argmax through every filter: they need no unmasked copy.
    return sample(x, torch.ones_like(batch.temperatures), keys, batch.greedy)


def _top_k_top_p(x: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask x (in place) outside each row's top-k and nucleus, with one ascending sort for both filters.

    Top-k masks by sorted position, so exactly k tokens survive even with ties. A token stays in the nucleus
    iff the mass strictly above it is below top_p: the smallest set reaching top_p, never empty.
    """
    vocab = x.shape[-1]
    sorted_x, order = x.sort(dim=-1)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
        below = torch.arange(vocab, device=x.device) < (vocab - k).unsqueeze(1)
        sorted_x.masked_fill_(below, float("-inf"))
    if top_p is not None:
        mass_up_to = sorted_x.softmax(dim=-1).cumsum_(dim=-1)
        outside = mass_up_to <= (1 - top_p).unsqueeze(1)
        outside[:, -1] = False
        sorted_x.masked_fill_(outside, float("-inf"))
    return x.scatter_(-1, order, sorted_x)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor,
              k: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probabilities of the model's own distribution (before temperature and filters), as vLLM reports."""
    logprobs = logits.log_softmax(dim=-1)
    sampled = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if k == 0:
        return sampled, None, None
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)
    return sampled, top_ids, top_logprobs


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
