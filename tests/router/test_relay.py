"""The relay forwards ciphertext and nothing that identifies the client, in either direction."""
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ccserve.router import ohttp, ohttp_chunked, relay
from ccserve.router.serve import BackgroundServer

IDENTIFYING = {"cookie": "session=alice", "authorization": "Bearer alice", "user-agent": "AliceBrowser/1.0",
               "x-forwarded-for": "203.0.113.7", "forwarded": "for=203.0.113.7", "via": "1.1 alice-proxy",
               "x-real-ip": "203.0.113.7", "referer": "https://alice.example/", "accept-language": "fr-CH",
               "x-request-id": "alice-42", "proxy-authorization": "Basic YWxpY2U6cHc="}


class GatewayRecorder:
    """Stands where the gateway is and records what reaches it; answers with identifying headers of its own,
    which the relay must not pass back to the client either."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict, bytes]] = []

    def app(self) -> Starlette:
        async def gateway(request: Request) -> Response:
            self.seen.append((dict(request.headers), await request.body()))
            headers = {"set-cookie": "gw=1", "x-gateway-node": "node7", "server": "gw/1.0"}
            if request.headers["content-type"] == ohttp_chunked.REQUEST_MEDIA_TYPE:
                async def chunks():
                    for part in (b"nonce...", b"chunk1", b"chunk2"):
                        yield part
                return StreamingResponse(chunks(), media_type=ohttp_chunked.RESPONSE_MEDIA_TYPE, headers=headers)
            return Response(b"sealed-response", media_type=ohttp.RESPONSE_MEDIA_TYPE, headers=headers)

        async def keys(request: Request) -> Response:
            self.seen.append((dict(request.headers), b""))
            return Response(b"keys", media_type=ohttp.KEYS_MEDIA_TYPE, headers={"set-cookie": "gw=1"})

        return Starlette(routes=[Route("/gateway", gateway, methods=["POST"]), Route("/ohttp-keys", keys)])


@pytest.fixture
def path():
    recorder = GatewayRecorder()
    with BackgroundServer(recorder.app()) as gw:
        _, app = relay.build(gw.url, max_request_bytes=1 << 16)
        with BackgroundServer(app) as rl, httpx.Client(timeout=10) as http:
            yield recorder, rl.url, http


@pytest.mark.parametrize("media_type", [ohttp.REQUEST_MEDIA_TYPE, ohttp_chunked.REQUEST_MEDIA_TYPE])
def test_relay_strips_every_client_header(path, media_type):
    recorder, relay_url, http = path
    reply = http.post(relay_url + "/", content=b"\x01ciphertext", headers={**IDENTIFYING, "content-type": media_type})
    assert reply.status_code == 200
    headers, body = recorder.seen[-1]
    assert body == b"\x01ciphertext"
    expected = {"host", "content-length", "content-type"} | ({"incremental"} if "chunked" in media_type else set())
    assert set(headers) == expected and headers["content-type"] == media_type
    assert not set(IDENTIFYING) & set(reply.headers), "the gateway's headers must not reach the client either"
    assert "set-cookie" not in reply.headers and "x-gateway-node" not in reply.headers
    assert "server" not in reply.headers and "date" not in reply.headers
    assert reply.content in (b"sealed-response", b"nonce...chunk1chunk2")


def test_keys_are_fetched_for_the_client(path):
    recorder, relay_url, http = path
    reply = http.get(relay_url + "/ohttp-keys", headers=IDENTIFYING)
    assert reply.content == b"keys" and reply.headers["content-type"] == ohttp.KEYS_MEDIA_TYPE
    assert set(recorder.seen[-1][0]) == {"host"} and "set-cookie" not in reply.headers


def test_relay_refuses_what_is_not_an_encapsulated_request(path):
    recorder, relay_url, http = path
    assert http.post(relay_url + "/", content=b"x", headers={"content-type": "application/json"}).status_code == 415
    assert http.post(relay_url + "/", content=b"", headers={"content-type": ohttp.REQUEST_MEDIA_TYPE}).status_code \
        == 400
    big = b"x" * ((1 << 16) + 1)
    assert http.post(relay_url + "/", content=big, headers={"content-type": ohttp.REQUEST_MEDIA_TYPE}).status_code \
        == 413
    assert recorder.seen == []
    stats = http.get(relay_url + "/stats").json()
    assert stats == {"forwarded": 0, "gateway_unreachable": 0, "unsupported_media_type": 1, "too_large": 1,
                     "empty": 1, "keys_fetched": 0}


def test_unreachable_gateway_is_a_clean_502():
    _, app = relay.build("http://127.0.0.1:9")      # discard port: nothing listens
    with BackgroundServer(app) as rl:
        reply = httpx.post(rl.url + "/", content=b"x", headers={"content-type": ohttp.REQUEST_MEDIA_TYPE})
        assert reply.status_code == 502 and "gateway" in reply.json()["error"]
