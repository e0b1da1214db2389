"""What the engine reports about a request after each step (the server and LLM facade consume this)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ccserve.secure.totals import CryptoTotals


@dataclass
class TokenLogprob:
    """Log-probability of one generated token and, if asked for, of the top alternatives."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class RequestOutput:
    """A request's state after a step: everything so far, plus the delta since its previous output.

    prompt_token_ids, token_ids and logprobs are the engine's own lists, shared rather than copied so that a
    step costs nothing per token already generated: they only grow, and a consumer must not modify them.

    finish_reason: "stop" (EOS, stop token or stop string), "length" (max_tokens or max_model_len) or "abort".
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    new_logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0


@dataclass
class EngineStats:
    """Aggregate counters only: nothing here may identify a request or carry its content."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    kv_capacity_tokens: int = 0     # tokens the KV cache holds in its format (blocks * block_size)
    kv_format_compression: float = 1.0  # model-dtype KV bytes per token over the --kv-format's (scales included)
    kv_kept_share: float = 1.0      # --kv-sparsity: share of the running requests' cached (token, head) entries kept
    lora_loads: int = 0             # LoRA adapters moved into the GPU adapter cache
    lora_hits: int = 0              # batches' adapters found already resident
    num_public_prefix_blocks: int = 0   # KV blocks the public prefix cache holds for the process lifetime
    prefix_cache_hits: int = 0          # admissions that started from public prefix blocks
    prefix_cache_tokens_saved: int = 0  # prompt tokens those admissions did not compute
    crypto: CryptoTotals = field(default_factory=CryptoTotals)   # all channels (--cc): bytes, predictions, waits
