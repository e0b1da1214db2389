"""The state of one request inside the engine."""
from __future__ import annotations

from enum import Enum, auto

from ccserve.engine.outputs import TokenLogprob
from ccserve.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Tokens, KV blocks and progress of one request.

    num_computed_tokens counts tokens whose KV is in the cache. A running sequence is a decode when exactly
    one token is uncomputed; preemption by recompute resets num_computed_tokens to 0 and keeps the tokens.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.lora: str | None = None        # the LoRA adapter's name (docs/lora.md), None: the base model
        self.swap_owner: int | None = None  # the engine's number for its swapped KV (engine/swapper.py)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        # Public prefix blocks (kv/prefix_cache.py) the prompt starts with: matched once, when the request is
        # added; the scheduler puts them first in block_ids whenever it admits the request.
        self.shared_block_ids: list[int] = []
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.detokenizer = None
        self.stop_token_ids: frozenset[int] = frozenset(params.stop_token_ids)
        self.num_sent_tokens = 0
        self.num_sent_chars = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def append_tokens(self, tokens: list[int]) -> None:
        """New output tokens; outputs hand out output_token_ids itself, so it is only ever appended to."""
        self.token_ids.extend(tokens)
        self.output_token_ids.extend(tokens)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
