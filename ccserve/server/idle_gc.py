"""Collect garbage whenever the server goes idle, so that nothing of a finished request waits in memory for
Python's next automatic collection.

Objects caught in reference cycles (an exception of a rejected request holds its traceback, whose frames hold
the parsed body) are freed only by the cyclic collector, which may not run for minutes on a quiet server. Under
the scrubbing allocator (privacy/hardening.py) freeing them is what overwrites them. A full collection of a
heap holding torch and transformers takes tens of milliseconds, so it runs only when no request is in flight,
a moment after the last one ended, and never while requests are being served.

The standard library also memoizes request content: urllib.parse caches the last 128 URLs it split (paths and
query strings of requests, Starlette splits every one), and re caches compiled patterns. Those caches are
emptied at the same moment.
"""
from __future__ import annotations

import asyncio
import gc
import re
import urllib.parse

from starlette.types import ASGIApp, Receive, Scope, Send

IDLE_DELAY_S = 0.05


class CollectWhenIdle:
    """ASGI middleware: counts requests in flight; when the count returns to zero, schedules one gc.collect()."""

    def __init__(self, app: ASGIApp, delay_s: float = IDLE_DELAY_S) -> None:
        self.app = app
        self.delay_s = delay_s
        self.in_flight = 0
        self.collections = 0
        self._pending: asyncio.TimerHandle | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.in_flight += 1
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._pending = asyncio.get_running_loop().call_later(self.delay_s, self._collect)

    def _collect(self) -> None:
        self._pending = None
        if self.in_flight == 0:
            forget_cached_requests()
            self.collections += 1


def forget_cached_requests() -> None:
    """Empty the standard library's memo caches that can hold request text, then collect cyclic garbage."""
    urllib.parse.urlsplit.cache_clear()
    re.purge()
    gc.collect()
