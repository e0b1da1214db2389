"""SecureClient end to end over loopback: OpenAI-style calls sealed both ways, streamed; a relay that flips a
byte, drops a chunk or cuts the stream is caught; a node that restarts with new keys is re-attested."""
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ccserve.attest.errors import SealedMessageError, StaleEvidence
from ccserve.attest.identity import NodeIdentity
from ccserve.attest.log_http import build_log_app
from ccserve.client import APIError, SecureClient
from tests.attest.live import make_log, make_model_dir, node_app, released_identity, serve


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("session")
    log, signer = make_log(tmp / "log")
    identity = released_identity(make_model_dir(tmp / "model"), log, signer)
    node, log_server = serve(node_app(identity)), serve(build_log_app(tmp / "log"))
    yield dict(identity=identity, node=node.url, log_url=log_server.url, vkey=signer.verifier.encode())
    node.stop()
    log_server.stop()


def client(world, tmp_path, node=None, **kw):
    return SecureClient(node or world["node"], log_url=world["log_url"], log_key=world["vkey"], state_dir=tmp_path,
                        **kw)


MESSAGES = [{"role": "user", "content": "the secret plan is ready"}]


def test_chat_completion_round_trip(world, tmp_path):
    with client(world, tmp_path) as c:
        reply = c.chat.completions.create(model="m", messages=MESSAGES)
        assert reply["choices"][0]["message"]["content"] == "the secret plan is ready"
        assert c.node.hpke_public_key == world["identity"].hpke_public_key


def test_streamed_chat_completion(world, tmp_path):
    with client(world, tmp_path) as c:
        words = [e["choices"][0]["delta"]["content"] for e in c.chat.completions.create(model="m", messages=MESSAGES,
                                                                                        stream=True)]
    assert words == ["the", "secret", "plan", "is", "ready"]


def test_an_error_from_the_node_arrives_sealed(world, tmp_path):
    with client(world, tmp_path) as c, pytest.raises(APIError) as err:
        c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=0)
    assert err.value.status == 400 and "max_tokens" in str(err.value)


class TamperingRelay:
    """What a malicious relay or operator can do to the response bytes on their way to the client."""

    def __init__(self, app: ASGIApp, mode: str) -> None:
        self.app, self.mode = app, mode

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/attestation":
            return await self.app(scope, receive, send)
        count, ended = 0, False

        async def tamper(message: Message) -> None:
            nonlocal count, ended
            if ended:
                return
            if message["type"] == "http.response.body":
                count += 1
                body = message.get("body", b"")
                if self.mode == "flip" and count == 2 and body:
                    body = body[:-1] + bytes([body[-1] ^ 1])
                elif self.mode == "drop" and count == 3:
                    body = b""
                elif self.mode == "cut" and not message.get("more_body", False):
                    body = b""  # everything but the final sealed chunk
                message = {**message, "body": body}
                if self.mode == "end-early" and count == 4:
                    message, ended = {**message, "more_body": False}, True
            await send(message)

        await self.app(scope, receive, tamper)


@pytest.mark.parametrize("mode", ["none", "flip", "drop", "cut", "end-early"])
def test_a_tampering_relay_is_caught(world, tmp_path, mode):
    server = serve(TamperingRelay(node_app(world["identity"]), mode))
    try:
        with client(world, tmp_path, node=server.url) as c:
            if mode == "none":  # the relay itself is transparent: only its tampering breaks the stream
                assert len(list(c.chat.completions.create(model="m", messages=MESSAGES, stream=True))) == 5
                return
            with pytest.raises(SealedMessageError):
                list(c.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    finally:
        server.stop()


def test_a_restarted_node_is_attested_again(world, tmp_path):
    """New process, new keys: the request sealed to the old key is refused unopened; the client re-verifies."""
    first = NodeIdentity(world["identity"].measurement)
    second = NodeIdentity(world["identity"].measurement)
    server = serve(node_app(first))
    with client(world, tmp_path, node=server.url) as c:
        assert c.verify().hpke_public_key == first.hpke_public_key
        server.stop()
        restarted = serve(node_app(second), port=int(server.url.rsplit(":", 1)[1]))
        try:
            reply = c.chat.completions.create(model="m", messages=MESSAGES)
            assert reply["choices"][0]["message"]["content"] == "the secret plan is ready"
            assert c.node.hpke_public_key == second.hpke_public_key
        finally:
            restarted.stop()


def test_verification_failure_sends_nothing(world, tmp_path):
    """A client whose checks fail never seals a request: the refusal comes before any request byte is sent."""
    with client(world, tmp_path, max_age=-1) as c, pytest.raises(StaleEvidence):
        c.chat.completions.create(model="m", messages=MESSAGES)
