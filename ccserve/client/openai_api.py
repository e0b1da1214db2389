"""The OpenAI-shaped surface both clients share: `client.chat.completions.create(...)`,
`client.completions.create(...)`, whole or streamed, over one method a client implements: `_send(path, body,
stream)` -> (status, content type, plaintext chunks), the app's answer opened from its sealed response.

Replies are the server's JSON as dicts (stream events too).
"""
from __future__ import annotations

import json
from collections.abc import Iterator


class APIError(Exception):
    """The node opened the request and answered with an HTTP error (inside the sealed response)."""

    def __init__(self, status: int, body: object) -> None:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        super().__init__(f"{status}: {message or body}")
        self.status, self.body = status, body


class OpenAIStyle:
    def __init__(self) -> None:
        self.chat = _Chat(self)
        self.completions = _Endpoint(self, "/v1/completions")

    def _send(self, path: str, body: dict, stream: bool) -> tuple[int, str, Iterator[bytes]]:
        raise NotImplementedError

    def post(self, path: str, body: dict) -> dict:
        """One sealed JSON request; the node's JSON reply. APIError for an HTTP error from the node."""
        status, _, chunks = self._send(path, body, stream=False)
        data = b"".join(chunks)
        payload = json.loads(data) if data else None
        if status >= 400:
            raise APIError(status, payload)
        return payload

    def stream(self, path: str, body: dict) -> Iterator[dict]:
        """A sealed streaming request: the server-sent events' JSON objects as their chunks arrive."""
        status, _, chunks = self._send(path, {**body, "stream": True}, stream=True)
        if status >= 400:
            raise APIError(status, json.loads(b"".join(chunks) or b"null"))
        buf = b""
        for chunk in chunks:
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.splitlines():
                    if line.startswith(b"data:"):
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            for _ in chunks:  # read to the sealed end, so a cut stream is caught even here
                                pass
                            return
                        yield json.loads(data)


class _Endpoint:
    def __init__(self, client: OpenAIStyle, path: str) -> None:
        self._client, self._path = client, path

    def create(self, stream: bool = False, **body: object) -> dict | Iterator[dict]:
        """Like openai's `create`: a dict, or an iterator of event dicts with stream=True."""
        if stream:
            return self._client.stream(self._path, body)
        return self._client.post(self._path, body)


class _Chat:
    def __init__(self, client: OpenAIStyle) -> None:
        self.completions = _Endpoint(client, "/v1/chat/completions")
