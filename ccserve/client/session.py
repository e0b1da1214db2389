"""An OpenAI-style client for one node it talks to directly: it verifies the node before it sends anything and
seals every request to the node's attested key:

    client = SecureClient("http://node:8000", log_url="http://log:8100", log_key="log.example/ccserve+...",
                          state_dir="~/.ccserve-client")
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    for event in client.chat.completions.create(model="m", messages=[...], stream=True):
        print(event["choices"][0]["delta"].get("content", ""), end="")

Whoever carries the bytes (a proxy, the node's operator) sees only ciphertext, in both directions; a chunk
altered, reordered, dropped or cut off raises SealedMessageError. If the node restarted (new keys), the first
request is refused unopened; the client verifies the node again and resends once. Behind a router, where the
node is drawn after sealing, use relayed.RelayedClient instead.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx

from ccserve.attest.envelope import REQUEST_MEDIA_TYPE, RESPONSE_MEDIA_TYPE, ResponseOpener, seal_request
from ccserve.attest.errors import SealedMessageError
from ccserve.attest.hardware import HardwareVerifier
from ccserve.client.openai_api import OpenAIStyle
from ccserve.client.verify import DEFAULT_MAX_AGE, VerifiedNode, verify_node


class SecureClient(OpenAIStyle):
    def __init__(self, base_url: str, *, log_url: str, log_key: str, state_dir: str | Path,
                 require_hardware: bool = False, hardware_verifiers: dict[str, HardwareVerifier] | None = None,
                 max_age: float = DEFAULT_MAX_AGE, timeout: float = 120, http: httpx.Client | None = None) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self._verify_args = dict(log_url=log_url, log_key=log_key, state_dir=str(Path(state_dir).expanduser()),
                                 require_hardware=require_hardware, hardware_verifiers=hardware_verifiers,
                                 max_age=max_age)
        self._own_http = http is None
        self.http = http or httpx.Client(timeout=timeout)
        self._node: VerifiedNode | None = None

    def verify(self) -> VerifiedNode:
        """Verify the node now (evidence, log, consistency); every request needs a verified node."""
        self._node = verify_node(self.base_url, http=self.http, **self._verify_args)
        return self._node

    @property
    def node(self) -> VerifiedNode:
        return self._node or self.verify()

    def _send(self, path: str, body: dict, stream: bool) -> tuple[int, str, Iterator[bytes]]:
        for attempt in (0, 1):
            sealed, opener = seal_request([self.node.hpke_public_key], json.dumps(body).encode())
            request = self.http.build_request("POST", self.base_url + path, content=sealed,
                                              headers={"content-type": REQUEST_MEDIA_TYPE})
            response = self.http.send(request, stream=True)
            if response.status_code == 400 and attempt == 0 and _unopened(response):
                self.verify()  # the node restarted with new keys: re-attest it and seal again
                continue
            if response.status_code != 200 or response.headers.get("content-type") != RESPONSE_MEDIA_TYPE:
                text = response.read().decode(errors="replace")[:300]
                response.close()
                kind = response.headers.get("content-type")
                raise SealedMessageError(f"the node answered {response.status_code} {kind!r} instead of a sealed "
                                         f"response: {text}")
            chunks = _opened(response, opener)
            head = json.loads(next(chunks))
            if not stream:
                chunks = iter(list(chunks))
            return int(head["status"]), head["content-type"], chunks
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._own_http:
            self.http.close()

    def __enter__(self) -> SecureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unopened(response: httpx.Response) -> bool:
    """A 400 from the sealing layer itself (the request was never opened), not from the app."""
    if response.headers.get("content-type") != "application/json":
        return False
    response.read()
    response.close()
    try:
        return response.json()["error"]["code"] == "sealed_request"
    except (ValueError, KeyError, TypeError):
        return False


def _opened(response: httpx.Response, opener: ResponseOpener) -> Iterator[bytes]:
    """Plaintext chunks of a sealed response as they arrive; SealedMessageError on any tampering."""
    try:
        for data in response.iter_raw():
            yield from opener.feed(data)
        opener.finish()
    finally:
        response.close()
