"""The client's side of the oblivious path: binary HTTP requests sealed to the gateway, sent through the relay.

Requests are padded to a power-of-two size class before sealing. `send` is for a whole response (RFC 9458);
`stream` uses chunked OHTTP and yields the response as the node
produces it: one bhttp.Head, content chunks (bytes), one bhttp.Trailers. A stream that ends without its sealed
final chunk raises DecryptError, so a relay cannot pass off a cut response as complete. The body of the inner
request is whatever the caller puts there; ccserve.client puts a request sealed to the nodes' keys, so neither
the relay nor the gateway can read it.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx

from ccserve.router import bhttp, ohttp, ohttp_chunked
from ccserve.router.errors import DecryptError, RouterError


MIN_SIZE_CLASS = 1024


def padded(request: bhttp.Request) -> bytes:
    """The binary HTTP request zero-padded (RFC 9292 section 3.8) to the next power of two of at least 1 KiB,
    so the relay, which sees ciphertext lengths, learns only a coarse size class."""
    encoded = bhttp.encode_request(request)
    size_class = max(MIN_SIZE_CLASS, 1 << (len(encoded) - 1).bit_length())
    return encoded + bytes(size_class - len(encoded))


class RelayRefused(RouterError):
    """The relay or the gateway refused the encapsulated request before decrypting it (a plain HTTP error):
    the key configuration may be stale (fetch it again), or the request too large."""


class ObliviousClient:
    def __init__(self, relay_url: str, http: httpx.Client, key_config: ohttp.KeyConfig | None = None) -> None:
        """`key_config`: the gateway's key configuration if the caller obtained and authenticated it another
        way; otherwise it is fetched through the relay on first use."""
        self.relay_url, self._http, self._config = relay_url.rstrip("/"), http, key_config
        self._lock = threading.Lock()

    def key_config(self) -> ohttp.KeyConfig:
        """The gateway's key configuration, fetched once (under a lock: clients share one ObliviousClient)."""
        with self._lock:
            if self._config is None:
                response = self._http.get(self.relay_url + "/ohttp-keys")
                if response.status_code != 200:
                    raise RelayRefused(f"relay answered {response.status_code} for the gateway's key configuration")
                self._config = ohttp.decode_key_configs(response.content)[0]
            return self._config

    def forget_key_config(self) -> None:
        """Fetch the configuration again on next use (after a RelayRefused: the gateway may have a new key)."""
        with self._lock:
            self._config = None

    def _post(self, content_type: str, body: bytes):
        return self._http.stream("POST", self.relay_url + "/", content=body, headers={"content-type": content_type})

    def send(self, request: bhttp.Request) -> bhttp.Response:
        enc_request, context = ohttp.encapsulate_request(self.key_config(), padded(request))
        with self._post(ohttp.REQUEST_MEDIA_TYPE, enc_request) as response:
            body = response.read()
            _check_outer(response, ohttp.RESPONSE_MEDIA_TYPE)
        return bhttp.decode_response(context.open_response(body))

    def stream(self, request: bhttp.Request) -> Iterator[bhttp.Head | bytes | bhttp.Trailers]:
        enc_request, context = ohttp_chunked.encapsulate_request(self.key_config(), padded(request))
        with self._post(ohttp_chunked.REQUEST_MEDIA_TYPE, enc_request) as response:
            if response.status_code != 200:
                response.read()
            _check_outer(response, ohttp_chunked.RESPONSE_MEDIA_TYPE)
            opener, decoder = context.response_opener(), bhttp.ResponseStreamDecoder()
            for data in response.iter_raw():
                for chunk in opener.feed(data):
                    yield from decoder.feed(chunk)
            yield from decoder.feed(opener.finish())
            yield from decoder.finish()


def _check_outer(response: httpx.Response, media_type: str) -> None:
    if response.status_code != 200 or response.headers.get("content-type", "").split(";")[0] != media_type:
        detail = response.text[:200] if response.is_stream_consumed else ""
        raise RelayRefused(f"relay answered {response.status_code} ({response.headers.get('content-type')}) "
                           f"instead of {media_type}: {detail}")


__all__ = ["ObliviousClient", "RelayRefused", "DecryptError"]
