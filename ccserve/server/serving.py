"""The two generation endpoints: an OpenAI request becomes prompt token ids plus SamplingParams, and the
engine's outputs become one JSON response or a stream of server-sent events.

Prompts are tokenized here rather than in the engine so that the context-length check can answer with
OpenAI's `context_length_exceeded` and so that chat prompts are encoded without a second BOS (the chat
template already writes the special tokens). Tokenizing runs on a worker thread: a megabyte prompt must not
stall every other client's stream on the event loop.

Every admitted request is owned by a _Job, and every path out of a handler ends it: a client that
disconnects (mid-stream, or while a non-streaming request is still generating) aborts its request in the
engine, which frees and scrubs its KV blocks at once.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from ccserve.engine.outputs import RequestOutput, TokenLogprob
from ccserve.sampling_params import SamplingParams
from ccserve.server import protocol as p
from ccserve.server.async_engine import AsyncEngine, EngineClosed, EngineError, RequestStream
from ccserve.server.errors import ApiError, engine_failure, engine_failure_response, error_body
from ccserve.server.metrics import ServerMetrics

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to all the room left
MIN_LOGPROB = -9999.0
T = TypeVar("T")


class _Job:
    """One admitted request: its stream, its timings, and how it ended (for the metrics)."""

    def __init__(self, endpoint: str, stream: RequestStream, metrics: ServerMetrics, model: str) -> None:
        self.endpoint = endpoint
        self.model = model  # what responses name: the served model, or the LoRA adapter the request chose
        self.stream = stream
        self.metrics = metrics
        self.start = time.monotonic()
        self.first_token: float | None = None
        self.outcome = "abort"  # until it finishes, a job that ends was abandoned by its client
        self.ended = False

    def observe(self, out: RequestOutput) -> None:
        if self.first_token is None and out.new_token_ids:
            self.first_token = time.monotonic()
            self.metrics.observe_ttft(self.first_token - self.start)
        if out.finished:
            self.outcome = finish_reason(out)
            self.metrics.observe_e2e(time.monotonic() - self.start)

    def end(self) -> None:
        """Idempotent: abort the request unless it finished, and count how it ended."""
        if not self.ended:
            self.ended = True
            self.stream.close()
            self.metrics.count(self.endpoint, self.outcome)


def finish_reason(out: RequestOutput) -> str:
    return "length" if out.finish_reason == "length" else "stop"


def finite(logprob: float) -> float:
    """-inf (a token masked by top-k/top-p) and NaN as MIN_LOGPROB: JSON has neither."""
    return logprob if logprob >= MIN_LOGPROB else MIN_LOGPROB


def usage(out: RequestOutput) -> p.Usage:
    n_prompt, n_out = len(out.prompt_token_ids), len(out.token_ids)
    return p.Usage(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out)


def sse(payload: BaseModel | dict) -> str:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


def sse_failure(exc: EngineError | EngineClosed) -> str:
    """A mid-stream failure, said as the non-streaming response would say it (the status line is gone)."""
    status, message, code = engine_failure(exc)
    return sse(error_body(status, message, code=code))


class EventStream(StreamingResponse):
    """Server-sent events that end their job however the response ends (finished, failed or disconnected),
    even when the client leaves before the body iterator was ever started."""

    def __init__(self, content: AsyncIterator[str], job: _Job) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.end()


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await work unless the client disconnects first; then cancel it and return None.

    uvicorn does not cancel a handler whose client left, so without this a non-streaming request would keep
    generating, holding KV blocks, for nobody.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        task.cancel()
    return task.result() if task in done else None


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, model_name: str, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len: int = engine.engine.max_model_len
        self.model_name = model_name
        self.metrics = metrics
        self.adapters: list[str] = list(engine.engine.lora_names)
        if model_name in self.adapters:
            raise ValueError(f"LoRA adapter name {model_name!r} is also the served model's name: rename the adapter "
                             "(--lora NAME=DIR) so that the model field can tell them apart")

    # ---- /v1/completions -----------------------------------------------------------------------------

    async def completion(self, req: p.CompletionRequest, request: Request) -> Response:
        lora = self._check(req)
        prompt = req.single_prompt()
        if isinstance(prompt, str):
            prompt_ids = await asyncio.to_thread(self._encode, prompt, True)
        else:
            prompt_ids = list(prompt)
        params = self._params(req, len(prompt_ids), req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, req.logprobs,
                              "prompt")
        job = await self._admit("completions", prompt_ids, params, lora)
        if req.stream:
            return EventStream(self._completion_events(job, req), job)
        out = await until_disconnected(request, self._collect(job))
        if isinstance(out, BaseException):
            return engine_failure_response(out)
        if out is None:
            return Response(status_code=499)
        lps = self._completion_logprobs(out.logprobs, 0) if req.logprobs is not None else None
        choice = p.CompletionChoice(text=out.text, logprobs=lps, finish_reason=finish_reason(out))
        body = p.CompletionResponse(id=f"cmpl-{job.stream.request_id}", model=job.model, choices=[choice],
                                    usage=usage(out))
        return JSONResponse(body.model_dump())

    async def _completion_events(self, job: _Job, req: p.CompletionRequest) -> AsyncIterator[str]:
        rid = f"cmpl-{job.stream.request_id}"
        try:
            async for out in job.stream:
                job.observe(out)
                if not (out.new_text or out.new_logprobs or out.finished):
                    continue
                lps = None
                if req.logprobs is not None:
                    lps = self._completion_logprobs(out.new_logprobs, len(out.text) - len(out.new_text))
                choice = p.CompletionChoice(text=out.new_text, logprobs=lps,
                                            finish_reason=finish_reason(out) if out.finished else None)
                yield sse(p.CompletionResponse(id=rid, model=job.model, choices=[choice]))
            if req.stream_options and req.stream_options.include_usage:
                yield sse(p.CompletionResponse(id=rid, model=job.model, choices=[], usage=usage(out)))
        except (EngineError, EngineClosed) as exc:
            job.outcome = "error"
            yield sse_failure(exc)
        yield "data: [DONE]\n\n"

    # ---- /v1/chat/completions ------------------------------------------------------------------------

    async def chat(self, req: p.ChatCompletionRequest, request: Request) -> Response:
        lora = self._check(req)
        prompt_ids = await asyncio.to_thread(self._chat_prompt, req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(req, len(prompt_ids), max_tokens, None, top, "messages")
        job = await self._admit("chat_completions", prompt_ids, params, lora)
        if req.stream:
            return EventStream(self._chat_events(job, req), job)
        out = await until_disconnected(request, self._collect(job))
        if isinstance(out, BaseException):
            return engine_failure_response(out)
        if out is None:
            return Response(status_code=499)
        choice = p.ChatChoice(message=p.AssistantMessage(content=out.text), finish_reason=finish_reason(out),
                              logprobs=self._chat_logprobs(out.logprobs) if req.logprobs else None)
        body = p.ChatCompletionResponse(id=f"chatcmpl-{job.stream.request_id}", model=job.model,
                                        choices=[choice], usage=usage(out))
        return JSONResponse(body.model_dump())

    async def _chat_events(self, job: _Job, req: p.ChatCompletionRequest) -> AsyncIterator[str]:
        def chunk(delta: p.Delta, **kwargs) -> str:
            choice = p.ChatChunkChoice(delta=delta, **kwargs)
            return sse(p.ChatCompletionChunk(id=rid, model=job.model, choices=[choice]))

        rid = f"chatcmpl-{job.stream.request_id}"
        yield chunk(p.Delta(role="assistant", content=""))
        try:
            async for out in job.stream:
                job.observe(out)
                if not (out.new_text or out.new_logprobs or out.finished):
                    continue
                lps = self._chat_logprobs(out.new_logprobs) if req.logprobs else None
                yield chunk(p.Delta(content=out.new_text), logprobs=lps,
                            finish_reason=finish_reason(out) if out.finished else None)
            if req.stream_options and req.stream_options.include_usage:
                yield sse(p.ChatCompletionChunk(id=rid, model=job.model, choices=[], usage=usage(out)))
        except (EngineError, EngineClosed) as exc:
            job.outcome = "error"
            yield sse_failure(exc)
        yield "data: [DONE]\n\n"

    def _chat_prompt(self, req: p.ChatCompletionRequest) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions with a "
                           "plain prompt", param="messages", code="no_chat_template")
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - templates raise what they like; the cause is the messages
            raise ApiError(400, "the model's chat template rejected these messages: check the order of roles",
                           param="messages") from None
        return self._encode(text, add_special_tokens=False)

    # ---- shared --------------------------------------------------------------------------------------

    def _check(self, req: p.CompletionRequest | p.ChatCompletionRequest) -> str | None:
        """Refuse what cannot be served; returns the LoRA adapter the model field selects (None: the base model)."""
        if req.model is not None and req.model != self.model_name and req.model not in self.adapters:
            served = ", ".join(repr(n) for n in [self.model_name, *self.adapters])
            raise ApiError(404, f"model not found: the model field must name one this server serves: {served}",
                           param="model", code="model_not_found")
        unsupported = req.unsupported()
        if unsupported is not None:
            raise ApiError(400, unsupported[1], param=unsupported[0], code="unsupported")
        return req.model if req.model in self.adapters else None

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _params(self, req: p.CompletionRequest | p.ChatCompletionRequest, prompt_len: int, max_tokens: int | None,
                default_max: int | None, logprobs: int | None, prompt_param: str) -> SamplingParams:
        """SamplingParams for the request, after checking that prompt + max_tokens fit in the context."""
        room = self.max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = max(1, min(default_max, room) if default_max is not None else room)
        given = dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                     seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids)
        try:
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=req.ignore_eos, logprobs=logprobs,
                                    **{k: v for k, v in given.items() if v is not None})
        except ValueError as exc:
            raise ApiError(400, str(exc), code="invalid_value") from None
        if prompt_len + params.max_tokens > self.max_model_len:
            raise ApiError(400, f"this model's maximum context length is {self.max_model_len} tokens, but the "
                           f"request has {prompt_len} prompt tokens and asks for {params.max_tokens} more: "
                           "shorten the prompt or lower max_tokens", param=prompt_param,
                           code="context_length_exceeded")
        return params

    async def _admit(self, endpoint: str, prompt_ids: list[int], params: SamplingParams, lora: str | None) -> _Job:
        try:
            stream = await self.engine.add(uuid.uuid4().hex, prompt_ids, params, lora)
        except ValueError as exc:
            raise ApiError(400, str(exc), code="invalid_value") from None
        return _Job(endpoint, stream, self.metrics, lora or self.model_name)

    async def _collect(self, job: _Job) -> RequestOutput | EngineError | EngineClosed:
        """The finished output, or the engine failure that ended the request."""
        try:
            async for out in job.stream:
                job.observe(out)
            return out
        except (EngineError, EngineClosed) as exc:
            job.outcome = "error"
            return exc
        finally:
            job.end()

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

    def _completion_logprobs(self, lps: list[TokenLogprob] | None, offset: int) -> p.CompletionLogprobs:
        result = p.CompletionLogprobs()
        for lp in lps or []:
            token = self._token(lp.token_id)
            result.tokens.append(token)
            result.token_logprobs.append(finite(lp.logprob))
            result.top_logprobs.append({self._token(t): finite(v) for t, v in lp.top.items()})
            result.text_offset.append(offset)
            offset += len(token)
        return result

    def _chat_logprobs(self, lps: list[TokenLogprob] | None) -> p.ChatLogprobs:
        def entry(token_id: int, logprob: float) -> dict:
            token = self._token(token_id)
            return dict(token=token, logprob=finite(logprob), bytes=list(token.encode()))

        return p.ChatLogprobs(content=[
            p.ChatTokenLogprob(**entry(lp.token_id, lp.logprob),
                               top_logprobs=[p.TopLogprob(**entry(t, v)) for t, v in lp.top.items()])
            for lp in lps or []])

