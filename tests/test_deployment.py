"""The deployment of issue 9, on loopback (CPU, a tiny random model with real safetensors weights, under the pcc
policy): token issuer, transparency log server, gateway/router, OHTTP relay and three `ccserve serve --attest`
nodes, each a separate process started with its real command line, the release published by a `ccserve release`
process beforehand. Clients are the SDK's RelayedClient.

- 64 concurrent clients stream: every one verified every node (through the relay, with its own nonces), every
  one was served completely, and the nodes served exactly 64 requests (none lost, none doubled).
- A node is killed (SIGKILL) under 16 long streams: exactly the streams it was running fail, each with a clean,
  authenticated GatewayError; the others complete; new requests all land on the two live nodes.
- Tampering at the system level: a relay that flips a request byte (refused by the gateway unopened, no token
  spent, no node reached) or a response byte (refused by the client); a node running a release that is not in
  the log is refused by the router (it cannot start) and, behind a router that does not check, by the client
  (nothing is sent to it).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ccserve.attest.tlog import TransparencyLog
from ccserve.cli import main
from ccserve.client import (GatewayError, NoVerifiedNode, RelayedClient, RelayRefused, SealedMessageError,
                            UnknownMeasurement)
from ccserve.router import relay
from ccserve.router.serve import BackgroundServer
from tests.processes import Process
from tests.server.conftest import metric
from tests.tiny_models import make_tiny_model_dir

CREDENTIAL = "deployment-test-client"
MODEL = "tiny"
CAPACITIES = (15, 25, 60)
NODE_FLAGS = ["--device", "cpu", "--max-model-len", "256", "--num-gpu-blocks", "256", "--served-model-name", MODEL,
              "--attest"]
ENV = {"OMP_NUM_THREADS": "1"}   # five engines share this machine's cores


@dataclass
class Node:
    process: Process
    url: str
    capacity: int

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def served(self) -> int:
        """Chat requests this node finished (by length: every request here ignores EOS)."""
        return int(metric(self.metrics(), "ccserve_requests_total", endpoint="chat_completions", outcome="length"))


@dataclass
class Deployment:
    tmp: Path
    issuer_url: str
    log_url: str
    log_key: str
    router_url: str
    relay_url: str
    nodes: list[Node]
    open_relay_url: str        # a router started with --privacy open --insecure-accept-unattested-nodes
    open_router_url: str
    rogue: Node                # registered there: its release is not in the log
    refused_rogue: Process     # the same release, refused by the checking router

    def client(self, relay_url: str | None = None, **kw) -> RelayedClient:
        return RelayedClient(relay_url or self.relay_url, issuer_url=self.issuer_url, credential=CREDENTIAL,
                             log_url=self.log_url, log_key=self.log_key, state_dir=self.tmp / "client-state",
                             token_batch=4, timeout=60, **kw)

    def router_stats(self) -> dict:
        return httpx.get(self.router_url + "/stats").json()


def create_log(tmp: Path) -> str:
    """`ccserve log init`; the log's verifier key, which clients and the router pin."""
    main(["log", "init", "--dir", str(tmp / "log"), "--origin", "deployment.test/releases", "--key-out",
          str(tmp / "log.key")])
    return TransparencyLog(tmp / "log").verifier.encode()


def start(started: list[Process], tmp: Path, name: str, module: str, *args: str, port: bool = True) -> Process:
    process = Process(["-m", module, *args, *(["--port", "0"] if port else [])], tmp / f"{name}.log", env=ENV)
    started.append(process)
    return process


def start_node(started: list[Process], tmp: Path, name: str, model: Path, router_url: str, capacity: int,
               *extra: str) -> Process:
    return start(started, tmp, name, "ccserve.cli", "serve", "--model", str(model), *NODE_FLAGS, *extra,
                 "--router", router_url, "--capacity", str(capacity))


def registered(process: Process, capacity: int) -> Node:
    line = process.line("registered with the router as node ", timeout=120, anywhere=True)
    return Node(process, line.split(" at ")[1].split(",")[0], capacity)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("deployment")
    (tmp / "credentials").write_text(CREDENTIAL + "\n")
    model, log_key = make_tiny_model_dir(tmp / "tiny"), create_log(tmp)
    started: list[Process] = []
    try:
        release = start(started, tmp, "release", "ccserve.cli", "release", "--model", str(model), *NODE_FLAGS,
                        "--log", str(tmp / "log"), "--log-key", str(tmp / "log.key"), port=False)
        issuer = start(started, tmp, "issuer", "ccserve.router", "issuer", "--credentials", str(tmp / "credentials"))
        log = start(started, tmp, "log", "ccserve.cli", "log", "serve", "--dir", str(tmp / "log"))
        issuer_url, log_url = issuer.line("ccserve issuer: listening on"), log.line("ccserve log: listening on")
        router = start(started, tmp, "router", "ccserve.router", "router", "--issuer", issuer_url, "--log-url",
                       log_url, "--log-key", log_key, "--report-ttl", "10")
        open_router = start(started, tmp, "open-router", "ccserve.router", "router", "--issuer", issuer_url,
                            "--privacy", "open", "--insecure-accept-unattested-nodes")
        router_url = router.line("ccserve router: listening on")
        open_router_url = open_router.line("ccserve router: listening on")
        assert release.exit_code() == 0, release.log.read_text()   # published before any node starts
        relay_process = start(started, tmp, "relay", "ccserve.router", "relay", "--gateway", router_url)
        open_relay = start(started, tmp, "open-relay", "ccserve.router", "relay", "--gateway", open_router_url)
        nodes = [start_node(started, tmp, f"node{i}", model, router_url, c) for i, c in enumerate(CAPACITIES)]
        unpublished = ("--max-num-seqs", "7")   # another configuration: a release nobody published
        rogue = start_node(started, tmp, "rogue", model, open_router_url, 10, *unpublished)
        refused_rogue = start_node(started, tmp, "refused-rogue", model, router_url, 10, *unpublished)
        yield Deployment(tmp, issuer_url, log_url, log_key, router_url,
                         relay_process.line("ccserve relay: listening on"),
                         [registered(n, c) for n, c in zip(nodes, CAPACITIES)],
                         open_relay.line("ccserve relay: listening on"), open_router_url, registered(rogue, 10),
                         refused_rogue)
    finally:
        for process in started:
            if process.proc.poll() is None:
                process.proc.terminate()
        for process in started:
            process.wait_or_kill()


LONG_STREAM_TOKENS = 200   # with the chat template's prompt, within the nodes' max_model_len of 256


def chat(client: RelayedClient, i: int, max_tokens: int) -> Iterator[dict]:
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Tell me story {i}."}],
                                          max_tokens=max_tokens, ignore_eos=True, temperature=0.8, seed=i,
                                          stream=True, stream_options={"include_usage": True})


def completed(events: list[dict]) -> int:
    """The completion tokens of a stream that ended properly (finish reason, usage); 0 otherwise."""
    reasons = [e["choices"][0].get("finish_reason") for e in events if e["choices"]]
    usage = [e["usage"] for e in events if e.get("usage")]
    return usage[-1]["completion_tokens"] if reasons and reasons[-1] == "length" and usage else 0


# ---- tampering at the system level (run first: they leave the deployment as it was) ------------------------

class TamperingRelay:
    """The real relay, with a malicious operator that flips one byte of the next request or response once
    armed (`mode` = "request" or "response"); until then it is the honest relay."""

    def __init__(self, app: ASGIApp) -> None:
        self.app, self.mode = app, None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        mode, self.mode = self.mode, None
        if scope["type"] != "http" or mode is None:
            return await self.app(scope, receive, send)
        bodies = 0

        async def flip_request() -> Message:
            message = await receive()
            if message["type"] == "http.request" and message.get("body"):
                body = bytearray(message["body"])
                body[len(body) // 2] ^= 0x01
                message = {**message, "body": bytes(body)}
            return message

        async def flip_response(message: Message) -> None:
            nonlocal bodies
            if message["type"] == "http.response.body" and message.get("body"):
                bodies += 1
                if bodies == 3:
                    body = bytearray(message["body"])
                    body[-1] ^= 0x01
                    message = {**message, "body": bytes(body)}
            await send(message)

        if mode == "request":
            return await self.app(scope, flip_request, send)
        await self.app(scope, receive, flip_response)


@pytest.fixture(scope="module")
def tampering(deployment) -> Iterator[tuple[TamperingRelay, str]]:
    _, app = relay.build(deployment.router_url)
    tamperer = TamperingRelay(app)
    with BackgroundServer(tamperer) as server:
        yield tamperer, server.url


def test_a_relay_flipping_a_request_byte_is_refused_before_anything_opens(deployment, tampering):
    tamperer, url = tampering
    with deployment.client(url) as client:
        assert len(client.refresh()) == 3                  # verified through the relay while it was honest
        before, served = deployment.router_stats(), [n.served() for n in deployment.nodes]
        tamperer.mode = "request"
        with pytest.raises(RelayRefused, match="400.*could not be decrypted"):
            list(chat(client, 0, 4))
        after = deployment.router_stats()
        assert after["decrypt_failed"] == before["decrypt_failed"] + 1
        assert after["tokens_spent"] == before["tokens_spent"] and [n.served() for n in deployment.nodes] == served
        assert completed(list(chat(client, 1, 4))) == 4   # the honest relay again: served


def test_a_relay_flipping_a_response_byte_is_refused_by_the_client(deployment, tampering):
    tamperer, url = tampering
    with deployment.client(url) as client:
        client.refresh()
        tamperer.mode = "response"
        with pytest.raises(SealedMessageError, match="altered"):
            list(chat(client, 2, 8))


def test_an_unpublished_release_is_refused_by_the_router_and_by_the_client(deployment):
    """The same node release, not in the log: the checking router refuses it (it cannot start); behind a router
    that does not check (--privacy open --insecure-accept-unattested-nodes) the client refuses it, and so never
    sends it anything."""
    assert deployment.refused_rogue.exit_code() == 2
    message = deployment.refused_rogue.log.read_text()
    assert "ccserve serve: error: the router at" in message and "(UnknownMeasurement)" in message
    listed = httpx.get(deployment.router_url + "/nodes").json()["nodes"]
    assert deployment.rogue.url not in {n["url"] for n in listed}
    with deployment.client(deployment.open_relay_url) as client:
        with pytest.raises(NoVerifiedNode, match="UnknownMeasurement"):
            list(chat(client, 3, 4))
        assert [type(e) for e in client.refused.values()] == [UnknownMeasurement]
    stats = httpx.get(deployment.open_router_url + "/stats").json()
    assert stats["tokens_spent"] == 0 and stats["served"] == 0 and deployment.rogue.served() == 0


# ---- the deployment test of the issue ----------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_64_clients_verified_and_served_then_a_node_killed(deployment):
    clients = [deployment.client() for _ in range(64)]
    before = [n.served() for n in deployment.nodes]
    stats_before = deployment.router_stats()
    with ThreadPoolExecutor(64) as pool:
        # 1. 64 concurrent clients, each verifying every node through the relay, then streaming
        results = list(pool.map(lambda i: completed(list(chat(clients[i], i, 8))), range(64)))
        assert results == [8] * 64                                                  # all served, completely
        assert all(len(c.nodes) == 3 and not c.refused for c in clients)           # all verified every node
        per_node = [n.served() - b for n, b in zip(deployment.nodes, before)]
        assert sum(per_node) == 64 and sum(1 for x in per_node if x) >= 2          # none lost, none doubled
        assert deployment.router_stats()["served"] - stats_before["served"] == 64

        # 2. 16 long streams in flight; the largest node (60 of 100) is killed under them
        victim, survivors = deployment.nodes[2], deployment.nodes[:2]
        started = threading.Semaphore(0)

        def long_stream(i: int) -> str:
            # As long as max_model_len allows, so that the victim's streams are still running when all 16
            # have started on a loaded 2-core CI machine (100 tokens could finish first there).
            events = chat(clients[i], 100 + i, LONG_STREAM_TOKENS)
            first = [next(events)]
            started.release()
            try:
                return "complete" if completed(first + list(events)) == LONG_STREAM_TOKENS else "incomplete"
            except GatewayError as exc:
                return f"failed {exc.status}"

        futures = [pool.submit(long_stream, i) for i in range(16)]
        for _ in range(16):
            assert started.acquire(timeout=60), "a stream did not start"
        running_on_victim = int(metric(victim.metrics(), "ccserve_requests_unfinished"))
        victim.process.kill()
        outcomes = [f.result(timeout=120) for f in futures]      # none raised anything but a clean GatewayError
        assert running_on_victim >= 1, "16 streams, none on 60% of the capacity: probability 0.4**16"
        assert outcomes.count("failed 502") == running_on_victim
        assert outcomes.count("complete") == 16 - running_on_victim

        # 3. new requests avoid the dead node
        served_before = sum(n.served() for n in survivors)
        results = list(pool.map(lambda i: completed(list(chat(clients[i], 200 + i, 8))), range(16, 32)))
        assert results == [8] * 16
        assert sum(n.served() for n in survivors) - served_before == 16
    listed = httpx.get(deployment.router_url + "/nodes").json()["nodes"]
    assert sorted(n["capacity"] for n in listed) == [15, 25]
    for c in clients:
        c.close()
