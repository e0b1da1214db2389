"""A server with a declared public system prompt: chats that open with it reuse its blocks (aggregate metrics
only) and answer exactly as a server without the cache does."""
from __future__ import annotations

import httpx

from tests.server.conftest import LiveServer, metric, start_server

SYSTEM = "You are a helpful assistant for a public library. Answer in one short sentence, politely and plainly."


def chat(server: LiveServer, user: str) -> str:
    out = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    return out.choices[0].message.content


def test_declared_system_prompt_is_reused_and_changes_nothing(tiny_model_path, server):
    cached = start_server(tiny_model_path, max_model_len=256, num_gpu_blocks=48, public_prefixes=[{"system": SYSTEM}])
    try:
        blocks = cached.engine.prefix_cache.num_blocks
        assert blocks >= 1
        for user in ("Where are the maps?", "When do you open?"):
            assert chat(cached, user) == chat(server, user)
        cached.wait_idle()
        text = httpx.get(f"{cached.base_url}/metrics").text
        assert metric(text, "ccserve_public_prefix_blocks") == blocks
        assert metric(text, "ccserve_prefix_cache_hits_total") == 2
        assert metric(text, "ccserve_prefix_cache_saved_tokens_total") == 2 * blocks * cached.engine.config.block_size
        assert "Where are the maps" not in text
    finally:
        cached.stop()
    server.wait_idle()
