"""A deployment of separate processes on loopback: issuer, transparency log, gateway/router, relay and three
stand-in nodes (real identities and evidence, a stand-in app), started with the real command lines. Concurrent
clients, whole and streamed, all served; then a node is killed (SIGKILL) mid-stream: its requests end cleanly
(an authenticated error, never a silent cut) and new requests avoid it. tests/test_deployment.py does the same
with real `ccserve serve --attest` nodes and the client SDK."""
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ccserve.attest.note import Signer
from ccserve.attest.tlog import TransparencyLog
from ccserve.router import bhttp
from ccserve.router.issuer import fetch_tokens
from ccserve.router.oblivious import ObliviousClient
from tests.processes import Process, processes  # noqa: F401 (a fixture)
from tests.router.conftest import stand_in_measurement

CREDENTIAL = "loopback-client"
CAPACITIES = (10, 30, 60)


def service(processes, tmp_path, name: str, *args: str, module: str = "ccserve.router") -> Process:
    process = Process(["-m", module, name, *args, "--port", "0"], tmp_path / f"{name}.log")
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
    signer, release = Signer.generate("loopback.example/releases"), stand_in_measurement()
    TransparencyLog.create(tmp_path / "log", signer).append(release.entry(), signer)

    issuer = service(processes, tmp_path, "issuer", "--credentials", str(tmp_path / "credentials"))
    log = service(processes, tmp_path, "log", "serve", "--dir", str(tmp_path / "log"), module="ccserve.cli")
    issuer_url = issuer.line("ccserve issuer: listening on")
    log_url = log.line("ccserve log: listening on")
    router = service(processes, tmp_path, "router", "--issuer", issuer_url, "--log-url", log_url, "--log-key",
                     signer.verifier.encode(), "--report-ttl", "3")
    router_url = router.line("ccserve router: listening on")
    relay = service(processes, tmp_path, "relay", "--gateway", router_url)
    nodes = []
    for i, capacity in enumerate(CAPACITIES):
        nodes.append(Process(["-m", "tests.router.stand_in_node", "--router", router_url, "--name", f"node{i}",
                              "--capacity", str(capacity), "--chunks", "20", "--delay", "0.03"],
                             tmp_path / f"node{i}.log", env={"NODE_MEASUREMENT": json.dumps(release.record())}))
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
