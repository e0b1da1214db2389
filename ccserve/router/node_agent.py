"""A node's side of registration: sign a fresh report of URL, capacity and public keys, and send it to the
router every `interval` seconds (the heartbeat that keeps the node healthy there).

The signing key is the node's attested Ed25519 key (ccserve.attest creates it, in memory); the HPKE public key
is the one clients seal request bodies to. Nothing about requests is ever reported.
"""
from __future__ import annotations

import threading
import time

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ccserve.router.errors import NodeRefused
from ccserve.router.nodes import NodeReport, SignedReport, sign_report


class NodeAgent:
    def __init__(self, router_url: str, url: str, capacity: int, hpke_public_key: bytes,
                 signing_key: Ed25519PrivateKey, interval: float = 5.0, clock=time.time) -> None:
        self.router_url, self.url, self.capacity = router_url.rstrip("/"), url, capacity
        self.hpke_public_key, self._signing_key = hpke_public_key, signing_key
        self.interval, self._clock = interval, clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_timestamp = 0.0

    def report(self) -> SignedReport:
        """A freshly signed report; timestamps strictly increase, as the router requires."""
        timestamp = max(self._clock(), self._last_timestamp + 1e-3)
        self._last_timestamp = timestamp
        public = self._signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return sign_report(NodeReport(self.url, self.capacity, self.hpke_public_key, public, timestamp),
                           self._signing_key)

    def send_once(self, http: httpx.Client) -> dict:
        response = http.post(self.router_url + "/nodes/register", json=self.report().to_json())
        if response.status_code != 200:
            raise NodeRefused(f"router refused this node's report ({response.status_code}): "
                              f"{response.json().get('error')}")
        return response.json()

    def start(self) -> NodeAgent:
        """Report now (raising if refused), then keep reporting on a daemon thread until stop()."""
        with httpx.Client(timeout=10) as http:
            self.send_once(http)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self._stop.wait(self.interval):
                try:
                    self.send_once(http)
                except (httpx.HTTPError, NodeRefused):
                    pass    # the router may be restarting; the next heartbeat tries again

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
