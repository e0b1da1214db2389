"""The node's attestation route, the sealing middleware and the log server, over real HTTP on loopback."""
import json

import httpx
import pytest

from ccserve.attest import merkle
from ccserve.attest.checkpoint import open_checkpoint
from ccserve.attest.encoding import b64decode
from ccserve.attest.envelope import REQUEST_MEDIA_TYPE, RESPONSE_MEDIA_TYPE, seal_request
from ccserve.attest.evidence import Evidence
from ccserve.attest.log_http import build_log_app
from tests.attest.live import make_log, make_model_dir, node_app, released_identity, serve


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    log, signer = make_log(tmp / "log")
    identity = released_identity(make_model_dir(tmp / "model"), log, signer)
    node, log_server = serve(node_app(identity)), serve(build_log_app(tmp / "log"))
    yield identity, log, signer, node.url, log_server.url
    node.stop()
    log_server.stop()


def test_attestation_over_http(world):
    identity, _, _, node, _ = world
    r = httpx.get(f"{node}/attestation", params={"nonce": "11" * 32})
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    e = Evidence.parse(r.json())
    e.check_signature()
    assert e.nonce == b"\x11" * 32 and e.hpke_public_key == identity.hpke_public_key
    assert httpx.get(f"{node}/attestation").status_code == 400


def test_sealed_request_and_streamed_response_over_http(world):
    identity, _, _, node, _ = world
    body = {"messages": [{"role": "user", "content": "tell me a secret"}], "stream": True}
    sealed, opener = seal_request([identity.hpke_public_key], json.dumps(body).encode())
    with httpx.stream("POST", f"{node}/v1/chat/completions", content=sealed,
                      headers={"content-type": REQUEST_MEDIA_TYPE}) as r:
        assert r.status_code == 200 and r.headers["content-type"] == RESPONSE_MEDIA_TYPE
        raw = b"".join(r.iter_raw())
    assert b"secret" not in raw
    chunks = opener.feed(raw)
    opener.finish()
    head = json.loads(chunks[0])
    assert head == {"status": 200, "content-type": "text/event-stream; charset=utf-8"}
    text = b"".join(chunks[1:]).decode()
    assert '"tell"' in text and '"secret"' in text and text.endswith("data: [DONE]\n\n")
    assert len(chunks) >= 6  # the stream stays a stream: one sealed chunk per event


def test_plain_requests_are_refused_and_garbage_is_not_opened(world):
    _, _, _, node, _ = world
    r = httpx.post(f"{node}/v1/chat/completions", json={"messages": []})
    assert r.status_code == 415 and REQUEST_MEDIA_TYPE in r.json()["error"]["message"]
    r = httpx.post(f"{node}/v1/chat/completions", content=b"\x01" * 80, headers={"content-type": REQUEST_MEDIA_TYPE})
    assert r.status_code == 400 and r.json()["error"]["code"] == "sealed_request"


def test_log_server_serves_checkpoint_entries_and_proofs(world):
    identity, log, signer, _, url = world
    cp = open_checkpoint(httpx.get(f"{url}/checkpoint").text, signer.verifier)
    assert cp.size == 1 and httpx.get(f"{url}/vkey").text.strip() == signer.verifier.encode()
    entries = httpx.get(f"{url}/entries").json()["entries"]
    assert b64decode(entries[0]["data"], "entry") == identity.measurement.entry()
    r = httpx.get(f"{url}/proof/inclusion", params={"leaf_hash": identity.measurement.leaf_hash.hex(), "tree_size": 1})
    merkle.verify_inclusion(r.json()["leaf_index"], 1, identity.measurement.leaf_hash,
                            [b64decode(h, "h") for h in r.json()["proof"]], cp.root_hash)
    assert httpx.get(f"{url}/proof/inclusion", params={"leaf_hash": "00" * 32, "tree_size": 1}).status_code == 404
    assert httpx.get(f"{url}/proof/consistency", params={"old_size": 1, "new_size": 5}).status_code == 400
    assert httpx.post(f"{url}/checkpoint").status_code == 405  # read-only
    assert httpx.get(f"{url}/docs").status_code == 404 and httpx.get(f"{url}/openapi.json").status_code == 404


def test_log_server_sees_releases_appended_while_it_runs(world):
    _, log, signer, _, url = world
    log.append(b'{"another":"release"}', signer)
    cp = open_checkpoint(httpx.get(f"{url}/checkpoint").text, signer.verifier)
    assert cp.size == 2
    proof = httpx.get(f"{url}/proof/consistency", params={"old_size": 1, "new_size": 2}).json()["proof"]
    merkle.verify_consistency(1, 2, log.root(1), cp.root_hash, [b64decode(h, "h") for h in proof])
