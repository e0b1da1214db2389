"""Running the relay, the gateway and the issuer under uvicorn, with nothing logged per request.

uvicorn's access log (client addresses, paths) is off, and so are its Server and Date headers and its
X-Forwarded-For handling; its own lifecycle lines go to stderr at warning level. The listening line is printed
on stdout with the bound port, so a supervisor (or a test) that asked for port 0 learns the real one.
"""
from __future__ import annotations

import logging
import sys
import threading
import time

import httpx
import uvicorn

from ccserve.listen import bind, url_of


def _server(app, log_level: str = "warning") -> uvicorn.Server:
    config = uvicorn.Config(app, access_log=False, log_config=None, log_level=log_level, server_header=False,
                            date_header=False, proxy_headers=False, timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


class _NoTracebacks(logging.Filter):
    """uvicorn logs an exception escaping the app with its traceback; frames and messages could quote a request,
    so only the exception's type is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None:
            record.msg, record.args = f"{record.getMessage()} [exception type: {record.exc_info[0].__name__}]", None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def run(app, host: str, port: int, name: str) -> None:
    """Serve `app` until interrupted, printing `ccserve NAME: listening on URL` once bound."""
    for logger in ("uvicorn.error", "uvicorn", "starlette", "httpx", "httpcore"):
        logging.getLogger(logger).addFilter(_NoTracebacks())
    sock = bind(host, port)
    print(f"ccserve {name}: listening on {url_of(sock)}", flush=True)
    _server(app).run(sockets=[sock])


def http_client(timeout: float = 300.0) -> httpx.AsyncClient:
    """An HTTP client that sends no header of its own beyond Host and Content-Length: no User-Agent, no
    Accept-Encoding; whatever goes upstream is what the caller puts there."""
    client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=5.0), follow_redirects=False)
    for name in list(client.headers):
        del client.headers[name]
    return client


class BackgroundServer:
    """`app` served on a thread of this process (tests, embedding): .url once started, .stop() to end it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        self._sock = bind(host, port)
        self.url = url_of(self._sock)
        self._server = _server(app)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self, timeout: float = 10.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class BodyTooLarge(Exception):
    pass


async def read_limited(request, limit: int) -> bytes:
    """A Starlette request's body, refused (BodyTooLarge) past `limit` bytes without buffering the rest."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"request body is larger than {limit} bytes")
    return bytes(body)


def log(name: str, message: str) -> None:
    """An operator-facing line on stderr (startup facts and aggregates only, never request data)."""
    print(f"ccserve {name}: {message}", file=sys.stderr, flush=True)
