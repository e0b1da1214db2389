"""An attested node (`build_app(..., identity=...)`) on the real engine and tiny model: it answers /attestation,
opens sealed requests and seals every answer (streamed too), refuses plaintext on the generation endpoints under
pcc, keeps BodyLimit around the sealing layer, and measures itself exactly as `ccserve release` does with the same flags."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ccserve.attest.envelope import REQUEST_MEDIA_TYPE, RESPONSE_MEDIA_TYPE, seal_request
from ccserve.attest.identity import NodeIdentity
from ccserve.attest.log_http import build_log_app
from ccserve.attest.measure import measure, measurement_config
from ccserve.attest.note import Signer
from ccserve.attest.tlog import TransparencyLog
from ccserve.cli import main
from ccserve.client import SecureClient
from ccserve.config import EngineConfig, ServerOptions
from ccserve.router.serve import BackgroundServer
from ccserve.server.api import MAX_BODY_BYTES
from ccserve.server.node import node_identity
from tests.server.conftest import MODEL, LiveServer, start_server

ENGINE = dict(max_model_len=256, num_gpu_blocks=48)


@pytest.fixture(scope="module")
def release(tiny_model_path: Path, tmp_path_factory) -> Iterator[tuple[NodeIdentity, str, str]]:
    """The tiny model published as a release in a log served on loopback: (identity, log URL, log key)."""
    directory = tmp_path_factory.mktemp("attested-log") / "log"
    signer = Signer.generate("server-tests.example/releases")
    config = EngineConfig(model=str(tiny_model_path), device="cpu", **ENGINE)
    measurement = measure(measurement_config(config, ServerOptions(attest=True)), tiny_model_path, progress=False)
    TransparencyLog.create(directory, signer).append(measurement.entry(), signer)
    with BackgroundServer(build_log_app(directory)) as log:
        yield NodeIdentity(measurement), log.url, signer.verifier.encode()


@pytest.fixture(scope="module")
def node(tiny_model_path: Path, release) -> Iterator[LiveServer]:
    live = start_server(tiny_model_path, identity=release[0], require_sealed=True, **ENGINE)
    yield live
    live.stop()


def client(node: LiveServer, release, tmp_path) -> SecureClient:
    _, log_url, log_key = release
    return SecureClient(node.base_url, log_url=log_url, log_key=log_key, state_dir=tmp_path)


CHAT = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=6, ignore_eos=True)


def test_sealed_chat_completion_whole_and_streamed(node, release, tmp_path):
    with client(node, release, tmp_path) as c:
        reply = c.chat.completions.create(**CHAT)
        assert reply["usage"]["completion_tokens"] == 6 and reply["choices"][0]["finish_reason"] == "length"
        events = list(c.chat.completions.create(stream=True, **CHAT))
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        assert events[-1]["choices"][0]["finish_reason"] == "length" and text
        done = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, ignore_eos=True)
        assert done["usage"]["completion_tokens"] == 4
    node.wait_idle()


def test_plaintext_is_refused_where_prompts_go_and_nowhere_else(node):
    r = httpx.post(f"{node.base_url}/v1/chat/completions", json=CHAT)
    assert r.status_code == 415 and r.json()["error"]["code"] == "sealed_request_required"
    assert httpx.post(f"{node.base_url}/v1/completions", json={"prompt": "hi"}).status_code == 415
    assert httpx.get(f"{node.base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{node.base_url}/v1/models").json()["data"][0]["id"] == MODEL
    assert httpx.get(f"{node.base_url}/attestation", params={"nonce": "ab" * 32}).status_code == 200


def test_an_error_of_the_app_travels_sealed(node, release):
    identity = release[0]
    sealed, opener = seal_request([identity.hpke_public_key], json.dumps({**CHAT, "max_tokens": -1}).encode())
    r = httpx.post(f"{node.base_url}/v1/chat/completions", content=sealed, headers={"content-type": REQUEST_MEDIA_TYPE})
    assert r.status_code == 200 and r.headers["content-type"] == RESPONSE_MEDIA_TYPE  # outside: like any answer
    head, *body = opener.feed(r.content)
    opener.finish()
    assert json.loads(head)["status"] == 400 and b"max_tokens" in b"".join(body)


def test_body_limit_wraps_the_sealing_layer(node):
    """An oversized sealed body is refused by the server's BodyLimit (around SealedBody) before it is read when its
    length is declared, and while SealedBody reads it when chunked: an OpenAI-style 413 both times, not a crash."""
    big = b"\x02" * (MAX_BODY_BYTES + 1)
    url, headers = f"{node.base_url}/v1/chat/completions", {"content-type": REQUEST_MEDIA_TYPE}
    r = httpx.post(url, content=big, headers=headers, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunked = (big[i:i + 2**20] for i in range(0, len(big), 2**20))  # no Content-Length: counted while read
    r = httpx.post(url, content=chunked, headers=headers, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{node.base_url}/health").status_code == 200


def test_without_an_identity_nothing_changes(server):
    """The shared, unattested server: no /attestation route, plain requests served."""
    assert httpx.get(f"{server.base_url}/attestation", params={"nonce": "ab" * 32}).status_code == 404
    r = httpx.post(f"{server.base_url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_the_node_measures_what_release_publishes(tiny_model_path, capsys):
    """`ccserve release` and `ccserve serve` with the same flags measure the same, whatever the machine-local
    options (port, router, capacity, advertise URL); a flag that changes behaviour changes the measurement."""
    flags = ["--model", str(tiny_model_path), "--device", "cpu", "--max-model-len", "256", "--attest"]
    main(["release", *flags, "--dry-run"])
    published = json.loads(capsys.readouterr().out)["measurement"]
    config = EngineConfig(model=str(tiny_model_path), device="cpu", max_model_len=256)
    local = ServerOptions(attest=True, port=0, router="http://127.0.0.1:1", capacity=3,
                          advertise_url="http://node.test:9")
    assert node_identity(config, local).measurement.digest == published
    assert node_identity(config, ServerOptions(attest=True, max_queue=7)).measurement.digest != published
