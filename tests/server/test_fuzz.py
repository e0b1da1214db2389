"""Fuzz the two generation endpoints from the server's own OpenAPI schema: no input, valid or not, may get a
5xx, and the server must still be healthy afterwards."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode

from tests.server.conftest import LiveServer, start_server

EXAMPLES_PER_MODE = 200  # per endpoint and mode: ~800 requests, well under a minute on two cores


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_path: Path) -> Iterator[LiveServer]:
    """A short context (32 tokens) bounds how long any valid fuzzed request generates."""
    live = start_server(tiny_model_path, max_model_len=32, num_gpu_blocks=16)
    yield live
    live.stop()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fuzz_never_5xx(fuzz_server: LiveServer, path: str, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")
    operation = schema[path]["POST"]

    @hypothesis.settings(max_examples=EXAMPLES_PER_MODE, deadline=None, database=None, derandomize=True,
                         phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        response = case.call(base_url=fuzz_server.base_url, timeout=60)
        assert response.status_code < 500, (response.status_code, response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert httpx.get(f"{fuzz_server.base_url}/health").json() == {"status": "ok"}
    fuzz_server.wait_idle()
