"""Drive the synchronous, single-threaded LLMEngine from asyncio, so that every client shares one batch.

One dedicated thread owns the engine: it is the only caller of add_request, abort_request, step and stats.
Request handlers on the event loop never touch the engine; they post commands (add, abort) to a queue that
the engine thread drains before each step, and get their outputs back through a per-request asyncio.Queue
filled with `loop.call_soon_threadsafe` (one callback per step, not per token). When no request is
unfinished the thread sleeps on an Event, so an idle server burns no CPU.

A failing step must not take the server down: the requests it carried are failed with EngineError, the
others keep going, and only the exception's type is logged (its message may quote request content).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from ccserve.engine.outputs import EngineStats, RequestOutput
from ccserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ccserve.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

STATS_LOG_INTERVAL_S = 10.0


class QueueFull(Exception):
    """More requests are unfinished than the server admits; the client should retry later (429)."""


class EngineClosed(Exception):
    """The server is shutting down (503)."""


class EngineError(Exception):
    """The engine failed while running this request; other requests are unaffected (500)."""


_ADMITTED = object()


class RequestStream:
    """Outputs of one admitted request, in order. close() aborts the request unless it already finished.

    Whoever gets a stream from AsyncEngine.add must close it (the handlers do so in `finally`), so a client
    that goes away frees its KV blocks at once instead of when its max_tokens run out.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue) -> None:
        self._engine = engine
        self._queue = queue
        self.request_id = request_id
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    """The asyncio face of one engine. Admits at most `max_num_seqs + max_queue` unfinished requests."""

    def __init__(self, engine: LLMEngine, max_queue: int = 1024) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.capacity = engine.config.max_num_seqs + max_queue
        self.stats: EngineStats = engine.stats()
        self.closed = False
        self._queues: dict[str, asyncio.Queue] = {}  # event-loop side: requests still unfinished
        self._live: set[str] = set()  # engine-thread side: requests the engine holds
        self._commands: deque[tuple] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._last_log = (time.monotonic(), self.stats)

    # ---- event-loop side -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will serve requests."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="ccserve-engine", daemon=True)
        self._thread.start()

    @property
    def num_unfinished(self) -> int:
        return len(self._queues)

    @property
    def healthy(self) -> bool:
        return not self.closed and self._thread is not None and self._thread.is_alive()

    async def add(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                  lora: str | None = None) -> RequestStream:
        """Admit a request (through the LoRA adapter `lora`, if given) and return its stream once the engine
        accepted it.

        Raises QueueFull, EngineClosed, or the engine's ValueError (a bad request, in a sentence).
        """
        if self.closed:
            raise EngineClosed()
        if len(self._queues) >= self.capacity:
            raise QueueFull()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._submit(("add", request_id, prompt, params, lora))
        try:
            first = await queue.get()
        except BaseException:
            self.abort(request_id)
            raise
        if isinstance(first, BaseException):
            raise first
        return RequestStream(self, request_id, queue)

    def abort(self, request_id: str) -> None:
        """Forget a request here and tell the engine to drop it (no-op there if it already finished)."""
        if self._queues.pop(request_id, None) is not None:
            self._submit(("abort", request_id))

    async def close(self) -> None:
        """Refuse new requests, fail unfinished ones, and stop the engine thread (it aborts what it holds)."""
        self.closed = True
        for queue in self._queues.values():
            queue.put_nowait(EngineClosed())
        self._queues.clear()
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    def _submit(self, command: tuple) -> None:
        self._commands.append(command)
        self._wake.set()

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        """Runs on the loop: hand each item to its request's queue; a final item retires the request."""
        for request_id, item in items:
            queue = self._queues.get(request_id)
            if queue is None:
                continue  # the client went away; its abort is on the way to the engine
            queue.put_nowait(item)
            if isinstance(item, BaseException) or (isinstance(item, RequestOutput) and item.finished):
                del self._queues[request_id]

    # ---- engine-thread side --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            if not self._commands and not self.engine.has_unfinished_requests():
                self.stats = self.engine.stats()
                self._wake.wait()
            self._wake.clear()
            items: list[tuple[str, object]] = []
            try:
                self._drain(items)
                if self.engine.has_unfinished_requests() and not self._stopping:
                    self._step(items)
            except Exception as exc:  # noqa: BLE001 - the thread must survive anything the engine raises
                logger.error("engine loop failed (%s); failing all its requests", type(exc).__name__)
                self._fail(list(self._live), items)
            self.stats = self.engine.stats()
            self._post(items)
            self._log_stats()
        self._drain([])
        for request_id in list(self._live):
            self.engine.abort_request(request_id)
        self.stats = self.engine.stats()

    def _drain(self, items: list[tuple[str, object]]) -> None:
        while self._commands:
            op, request_id, *args = self._commands.popleft()
            if op == "abort":
                self._live.discard(request_id)
                self.engine.abort_request(request_id)
                continue
            try:
                self.engine.add_request(request_id, *args)
            except ValueError as exc:
                items.append((request_id, exc))
                continue
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail the others
                logger.error("engine refused a request (%s)", type(exc).__name__)
                items.append((request_id, EngineError()))
                continue
            self._live.add(request_id)
            items.append((request_id, _ADMITTED))

    def _step(self, items: list[tuple[str, object]]) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001
            # The engine ends the requests of a failed batch itself (dropping them from engine.requests);
            # if it ended none, end all, or the same step would fail again forever.
            failed = [r for r in self._live if r not in self.engine.requests] or list(self._live)
            logger.error("engine step failed (%s); failing %d requests", type(exc).__name__, len(failed))
            self._fail(failed, items)
            return
        for out in outputs:
            if out.finished:
                self._live.discard(out.request_id)
            items.append((out.request_id, out))

    def _fail(self, request_ids: list[str], items: list[tuple[str, object]]) -> None:
        for request_id in request_ids:
            self._live.discard(request_id)
            try:
                self.engine.abort_request(request_id)
            except Exception:  # noqa: BLE001 - keep failing the others
                pass
            items.append((request_id, EngineError()))

    def _log_stats(self) -> None:
        """While busy, one aggregate line every STATS_LOG_INTERVAL_S: counts and rates, nothing per request."""
        now, (then, before) = time.monotonic(), self._last_log
        if now - then < STATS_LOG_INTERVAL_S:
            return
        s, elapsed = self.stats, now - then
        logger.info("running %d, waiting %d, KV blocks free %d/%d, prompt %.1f tok/s, generation %.1f tok/s, "
                    "preemptions %d", s.num_running, s.num_waiting, s.num_free_blocks, s.num_total_blocks,
                    (s.prompt_tokens_total - before.prompt_tokens_total) / elapsed,
                    (s.generation_tokens_total - before.generation_tokens_total) / elapsed,
                    s.num_preemptions - before.num_preemptions)
        self._last_log = (now, s)

    def _post(self, items: list[tuple[str, object]]) -> None:
        if not items or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, items)
        except RuntimeError:  # the loop closed under us: nobody is left to read these
            pass
