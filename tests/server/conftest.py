"""Real servers on loopback for the server tests: uvicorn in a background thread serving the real LLMEngine
on a tiny random model (CPU, Triton interpreter), or `serve()` in a subprocess where logging is under test."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from ccserve.attest.identity import NodeIdentity
from ccserve.config import EngineConfig
from ccserve.engine.llm_engine import LLMEngine
from ccserve.server.api import build_app
from ccserve.server.async_engine import AsyncEngine
from ccserve.server.log_config import disable_access_log
from tests.tiny_models import make_tiny_model_dir

MODEL = "tiny"


@dataclass
class LiveServer:
    base_url: str
    app: FastAPI
    engine: LLMEngine
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def async_engine(self) -> AsyncEngine:
        return self.app.state.engine

    def client(self) -> openai.OpenAI:
        """Retries off: a 429 or 5xx must reach the test, not be retried away."""
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=60)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def wait_idle(self, timeout: float = 30) -> None:
        """Until no request is unfinished and every KV block is back in the pool (but the public prefixes')."""
        def idle() -> bool:
            s = self.async_engine.stats
            return self.async_engine.num_unfinished == 0 and s.num_running == 0 and s.num_waiting == 0 \
                and s.num_free_blocks == s.num_total_blocks - s.num_public_prefix_blocks
        wait_until(idle, timeout)
        stats = self.engine.stats()  # the engine thread is asleep now, so reading it here is safe
        assert stats.num_free_blocks == stats.num_total_blocks - stats.num_public_prefix_blocks


def wait_until(predicate: Callable[[], bool], timeout: float, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def start_server(model_dir: Path, max_queue: int = 1024, identity: NodeIdentity | None = None,
                 require_sealed: bool = False, **engine_kwargs) -> LiveServer:
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", **engine_kwargs))
    app = build_app(engine, served_model_name=MODEL, max_queue=max_queue, identity=identity,
                    require_sealed=require_sealed)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False))
    disable_access_log()  # as serve() does; pytest attaches its capture handler to the access logger
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    wait_until(lambda: server.started, 60, "uvicorn to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    return LiveServer(f"http://127.0.0.1:{port}", app, engine, server, thread)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / MODEL)


@pytest.fixture(scope="session")
def server(tiny_model_path: Path) -> Iterator[LiveServer]:
    """The shared server. 48 blocks of 16 tokens is fewer than 64 concurrent requests need, so the
    concurrency test also exercises waiting and preemption."""
    live = start_server(tiny_model_path, max_model_len=256, num_gpu_blocks=48)
    yield live
    live.stop()
