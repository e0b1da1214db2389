"""Bad requests get the right status and an OpenAI error body; overload and shutdown get 429/503 with
Retry-After; none of it is ever a 500."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from ccserve.server.api import MAX_BODY_BYTES
from tests.server.conftest import MODEL, LiveServer, start_server, wait_until

PROMPT = "Hello there"
CHAT = [{"role": "user", "content": "Hi"}]


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


BAD_COMPLETIONS = [
    ({"prompt": PROMPT, "model": "gpt-4"}, 404, "model_not_found", "model"),
    ({"prompt": PROMPT, "n": 2}, 400, "unsupported", "n"),
    ({"prompt": [PROMPT, PROMPT]}, 400, "unsupported", "prompt"),
    ({"prompt": PROMPT, "presence_penalty": 0.5}, 400, "unsupported", "presence_penalty"),
    ({"prompt": PROMPT, "frequency_penalty": -1}, 400, "unsupported", "frequency_penalty"),
    ({"prompt": PROMPT, "echo": True}, 400, "unsupported", "echo"),
    ({"prompt": PROMPT, "best_of": 3}, 400, "unsupported", "best_of"),
    ({"prompt": PROMPT, "logit_bias": {"5": 1.0}}, 400, "unsupported", "logit_bias"),
    ({"prompt": PROMPT, "temperature": -0.5}, 400, "invalid_value", None),
    ({"prompt": PROMPT, "top_p": 0}, 400, "invalid_value", None),
    ({"prompt": PROMPT, "top_k": -2}, 400, "invalid_value", None),
    ({"prompt": PROMPT, "min_p": 1.5}, 400, "invalid_value", None),
    ({"prompt": PROMPT, "max_tokens": 0}, 400, "invalid_value", None),
    ({"prompt": PROMPT, "stop": [""]}, 400, "invalid_value", None),
    ({"prompt": PROMPT, "logprobs": 6}, 400, "invalid_value", "logprobs"),
    ({"prompt": PROMPT, "seed": -1}, 400, "invalid_value", "seed"),
    ({"prompt": PROMPT, "max_tokens": "many"}, 400, "invalid_value", "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 256}, 400, "context_length_exceeded", "prompt"),
    ({"prompt": "word " * 300}, 400, "context_length_exceeded", "prompt"),
    ({"prompt": ""}, 400, "invalid_value", None),
    ({"prompt": []}, 400, "invalid_value", None),
    ({"prompt": [100000]}, 400, "invalid_value", None),
    ({"prompt": [-1]}, 400, "invalid_value", "prompt"),
    ({}, 400, "invalid_value", "prompt"),
    ({"prompt": {"text": PROMPT}}, 400, "invalid_value", "prompt"),
]


@pytest.mark.parametrize("body,status,code,param", BAD_COMPLETIONS)
def test_bad_completion_requests(server: LiveServer, body: dict, status: int, code: str, param: str | None) -> None:
    assert_openai_error(httpx.post(f"{server.base_url}/v1/completions", json=body), status, code, param)


BAD_CHATS = [
    ({"messages": []}, 400, "invalid_value", "messages"),
    ({"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "invalid_value", "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "invalid_value",
     None),
    ({"messages": CHAT, "max_completion_tokens": 1000}, 400, "context_length_exceeded", "messages"),
    ({"messages": CHAT, "top_logprobs": 2}, 400, "unsupported", "top_logprobs"),
    ({"messages": CHAT, "top_logprobs": 21, "logprobs": True}, 400, "invalid_value", "top_logprobs"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported", "tools"),
    ({"messages": CHAT, "response_format": {"type": "json_object"}}, 400, "unsupported", "response_format"),
    ({"messages": CHAT, "model": "other"}, 404, "model_not_found", "model"),
]


@pytest.mark.parametrize("body,status,code,param", BAD_CHATS)
def test_bad_chat_requests(server: LiveServer, body: dict, status: int, code: str, param: str | None) -> None:
    assert_openai_error(httpx.post(f"{server.base_url}/v1/chat/completions", json=body), status, code, param)


@pytest.mark.parametrize("content,content_type", [
    (b"{not json", "application/json"),
    (b'{"prompt": "x", "temperature": NaN}', "application/json"),
    (b'{"prompt": "x", "max_tokens": Infinity}', "application/json"),
    (b"[1, 2]", "application/json"),
    (b"prompt=hello", "application/x-www-form-urlencoded"),
    (b"", "application/json"),
])
def test_malformed_bodies(server: LiveServer, content: bytes, content_type: str) -> None:
    r = httpx.post(f"{server.base_url}/v1/completions", content=content, headers={"content-type": content_type})
    assert_openai_error(r, 400)


def test_chat_content_parts_are_joined(server: LiveServer) -> None:
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    r = httpx.post(f"{server.base_url}/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": parts}], "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_chat_without_template(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server.engine.tokenizer, "chat_template", None)
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json={"messages": CHAT})
    assert "chat template" in assert_openai_error(r, 400, "no_chat_template")["message"]


def test_body_too_large(server: LiveServer) -> None:
    big = b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}'
    url = f"{server.base_url}/v1/completions"
    headers = {"content-type": "application/json"}
    assert_openai_error(httpx.post(url, content=big, headers=headers), 413, "request_too_large")
    chunked = (big[i:i + 2**20] for i in range(0, len(big), 2**20))  # no Content-Length: counted while read
    assert_openai_error(httpx.post(url, content=chunked, headers=headers), 413, "request_too_large")


def test_unknown_route_and_method(server: LiveServer) -> None:
    assert_openai_error(httpx.get(f"{server.base_url}/v1/engines"), 404)
    assert_openai_error(httpx.get(f"{server.base_url}/v1/completions"), 405)


def test_openai_client_raises_typed_errors(server: LiveServer) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=CHAT, n=3)
    assert err.value.code == "unsupported"


@pytest.fixture
def small_server(tiny_model_path: Path) -> Iterator[LiveServer]:
    """Admits one unfinished request: max_num_seqs 1 plus a waiting queue of 0."""
    live = start_server(tiny_model_path, max_queue=0, max_model_len=256, max_num_seqs=1, num_gpu_blocks=32)
    yield live
    live.stop()


def test_queue_full_then_shutdown(small_server: LiveServer) -> None:
    url = f"{small_server.base_url}/v1/completions"
    long = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as holder, holder.stream("POST", url, json=long) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()  # kept referenced: dropping it would close the stream
        assert next(lines).startswith("data: ")  # admitted and generating
        r = httpx.post(url, json={"prompt": PROMPT, "max_tokens": 2})
        assert_openai_error(r, 429, "queue_full")
        assert r.headers["retry-after"] == "1"
    small_server.wait_idle()
    assert httpx.post(url, json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200

    engine = small_server.async_engine
    asyncio.run_coroutine_threadsafe(engine.close(), engine._loop).result(timeout=30)
    wait_until(lambda: not engine.healthy, 10, "engine to stop")
    r = httpx.post(url, json={"prompt": PROMPT, "max_tokens": 2})
    assert_openai_error(r, 503, "shutting_down")
    assert int(r.headers["retry-after"]) > 0
    assert_openai_error(httpx.get(f"{small_server.base_url}/health"), 503)


def test_error_bodies_are_json_objects(server: LiveServer) -> None:
    r = httpx.post(f"{server.base_url}/v1/completions", content=b"{", headers={"content-type": "application/json"})
    assert r.headers["content-type"].startswith("application/json")
    assert json.loads(r.text)["error"]["code"] == "invalid_json"
