"""A node's side of registration: attest to the router once (evidence answering the router's nonce), then send a
fresh signed report of URL, capacity and public keys every `interval` seconds (the heartbeat that keeps the node
healthy there). If the router has forgotten the node (it restarted), the agent attests again.

The node's identity (ccserve.attest.NodeIdentity: keys made in memory, the measurement) signs the reports and
makes the evidence; the HPKE public key is the one clients seal request bodies to. Nothing about requests is
ever reported.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import httpx

from ccserve.router.errors import NodeRefused
from ccserve.router.nodes import NodeReport, SignedReport, sign_report


class AttestedNode(Protocol):
    """What the agent needs of the node's identity (ccserve.attest.NodeIdentity has exactly this)."""

    hpke_public_key: bytes
    signing_public_key: bytes

    def sign(self, context: str, message: bytes) -> bytes: ...

    def evidence(self, nonce: bytes) -> dict: ...


class NodeAgent:
    def __init__(self, router_url: str, url: str, capacity: int, node: AttestedNode, interval: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.router_url, self.url, self.capacity = router_url.rstrip("/"), url, capacity
        self._node, self.interval, self._clock = node, interval, clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_timestamp = 0.0

    def report(self) -> SignedReport:
        """A freshly signed report; timestamps strictly increase, as the router requires."""
        timestamp = max(self._clock(), self._last_timestamp + 1e-3)
        self._last_timestamp = timestamp
        report = NodeReport(self.url, self.capacity, self._node.hpke_public_key, self._node.signing_public_key,
                            timestamp)
        return sign_report(report, self._node)

    def send_once(self, http: httpx.Client, attest: bool = False) -> dict:
        """One report; with `attest`, evidence for a fresh router nonce goes with it. A router that answers
        `attestation_required` gets the evidence at once."""
        body = self.report().to_json()
        if attest:
            body["evidence"] = self._node.evidence(self._challenge(http))
        response = http.post(self.router_url + "/nodes/register", json=body)
        if response.status_code == 403 and not attest and _code(response) == "attestation_required":
            return self.send_once(http, attest=True)
        if response.status_code != 200:
            raise NodeRefused(f"router refused this node's report ({response.status_code}): {_message(response)}")
        return response.json()

    def _challenge(self, http: httpx.Client) -> bytes:
        response = http.get(self.router_url + "/nodes/challenge")
        if response.status_code != 200:
            raise NodeRefused(f"router gave no nonce for this node's evidence ({response.status_code})")
        return bytes.fromhex(response.json()["nonce"])

    def start(self) -> NodeAgent:
        """Attest and report now (raising NodeRefused if refused, httpx.HTTPError if the router cannot be
        reached), then keep reporting on a daemon thread until stop()."""
        with httpx.Client(timeout=30) as http:
            self.send_once(http, attest=True)
        self._thread = threading.Thread(target=self._loop, name="ccserve-node-agent", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.wait(self.interval):
                try:
                    self.send_once(http)
                except (httpx.HTTPError, NodeRefused):
                    pass    # the router may be restarting; the next heartbeat tries again

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 35)


def _code(response: httpx.Response) -> str | None:
    try:
        return response.json().get("code")
    except (ValueError, AttributeError):
        return None


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error"))
    except (ValueError, AttributeError):
        return response.text[:200]
