"""The OpenAI-compatible endpoints, through the official openai client against a real server."""
from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import MODEL, LiveServer, metric

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


def test_completion(server: LiveServer) -> None:
    out = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=7, temperature=0,
                                             extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    assert choice.finish_reason == "length" and choice.text
    prompt_tokens = len(server.engine.tokenizer.encode(PROMPT))
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == prompt_tokens + 7


def test_completion_stream_matches_non_stream(server: LiveServer) -> None:
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=9, temperature=0, extra_body={"ignore_eos": True})
    whole = server.client().completions.create(**kwargs).choices[0].text
    chunks = list(server.client().completions.create(**kwargs, stream=True,
                                                     stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_from_token_ids(server: LiveServer) -> None:
    ids = server.engine.tokenizer.encode(PROMPT)
    by_ids = server.client().completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    by_text = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_chat_completion(server: LiveServer) -> None:
    out = server.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=6,
                                                  temperature=0, extra_body={"ignore_eos": True})
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason == "length"
    templated = server.engine.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(server.engine.tokenizer.encode(templated, add_special_tokens=False))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, 6)


def test_chat_stream_matches_non_stream(server: LiveServer) -> None:
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    whole = server.client().chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(server.client().chat.completions.create(**kwargs, stream=True,
                                                          stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.total_tokens > 8


def test_model_name_may_be_omitted(server: LiveServer) -> None:
    r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == MODEL


def test_stop_string_truncates(server: LiveServer) -> None:
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    text = server.client().completions.create(**kwargs).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip()
    out = server.client().completions.create(**kwargs, stop=[stop]).choices[0]
    assert out.finish_reason == "stop" and out.text == text[:text.index(stop)]


def test_seed_makes_sampling_reproducible(server: LiveServer) -> None:
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=1.0, top_p=0.9, seed=1234,
                  extra_body={"top_k": 50, "min_p": 0.01, "ignore_eos": True})
    first = server.client().chat.completions.create(**kwargs).choices[0].message.content
    assert server.client().chat.completions.create(**kwargs).choices[0].message.content == first


def test_completion_logprobs(server: LiveServer) -> None:
    out = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3,
                                             extra_body={"ignore_eos": True}).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == out.text
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(top) <= 3 for top in lp.top_logprobs)
    # greedy: the sampled token is the most likely one
    assert lp.token_logprobs[0] == pytest.approx(max(lp.top_logprobs[0].values()), abs=1e-4)


def test_chat_logprobs_streamed(server: LiveServer) -> None:
    chunks = list(server.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, stream=True,
        extra_body={"ignore_eos": True}))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 5
    assert all(len(e.top_logprobs) == 2 and bytes(e.bytes).decode(errors="replace") == e.token for e in entries)


def test_models_health_metrics(server: LiveServer) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, extra_body={"ignore_eos": True})
    text = httpx.get(f"{server.base_url}/metrics").text
    assert metric(text, "ccserve_requests_total", endpoint="completions", outcome="length") >= 1
    assert metric(text, "ccserve_generation_tokens_total") >= 3
    assert metric(text, "ccserve_kv_blocks_total") == 48
    assert metric(text, "ccserve_kv_capacity_tokens") == 48 * server.engine.config.block_size
    assert metric(text, "ccserve_kv_format_compression") == 1.0 == metric(text, "ccserve_kv_kept_share")
    assert metric(text, "ccserve_time_to_first_token_seconds_count") >= 1
    assert metric(text, "ccserve_cc_h2d_bytes_total") == 0 == metric(text, "ccserve_cc_wait_seconds_total")  # cc off


def test_no_debug_endpoints(server: LiveServer) -> None:
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        r = httpx.get(f"{server.base_url}{path}")
        assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"
    paths = set(httpx.get(f"{server.base_url}/openapi.json").json()["paths"])
    assert paths == {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}
