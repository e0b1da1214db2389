"""The offline facade: `LLM(model=...).generate(prompts, params)`, batched through the engine."""
from __future__ import annotations

import uuid
from collections.abc import Sequence as Seq

from tqdm import tqdm

from ccserve.config import EngineConfig
from ccserve.engine.llm_engine import LLMEngine
from ccserve.engine.outputs import RequestOutput
from ccserve.sampling_params import SamplingParams


class LLM:
    """Generate for many prompts at once; every EngineConfig field is a keyword argument."""

    def __init__(self, model: str, **kwargs) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))

    def close(self) -> None:
        """End the engine's tensor-parallel workers and zeroize its channels' keys now (workers also end when
        this process exits)."""
        self.engine.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False, lora: str | None | Seq[str | None] = None) -> list[RequestOutput]:
        """Prompts are strings or token-id lists; returns one finished output per prompt, in order. lora names
        the configured LoRA adapter to generate with (one for all prompts, or one per prompt; None: the base
        model)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        loras = [lora] * len(prompts) if lora is None or isinstance(lora, str) else list(lora)
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(loras)} LoRA adapter names")
        ids = [uuid.uuid4().hex for _ in prompts]
        try:
            for rid, prompt, p, name in zip(ids, prompts, params, loras):
                self.engine.add_request(rid, prompt, p, lora=name)
            return self._run(ids, use_tqdm)
        finally:
            for rid in ids:
                self.engine.abort_request(rid)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [results[rid] for rid in ids]
