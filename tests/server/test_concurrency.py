"""Many clients share the engine; clients that leave free their KV blocks; a failing step fails only its
requests and the server keeps serving."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import MODEL, LiveServer, metric

PROMPT = "Once upon a time"
LONG = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}


def test_64_concurrent_streams_complete_without_leaking_blocks(server: LiveServer) -> None:
    client = server.async_client()

    async def one(i: int) -> tuple[str, str | None, int]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Tell me story number {i}."}], max_tokens=8,
            temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        text, reason, completion_tokens = "", None, -1
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
            if chunk.usage:
                completion_tokens = chunk.usage.completion_tokens
        return text, reason, completion_tokens

    most_running = 0

    async def watch_batch() -> None:
        nonlocal most_running
        while True:
            most_running = max(most_running, server.async_engine.stats.num_running)
            await asyncio.sleep(0.005)

    async def main() -> list[tuple[str, str | None, int]]:
        watcher = asyncio.create_task(watch_batch())
        async with client:
            results = await asyncio.gather(*(one(i) for i in range(64)))
        watcher.cancel()
        return results

    results = asyncio.run(main())
    assert all(reason == "length" and n == 8 for _, reason, n in results)
    assert most_running > 8  # the clients were batched together, not served one by one
    server.wait_idle()


def metrics(server: LiveServer) -> str:
    return httpx.get(f"{server.base_url}/metrics").text


def aborted(server: LiveServer, endpoint: str) -> float:
    return metric(metrics(server), "ccserve_requests_total", endpoint=endpoint, outcome="abort")


@pytest.fixture
def slow_steps(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """20 ms per step, so a 200-token request runs for seconds and a disconnect surely comes mid-way."""
    real = server.engine.step

    def step():
        time.sleep(0.02)
        return real()

    monkeypatch.setattr(server.engine, "step", step)


@pytest.mark.usefixtures("slow_steps")
def test_disconnect_mid_stream_frees_blocks(server: LiveServer) -> None:
    server.wait_idle()
    before, tokens_before = aborted(server, "completions"), server.async_engine.stats.generation_tokens_total
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{server.base_url}/v1/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            assert [next(lines) for _ in range(3)][2].startswith("data: ")  # two chunks in
            assert server.async_engine.stats.num_free_blocks < server.async_engine.stats.num_total_blocks
    server.wait_idle(timeout=10)
    assert aborted(server, "completions") == before + 1
    assert server.async_engine.stats.generation_tokens_total - tokens_before < LONG["max_tokens"]


@pytest.mark.usefixtures("slow_steps")
def test_disconnect_while_not_streaming_frees_blocks(server: LiveServer) -> None:
    server.wait_idle()
    before, tokens_before = aborted(server, "chat_completions"), server.async_engine.stats.generation_tokens_total
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    server.wait_idle(timeout=10)
    assert aborted(server, "chat_completions") == before + 1
    assert server.async_engine.stats.generation_tokens_total - tokens_before < 200


@pytest.fixture(params=["runner", "engine"])
def failing_step(request: pytest.FixtureRequest, server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """One step raises, with a message that must reach neither the client nor the logs: inside the model
    runner (the engine ends that batch's requests itself), or in LLMEngine.step before any cleanup (the
    server must then end every request the engine holds, or the next step would fail the same way)."""
    owner, name = (server.engine.runner, "execute") if request.param == "runner" else (server.engine, "step")
    real, calls = getattr(owner, name), [0]

    def failing(*args):
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("kernel failed on secret-content-42")
        return real(*args)

    monkeypatch.setattr(owner, name, failing)


@pytest.mark.usefixtures("failing_step")
def test_failed_step_fails_its_request_and_serving_goes_on(server: LiveServer,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    server.wait_idle()
    url = f"{server.base_url}/v1/completions"
    r = httpx.post(url, json={"prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
    assert "secret" not in r.text and "secret" not in caplog.text
    assert "RuntimeError" in caplog.text
    assert httpx.post(url, json={"prompt": PROMPT, "max_tokens": 4}).status_code == 200
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    server.wait_idle()


@pytest.mark.usefixtures("failing_step")
def test_failed_step_mid_stream_sends_an_error_event(server: LiveServer) -> None:
    server.wait_idle()
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": PROMPT}], "stream": True}) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "engine_error"
    server.wait_idle()


def _cpu_ticks(native_id: int) -> int:
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_idle_engine_thread_sleeps(server: LiveServer) -> None:
    """No busy spin: an idle engine thread uses (next to) no CPU."""
    server.wait_idle()
    thread_id = server.async_engine._thread.native_id
    before = _cpu_ticks(thread_id)
    time.sleep(1.0)
    assert _cpu_ticks(thread_id) - before <= 2  # clock ticks of 10 ms
