"""A deployment of separate processes on loopback: issuer, gateway/router, relay and three stand-in nodes,
started with the real command lines. Concurrent clients, whole and streamed, all served; then a node is
killed (SIGKILL) mid-stream: its requests end cleanly (an authenticated error, never a silent cut) and new
requests avoid it."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ccserve.router import bhttp
from ccserve.router.issuer import fetch_tokens
from ccserve.router.oblivious import ObliviousClient
from tests.router.stand_in_node import private_hex, public_hex

ROOT = Path(__file__).resolve().parents[2]
CREDENTIAL = "loopback-client"
CAPACITIES = (10, 30, 60)


class Process:
    """One service, started as `python ARGS`, its output in a file; `.line(prefix)` waits for a line."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None) -> None:
        self.log = log
        self._out = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, *args], stdout=self._out, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})

    def line(self, prefix: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if line.startswith(prefix):
                    return line[len(prefix):].strip()
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.proc.args} did not print {prefix!r}:\n{self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def wait_or_kill(self) -> None:
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
        self._out.close()


@pytest.fixture
def processes():
    """The processes a test starts; all terminated at the end (SIGTERM side by side, SIGKILL after 10 s)."""
    started: list[Process] = []
    yield started
    for process in started:
        if process.proc.poll() is None:
            process.proc.terminate()
    for process in started:
        process.wait_or_kill()


def service(processes, tmp_path, name: str, *args: str) -> str:
    process = Process(["-m", "ccserve.router", name, *args, "--port", "0"], tmp_path / f"{name}.log")
    processes.append(process)
    return process


def request(body: bytes, token: str, stream: bool) -> bhttp.Request:
    headers = [("content-type", "application/octet-stream"), ("ccserve-token", token)]
    return bhttp.Request("POST", "/v1/chat/completions", headers=headers + ([("accept", "text/event-stream")]
                                                                         if stream else []), content=body)


def stream_outcome(client: ObliviousClient, body: bytes, token: str) -> tuple[int, str, str | None, bytes]:
    """(status, serving node or '', ccserve-error trailer, content) of one streamed request."""
    events = list(client.stream(request(body, token, stream=True)))
    head, trailers = events[0], events[-1]
    content = b"".join(e for e in events if isinstance(e, bytes))
    node = content.split()[1].decode() if head.status == 200 and content else ""
    return head.status, node, trailers.get("ccserve-error"), content


@pytest.mark.timeout(120)
def test_processes_on_loopback_with_a_node_killed(processes, tmp_path):
    (tmp_path / "credentials").write_text(CREDENTIAL + "\n")
    keys = [Ed25519PrivateKey.generate() for _ in CAPACITIES]
    (tmp_path / "attested").write_text("".join(public_hex(k) + "\n" for k in keys))

    issuer = service(processes, tmp_path, "issuer", "--credentials", str(tmp_path / "credentials"))
    issuer_url = issuer.line("ccserve issuer: listening on")
    router = service(processes, tmp_path, "router", "--issuer", issuer_url, "--attested-keys",
                     str(tmp_path / "attested"), "--report-ttl", "3")
    router_url = router.line("ccserve router: listening on")
    relay = service(processes, tmp_path, "relay", "--gateway", router_url)
    nodes = []
    for i, (capacity, key) in enumerate(zip(CAPACITIES, keys)):
        nodes.append(Process(["-m", "tests.router.stand_in_node", "--router", router_url, "--name", f"node{i}",
                              "--capacity", str(capacity), "--chunks", "20", "--delay", "0.03"],
                             tmp_path / f"node{i}.log", env={"NODE_SIGNING_KEY": private_hex(key)}))
        processes.append(nodes[-1])
    relay_url = relay.line("ccserve relay: listening on")
    for node in nodes:
        node.line("ready")

    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(16) as pool:
        client = ObliviousClient(relay_url, http)
        tokens = [t.header_value() for t in fetch_tokens(issuer_url, CREDENTIAL, 100, http)]
        assert len(http.get(router_url + "/nodes").json()["nodes"]) == 3

        # 1. concurrent clients, whole and streamed: all served, every body delivered intact
        bodies = [os.urandom(1000 + i) for i in range(24)]
        whole = list(pool.map(lambda i: client.send(request(bodies[i], tokens.pop(), stream=False)), range(12)))
        assert all(r.status == 200 for r in whole)
        assert [hashlib.sha256(b).hexdigest()[:16] for b in bodies[:12]] == [
            json.loads(r.content)["sha256"] for r in whole]
        streamed = list(pool.map(lambda i: stream_outcome(client, bodies[i], tokens.pop()), range(12, 24)))
        assert all(s == 200 and err is None and content.count(b"data:") == 20 for s, _, err, content in streamed)
        served = {node for _, node, _, _ in streamed} | {json.loads(r.content)["node"] for r in whole}
        assert served <= {"node0", "node1", "node2"} and len(served) >= 2

        # 2. 16 long streams in flight; the largest node (60%) is killed under them
        futures = [pool.submit(stream_outcome, client, os.urandom(100), tokens.pop()) for _ in range(16)]
        time.sleep(0.25)
        nodes[2].kill()
        outcomes = [f.result() for f in futures]        # none raised: no stream was cut without a sealed end
        on_dead = [o for o in outcomes if o[1] == "node2" or o[0] != 200]
        assert on_dead, "with 16 streams, some were on the killed node (probability 1 - 0.4**16)"
        for status, node, error, content in on_dead:
            assert (status == 200 and error and content.count(b"data:") < 20) or status == 502
        for status, node, error, content in outcomes:
            if node != "node2" and status == 200:
                assert error is None and content.count(b"data:") == 20

        # 3. new requests avoid the dead node
        after = list(pool.map(lambda _: stream_outcome(client, b"after", tokens.pop()), range(12)))
        assert all(s == 200 and node in ("node0", "node1") and err is None for s, node, err, _ in after)
        assert {n["capacity"] for n in http.get(router_url + "/nodes").json()["nodes"]} == {10, 30}

        relay_stats = http.get(relay_url + "/stats").json()
        assert relay_stats["forwarded"] == 12 + 12 + 16 + 12
        router_stats = http.get(router_url + "/stats").json()
        assert router_stats["tokens_spent"] == 52 and router_stats["node_failed_midstream"] >= 1
