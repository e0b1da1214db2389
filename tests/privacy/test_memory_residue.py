"""What of a request is left in the server's memory after it ends (issue 8's scan of process memory).

A real `ccserve serve` process under the pcc policy (re-executed with the scrubbing allocator, undumpable, no
core files) serves requests of every kind, each carrying its own canary: completions and chats, streamed and
not, aborted by a disconnect, rejected as bad input, sent to unknown paths, malformed. When it is idle again,
every writable private mapping of the process (/proc/PID/mem) is searched for every canary: none may be found.
The same scan of a server under the open policy (CPython's own allocator, no scrubbing) finds them: the
positive control that shows the scan can see what it looks for.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ccserve.privacy.hardening import SCRUBBING_ALLOCATOR
from tests.privacy.memscan import scan
from tests.server.conftest import wait_until
from tests.tiny_models import make_tiny_model_dir

ROOT = Path(__file__).parents[2]


def start(tmp_path: Path, privacy: str) -> tuple[subprocess.Popen, str, Path]:
    model = make_tiny_model_dir(tmp_path / "model", "llama")
    err_path = tmp_path / "err"
    cmd = [sys.executable, "-m", "ccserve", "serve", "--model", str(model), "--device", "cpu", "--max-model-len",
           "128", "--num-gpu-blocks", "32", "--port", "0", "--served-model-name", "tiny", "--privacy", privacy]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONMALLOC", "MALLOC_PERTURB_", "GLIBC_TUNABLES",
                                                             "CCSERVE_HARDENED")}
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**env, "TRITON_INTERPRET": "1"},
                                cwd=ROOT)

    def started() -> bool:
        assert proc.poll() is None, err_path.read_text()[-3000:]
        return "Uvicorn running on" in err_path.read_text()
    try:
        wait_until(started, 120, "the server process to start")
    except BaseException:
        proc.kill()
        raise
    port = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", err_path.read_text()).group(1)
    return proc, f"http://127.0.0.1:{port}", err_path


@pytest.fixture(scope="module", params=["pcc", "open"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    proc, base_url, _ = start(tmp_path_factory.mktemp(f"residue-{request.param}"), request.param)
    try:
        yield request.param, proc, base_url
    finally:
        proc.kill()
        proc.wait()


def send(base_url: str, canary: str, kind: str) -> None:
    """One request of `kind` carrying `canary`, each on a connection of its own."""
    prompt = f"My secret is {canary}."
    with httpx.Client(base_url=base_url, timeout=60, headers={"X-Note": canary}) as client:
        if kind == "completion":
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "ignore_eos": True})
            assert r.status_code == 200
        elif kind == "chat-stream":
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "stream": True}
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        elif kind == "disconnect":
            body = {"prompt": prompt, "max_tokens": 100, "ignore_eos": True, "stream": True}
            with client.stream("POST", "/v1/completions", json=body) as r:
                next(r.iter_lines())
        elif kind == "bad-input":
            assert client.post("/v1/completions", json={"prompt": prompt, "temperature": -1}).status_code == 400
        elif kind == "unknown-path":
            assert client.post(f"/v1/{canary}?q={canary}", json={"prompt": prompt}).status_code == 404
        elif kind == "malformed":
            r = client.post("/v1/completions", content=f'{{"prompt": "{prompt}", '.encode(),
                            headers={"content-type": "application/json"})
            assert r.status_code == 400


KINDS = ["completion", "chat-stream", "disconnect", "bad-input", "unknown-path", "malformed"]


def test_pcc_server_runs_hardened(server: tuple) -> None:
    privacy, proc, _ = server
    if privacy != "pcc":
        pytest.skip("hardening is the pcc policy's")
    limits = Path(f"/proc/{proc.pid}/limits").read_text()
    assert re.search(r"Max core file size\s+0\s+0", limits), limits
    environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
    for key, value in SCRUBBING_ALLOCATOR.items():
        assert f"{key}={value}".encode() in environ
    if os.geteuid() != 0:  # not dumpable: a same-user process may not read its memory
        with pytest.raises(PermissionError):
            open(f"/proc/{proc.pid}/mem", "rb").close()


@pytest.mark.skipif(os.geteuid() != 0, reason="reading an undumpable process's memory needs CAP_SYS_PTRACE")
def test_no_request_outlives_itself_in_server_memory(server: tuple) -> None:
    privacy, proc, base_url = server
    canaries = [f"CANARY{uuid.uuid4().hex[:12]}" for _ in range(3 * len(KINDS))]
    for i, canary in enumerate(canaries):
        send(base_url, canary, KINDS[i % len(KINDS)])
    wait_until(lambda: "ccserve_requests_unfinished 0.0" in httpx.get(f"{base_url}/metrics").text, 30, "idle")
    if privacy == "pcc":
        wait_until(lambda: _found(proc.pid, canaries) == set(), 10, "no request's canary left in memory")
    else:
        assert len(_found(proc.pid, canaries)) >= 3, "the scan must see what an unscrubbed server keeps"


def _found(pid: int, canaries: list[str]) -> set[str]:
    return {hit.needle.decode() for hit in scan(pid, [c.encode() for c in canaries])}
