"""Privacy-safe logging for the server: an allowlist of what may become a log line, applied to every record
the process creates.

Our own code (loggers under `ccserve`) logs only aggregates and exception types, by review. Third-party
loggers (uvicorn, starlette, transformers, asyncio, Python warnings, ...) are not ours to review, so their
records keep their text only when the message template is one of ALLOWED_TEMPLATES; any other record is
reduced to its logger, level and exception type. Tracebacks are never kept: frames quote source lines and
exception messages, and either may carry request content. The allowlist is applied by the log record
factory rather than by a handler filter, so it also covers handlers that libraries attach to their own
non-propagating loggers. uvicorn's access log is off (it prints paths, query strings and client addresses).
"""
from __future__ import annotations

import logging
import sys

# uvicorn's lifecycle lines, matched on the unformatted template (record.msg), so arguments cannot sneak in
# text: every argument of these is a pid, a host/port the operator chose, or nothing.
ALLOWED_TEMPLATES = frozenset({
    "Started server process [%d]",
    "Waiting for application startup.",
    "Application startup complete.",
    "Uvicorn running on %s://%s:%d (Press CTRL+C to quit)",
    "Uvicorn running on %s://[%s]:%d (Press CTRL+C to quit)",
    "Shutting down",
    "Waiting for application shutdown.",
    "Application shutdown complete.",
    "Finished server process [%d]",
    "Waiting for connections to close. (CTRL+C to force quit)",
    "Waiting for background tasks to complete. (CTRL+C to force quit)",
})
WITHHELD = "record withheld by the privacy allowlist"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def sanitize(record: logging.LogRecord) -> logging.LogRecord:
    """Apply the allowlist to a record, in place: strip its traceback, withhold its text unless allowed."""
    exc_type = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    ours = record.name == "ccserve" or record.name.startswith("ccserve.")
    if not ours and not (isinstance(record.msg, str) and record.msg in ALLOWED_TEMPLATES):
        record.msg, record.args = WITHHELD, None
    if exc_type is not None:
        record.msg = f"{record.msg} [exception type: {exc_type}]"
    return record


def configure_logging(level: str = "info") -> None:
    """Process-wide: every record sanitized when created, one stderr handler on the root logger, Python
    warnings routed through logging (and so withheld), uvicorn's own handlers and access log removed.

    uvicorn must then run with log_config=None and access_log=False so that it adds no handlers back.
    """
    make_record = logging.getLogRecordFactory()
    logging.setLogRecordFactory(lambda *args, **kwargs: sanitize(make_record(*args, **kwargs)))
    logging.captureWarnings(True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    disable_access_log()


def disable_access_log() -> None:
    """uvicorn's access log prints paths, query strings and client addresses; it stays off even when some
    handler (a test harness, say) is attached to it."""
    logging.getLogger("uvicorn.access").disabled = True
