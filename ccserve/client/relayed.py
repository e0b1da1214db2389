"""An OpenAI-style client for a whole deployment, reached only through its OHTTP relay (docs/router.md):

    client = RelayedClient("http://relay:8081", issuer_url="http://issuer:8083", credential="...",
                           log_url="http://log:8100", log_key="example.com/ccserve-releases+...",
                           state_dir="~/.ccserve-client")
    for event in client.chat.completions.create(model="m", messages=[...], stream=True):
        print(event["choices"][0]["delta"].get("content", ""), end="")

Before the first prompt leaves it, the client fetches the node list through the relay, then each listed node's
evidence through the relay for a nonce of its own, and verifies every node as SecureClient verifies one
(signature, freshness, root, the measurement in the transparency log, the log consistent with what this client saw
before). Nodes that fail are left out (`refused` says why). The router draws the serving node after the client
sends, so each request is sealed once to every verified node (attest/envelope.py), carries one anonymous token
(fetched from the issuer in batches), and travels as chunked OHTTP; only this client can open the response.

Who sees what: the relay, this client's address and ciphertext sizes; the gateway, the token, method, path and the
sealed body's size; the node, the request, but not who sent it. A node the client refused can be drawn only if the
router counts it as attested; it cannot open the request (it is no recipient), and the client resends.

Retries (each with a fresh token, after fetching the node list again), up to `retries` times: the drawn node could
not open the request (the node set changed since it was sealed), or could not be reached. A node that fails
mid-response raises GatewayError (502) where the stream stops; the output yielded before it is all there is.
"""
from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx

from ccserve.attest.envelope import REQUEST_MEDIA_TYPE, RESPONSE_MEDIA_TYPE, ResponseOpener, seal_request
from ccserve.attest.errors import MalformedEvidence, SealedMessageError, VerificationError
from ccserve.attest.hardware import HardwareVerifier
from ccserve.client.openai_api import OpenAIStyle
from ccserve.client.verify import DEFAULT_MAX_AGE, NONCE_LEN, NodeVerifier, VerifiedNode, parse_evidence_response
from ccserve.router import bhttp
from ccserve.router.errors import ERROR_TRAILER, DecryptError, MalformedMessage
from ccserve.router.issuer import fetch_tokens
from ccserve.router.oblivious import ObliviousClient
from ccserve.router.tokens import TOKEN_HEADER, Token

Event = bhttp.Head | bytes | bhttp.Trailers


class NoVerifiedNode(VerificationError):
    """No node the router lists passed verification (or it lists none): nothing was sent."""


class GatewayError(Exception):
    """The gateway answered instead of a node (inside OHTTP, so it is the gateway's word): the token was refused
    (401), no node is available (503), or the node drawn could not be reached or failed mid-response (502)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class RelayedClient(OpenAIStyle):
    def __init__(self, relay_url: str, *, issuer_url: str, credential: str, log_url: str, log_key: str,
                 state_dir: str | Path, require_hardware: bool = False,
                 hardware_verifiers: dict[str, HardwareVerifier] | None = None, max_age: float = DEFAULT_MAX_AGE,
                 token_batch: int = 16, retries: int = 2, timeout: float = 120,
                 http: httpx.Client | None = None) -> None:
        super().__init__()
        self._own_http = http is None
        self.http = http or httpx.Client(timeout=timeout)
        self.relay = ObliviousClient(relay_url, self.http)
        self.verifier = NodeVerifier(log_url, log_key, str(Path(state_dir).expanduser()), self.http,
                                     require_hardware=require_hardware, hardware_verifiers=hardware_verifiers,
                                     max_age=max_age)
        self.issuer_url, self._credential = issuer_url, credential
        self.token_batch, self.retries = token_batch, retries
        self._tokens: list[Token] = []
        self._verified: dict[str, VerifiedNode] = {}     # node id -> verified once, kept while listed
        self._recipients: list[VerifiedNode] = []
        self.refused: dict[str, VerificationError] = {}  # node id -> why, as of the last refresh
        self._lock = threading.RLock()

    # ---- the nodes -----------------------------------------------------------------------------------------

    @property
    def nodes(self) -> list[VerifiedNode]:
        """The verified nodes requests are sealed to (the node list is fetched and verified on first use)."""
        with self._lock:
            return list(self._recipients) or self.refresh()

    def refresh(self) -> list[VerifiedNode]:
        """Fetch the node list through the relay and verify every listed node not verified yet; the verified
        ones. NoVerifiedNode when none passes."""
        with self._lock:
            listed = self._listing()
            self.refused = {}
            for node_id, url, hpke, signing in listed:
                if node_id not in self._verified:
                    try:
                        self._verified[node_id] = self._verify(node_id, url, hpke, signing)
                    except VerificationError as exc:
                        self.refused[node_id] = exc
            self._verified = {i: n for i, n in self._verified.items() if i in {e[0] for e in listed}}
            self._recipients = list(self._verified.values())
            if not self._recipients:
                reasons = "; ".join(f"{i[:12]}: {type(e).__name__}: {e}" for i, e in self.refused.items())
                raise NoVerifiedNode(f"none of the {len(listed)} nodes the router lists passed verification"
                                     + (f" ({reasons})" if reasons else ": start attested nodes"))
            return list(self._recipients)

    def _listing(self) -> list[tuple[str, str, bytes, bytes]]:
        response = self._fetch(bhttp.Request("GET", "/nodes"))
        try:
            if response.status != 200:
                raise ValueError(f"status {response.status}")
            return [(e["node_id"], e["url"], _b64(e["hpke_public_key"]), _b64(e["signing_public_key"]))
                    for e in json.loads(response.content)["nodes"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedEvidence(f"the router's node list (through the relay) is not one ({exc})") from None

    def _verify(self, node_id: str, url: str, hpke: bytes, signing: bytes) -> VerifiedNode:
        nonce = secrets.token_bytes(NONCE_LEN)
        response = self._fetch(bhttp.Request("GET", f"/nodes/{node_id}/attestation?nonce={nonce.hex()}"))
        evidence = parse_evidence_response(response.status, response.content, f"{url} (through the relay)")
        node = self.verifier.verify(url, evidence, nonce)
        if (node.hpke_public_key, node.signing_key) != (hpke, signing):
            raise MalformedEvidence(f"the router lists other keys for the node at {url} than the node attests")
        return node

    def _fetch(self, request: bhttp.Request) -> bhttp.Response:
        """A small whole request through the relay, answered by the gateway itself (no token)."""
        try:
            return self.relay.send(request)
        except (DecryptError, MalformedMessage) as exc:
            raise SealedMessageError(f"the gateway's answer does not open ({exc}): altered on the way") from None

    # ---- one request -----------------------------------------------------------------------------------------

    def _send(self, path: str, body: dict, stream: bool) -> tuple[int, str, Iterator[bytes]]:
        payload = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            sealed, opener = seal_request([n.hpke_public_key for n in self.nodes], payload)
            request = bhttp.Request("POST", path, content=sealed, headers=[
                ("content-type", REQUEST_MEDIA_TYPE), ("accept", RESPONSE_MEDIA_TYPE), (TOKEN_HEADER, self._token())])
            events = self._events(request, stream)
            head = next(events)
            if head.status == 200 and head.header("content-type") == RESPONSE_MEDIA_TYPE:
                chunks = _opened(events, opener)
                inner = json.loads(next(chunks))
                return int(inner["status"]), inner["content-type"], chunks if stream else iter(list(chunks))
            status, code, message = _refusal(head, events)
            if attempt < self.retries and (status == 502 or (status, code) == (400, "sealed_request")):
                self.refresh()
                continue
            raise GatewayError(status, message)
        raise AssertionError("unreachable")

    def _events(self, request: bhttp.Request, stream: bool) -> Iterator[Event]:
        """The gateway's answer as Head, content chunks, Trailers; OHTTP failures as SealedMessageError."""
        try:
            if stream:
                yield from self.relay.stream(request)
                return
            response = self.relay.send(request)
            yield bhttp.Head(response.status, response.headers)
            yield response.content
            yield bhttp.Trailers(response.trailers)
        except (DecryptError, MalformedMessage) as exc:
            raise SealedMessageError(f"the gateway's response does not open ({exc}): it was altered or cut on the "
                                     "way") from None

    def _token(self) -> str:
        with self._lock:
            if not self._tokens:
                self._tokens = fetch_tokens(self.issuer_url, self._credential, self.token_batch, self.http)
            return self._tokens.pop().header_value()

    def close(self) -> None:
        if self._own_http:
            self.http.close()

    def __enter__(self) -> RelayedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _opened(events: Iterator[Event], opener: ResponseOpener) -> Iterator[bytes]:
    """Plaintext chunks of the node's sealed response, as they arrive; a node that failed mid-response is reported
    by the gateway's (authenticated) trailer, anything else that breaks the stream is a SealedMessageError."""
    for event in events:
        if isinstance(event, bytes):
            yield from opener.feed(event)
        elif isinstance(event, bhttp.Trailers) and event.get(ERROR_TRAILER):
            raise GatewayError(502, f"the node serving this request failed mid-response ({event.get(ERROR_TRAILER)})"
                                    ": the gateway now avoids it; send the request again")
    opener.finish()


def _refusal(head: bhttp.Head, events: Iterator[Event]) -> tuple[int, str | None, str]:
    """(status, error code, message) of an answer that is not a sealed response: the gateway's own error, or the
    node's refusal to open the request (code sealed_request)."""
    data = b"".join(e for e in events if isinstance(e, bytes))
    if head.status == 200:
        raise SealedMessageError(f"the node answered 200 {head.header('content-type')!r} instead of a sealed "
                                 "response")
    try:
        error = json.loads(data)["error"]
        return head.status, error.get("code"), str(error.get("message"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return head.status, None, data[:200].decode(errors="replace")


def _b64(text: object) -> bytes:
    try:
        return base64.b64decode(str(text).encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("a key in the node list is not base64") from None
