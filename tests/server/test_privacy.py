"""No request content in logs, metrics or error messages: requests carry a unique canary string, and
nothing the server writes or exposes may contain it, its token ids, or the text generated for it."""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ccserve.server.log_config import WITHHELD, sanitize
from tests.server.conftest import MODEL, LiveServer, wait_until
from tests.tiny_models import make_tokenizer

CANARY = f"CANARY{uuid.uuid4().hex[:10]}"
CLIENT_LOGGERS = ("httpx", "httpcore", "openai")  # the test's own client, not the server


def id_renderings(ids: list[int]) -> list[str]:
    """How a token-id sequence could show up in text: Python/JSON lists, commas, spaces."""
    return [", ".join(map(str, ids)), ",".join(map(str, ids)), " ".join(map(str, ids))]


def needles(outputs: list[str]) -> list[str]:
    """The canary, the token ids of prompts that carry it (with and without a leading space, as a BPE
    splits them differently), and every generated text long enough to be recognisable."""
    tok = make_tokenizer()
    found = [CANARY]
    for text in (CANARY, f" {CANARY}", f"My secret is {CANARY}."):
        found += id_renderings(tok.encode(text, add_special_tokens=False))
    return found + [o for o in outputs if len(o.strip()) >= 8]


def send_canary_requests(base_url: str) -> tuple[list[str], list[str]]:
    """Every kind of request, each carrying the canary; returns (generated texts, error bodies)."""
    outputs, errors = [], []
    client = httpx.Client(base_url=base_url, timeout=60, headers={"X-Canary": CANARY, "User-Agent": CANARY})
    prompt = f"My secret is {CANARY}."
    chat = [{"role": "system", "content": f"Remember {CANARY}", "name": CANARY},
            {"role": "user", "content": [{"type": "text", "text": prompt}]}]
    good = [
        ("/v1/completions", {"prompt": prompt, "max_tokens": 12, "ignore_eos": True, "user": CANARY}),
        ("/v1/completions", {"prompt": make_tokenizer().encode(prompt), "max_tokens": 12, "logprobs": 3}),
        ("/v1/completions", {"prompt": prompt, "max_tokens": 12, "stop": [CANARY, "zz"], "seed": 7}),
        ("/v1/chat/completions", {"messages": chat, "max_tokens": 12, "logprobs": True, "top_logprobs": 2}),
        ("/v1/chat/completions", {"messages": chat, "max_tokens": 12, "stream": True, CANARY: CANARY,
                                  "stream_options": {"include_usage": True}}),
    ]
    for path, body in good:
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text
        outputs.append(r.text if body.get("stream") else _text(r.json()))
    bad = [
        ("/v1/completions", {"prompt": prompt, "temperature": -1}),
        ("/v1/completions", {"prompt": prompt, "model": CANARY}),
        ("/v1/completions", {"prompt": prompt, "max_tokens": CANARY}),
        ("/v1/completions", {"prompt": prompt * 40}),
        ("/v1/completions", {"prompt": [prompt, prompt]}),
        ("/v1/completions", {"prompt": prompt, "stop": CANARY, "n": 3}),
        ("/v1/completions", {"prompt": prompt, "logit_bias": {CANARY: 1}}),
        ("/v1/completions", {"prompt": prompt, "stream_options": {CANARY: 1}, "stream": CANARY}),
        ("/v1/chat/completions", {"messages": [{"role": CANARY, "content": prompt}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": CANARY, "text": prompt}]}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], "top_logprobs": CANARY}),
        (f"/v1/{CANARY}?q={CANARY}", {"prompt": prompt}),
    ]
    for path, body in bad:
        r = client.post(path, json=body)
        assert 400 <= r.status_code < 500, r.text
        errors.append(r.text)
    r = client.post("/v1/completions", content=f'{{"prompt": "{prompt}", '.encode(),
                    headers={"content-type": "application/json"})
    errors.append(r.text)
    with client.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 90, "stream": True,
                                                        "ignore_eos": True}) as r:
        lines = r.iter_lines()
        next(lines)  # disconnect mid-stream
    client.close()
    return outputs, errors


def _text(body: dict) -> str:
    choice = body["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def assert_no_leak(haystacks: dict[str, str], outputs: list[str]) -> None:
    for needle in needles(outputs):
        for where, text in haystacks.items():
            assert needle not in text, f"request content leaked into {where}"


def test_error_messages_do_not_echo_requests(server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    outputs, errors = send_canary_requests(server.base_url)
    server.wait_idle()
    records = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
                        if not r.name.startswith(CLIENT_LOGGERS))
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert_no_leak({"error bodies": "\n".join(errors), "log records": records, "metrics": metrics}, outputs)


@pytest.fixture(scope="module")
def served_process(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """`serve()` in its own process at log level debug, its stdout and stderr captured to files."""
    logs = tmp_path_factory.mktemp("serve-logs")
    code = ("import sys; from ccserve.config import EngineConfig, ServerOptions; from ccserve.server.api import serve; "
            "serve(EngineConfig(model=sys.argv[1], device='cpu', max_model_len=128, num_gpu_blocks=32), "
            f"ServerOptions(port=0, served_model_name={MODEL!r}, log_level='debug'))")
    with open(logs / "out", "wb") as out, open(logs / "err", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", code, str(tiny_model_path)], stdout=out, stderr=err,
                                env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(__file__).parents[2])
    try:
        def started() -> bool:
            assert proc.poll() is None, (logs / "err").read_text()
            return "Uvicorn running on" in (logs / "err").read_text()
        wait_until(started, 120, "the server process to start")
        port = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", (logs / "err").read_text()).group(1)
        yield proc, f"http://127.0.0.1:{port}", logs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_canary_never_reaches_logs_or_metrics(served_process: tuple) -> None:
    proc, base_url, logs = served_process
    outputs, errors = send_canary_requests(base_url)
    wait_until(lambda: "ccserve_requests_unfinished 0.0" in httpx.get(f"{base_url}/metrics").text, 30, "idle")
    metrics = httpx.get(f"{base_url}/metrics").text
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    time.sleep(0.1)
    stderr, stdout = (logs / "err").read_text(), (logs / "out").read_text()
    assert "Application startup complete." in stderr and "Application shutdown complete." in stderr
    assert_no_leak({"stderr": stderr, "stdout": stdout, "metrics": metrics, "error bodies": "\n".join(errors)},
                   outputs)


def test_allowlist_withholds_third_party_records_and_tracebacks() -> None:
    def record(name: str, msg: str, args: tuple = (), exc: bool = False) -> logging.LogRecord:
        exc_info = None
        if exc:
            try:
                raise ValueError(CANARY)
            except ValueError:
                exc_info = sys.exc_info()
        return sanitize(logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, exc_info))

    line = logging.Formatter().format(record("uvicorn.error", "Exception in ASGI application %s", (CANARY,), True))
    assert CANARY not in line and "ValueError" in line and WITHHELD in line
    assert record("transformers.tokenization_utils", "Token %s", (CANARY,)).getMessage() == WITHHELD
    assert record("uvicorn.error", "Started server process [%d]", (42,)).getMessage() == "Started server process [42]"
    ours = record("ccserve.server.async_engine", "engine step failed (%s)", ("RuntimeError",), exc=True)
    assert CANARY not in logging.Formatter().format(ours)
    assert ours.getMessage() == "engine step failed (RuntimeError) [exception type: ValueError]"
