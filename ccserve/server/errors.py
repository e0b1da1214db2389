"""OpenAI-format errors: `{"error": {"message", "type", "param", "code"}}`, one status per kind of mistake.

400 bad parameters, malformed JSON and schema violations alike (OpenAI answers 400 to all three; we never
answer 422), with code "context_length_exceeded" when prompt + max_tokens do not fit, as OpenAI does;
404 unknown model; 413 a request body over the size limit; 429 queue full and 503 shutting down, both
with Retry-After; 500 only for our own faults, never for client input.

No message quotes request content: validation errors name the field (only fields we declare; a key the
client made up is never echoed) and pydantic's fixed description, never the offending value.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ccserve.server import protocol
from ccserve.server.async_engine import EngineClosed, EngineError, QueueFull

logger = logging.getLogger(__name__)

RETRY_AFTER_QUEUE_FULL_S = 1
RETRY_AFTER_CLOSING_S = 5
_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """A request we refuse, with the sentence that tells the client what to change."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def engine_failure(exc: EngineError | EngineClosed) -> tuple[int, str, str]:
    """(status, message, code) for a request that was admitted and then lost its engine."""
    if isinstance(exc, EngineClosed):
        return 503, "the server is shutting down: retry on another replica or later", "shutting_down"
    return 500, "the engine failed while generating this request; other requests are unaffected: retry it", \
        "engine_error"


def engine_failure_response(exc: EngineError | EngineClosed) -> JSONResponse:
    status, message, code = engine_failure(exc)
    return error_response(status, message, code=code,
                          retry_after=RETRY_AFTER_CLOSING_S if status == 503 else None)


def _declared_fields() -> frozenset[str]:
    models = [protocol.CompletionRequest, protocol.ChatCompletionRequest, protocol.ChatMessage,
              protocol.TextPart, protocol.StreamOptions]
    return frozenset(name for model in models for name in model.model_fields)


_FIELDS = _declared_fields()


def _param(loc: tuple) -> str | None:
    """The field path of a validation error, keeping only names we declared and list indices."""
    parts = [str(p) for p in loc if isinstance(p, int) or p in _FIELDS]
    return ".".join(parts) or None


def validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return error_response(400, "the request body is not valid JSON", code="invalid_json")
    param = _param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing":
        msg = "this field is required"
    elif first.get("type") in ("model_type", "model_attributes_type", "dict_type") and not param:
        msg = "the request body must be a JSON object"
    return error_response(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI, on_rejected: Callable[[Request], None],
                           on_internal_error: Callable[[Request], None]) -> None:
    """Route every failure to an OpenAI error body; on_rejected counts refusals of generation requests."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        on_rejected(request)
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        on_rejected(request)
        return validation_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        on_rejected(request)
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        code = "request_too_large" if exc.status_code == 413 else None
        return error_response(exc.status_code, message, code=code)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        on_rejected(request)
        return error_response(429, "the server is at capacity: retry after the Retry-After interval",
                              code="queue_full", retry_after=RETRY_AFTER_QUEUE_FULL_S)

    @app.exception_handler(EngineClosed)
    async def closing(request: Request, exc: EngineClosed) -> JSONResponse:
        on_rejected(request)
        return engine_failure_response(exc)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        logger.error("internal error (%s)", type(exc).__name__)
        on_internal_error(request)
        return error_response(500, "internal server error")
