"""The node registry: which nodes may receive requests, and with what weight.

A node reports itself with a signed statement: its URL, its capacity, its HPKE public key (what clients seal
request bodies to) and its Ed25519 signing key, with a timestamp; the signature is by that signing key, the one
its attestation evidence binds (NodeIdentity.sign). The registry accepts a report only if the signature
verifies, the node is attested (`is_attested(report)`: router/attestation.py checked evidence binding both of
the report's keys to a published release), the timestamp is fresh and newer than the node's last one (no
replay), and the fields are sane. A node is healthy while its latest report is younger than `report_ttl` and
the gateway has not seen it fail since.

Capacity is what an attacker holding some nodes would inflate to attract traffic, so it is capped at
`max_capacity`, and two keys cannot claim one URL.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from ccserve.attest.errors import BadSignature
from ccserve.attest.evidence import verify_node_signature
from ccserve.router.errors import NodeRefused, NotAttested

REPORT_CONTEXT = "ccserve node report v1"   # signed as REPORT_CONTEXT || "\n" || canonical JSON of the report
KEY_LEN = 32
IsAttested = Callable[["NodeReport"], bool]
"""Whether a report's keys (signing and HPKE, both) are attested: router/attestation.py."""


class ReportSigner(Protocol):
    """What signs a node's reports: the node's attested identity (ccserve.attest.NodeIdentity)."""

    signing_public_key: bytes

    def sign(self, context: str, message: bytes) -> bytes: ...


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, what: str) -> bytes:
    try:
        data = base64.b64decode(str(text).encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise NodeRefused(f"node report: {what} is not valid base64") from None
    if len(data) != KEY_LEN:
        raise NodeRefused(f"node report: {what} must be {KEY_LEN} bytes")
    return data


@dataclass(frozen=True)
class NodeReport:
    url: str
    capacity: int
    hpke_public_key: bytes
    signing_public_key: bytes
    timestamp: float

    def to_json(self) -> dict:
        return {"url": self.url, "capacity": self.capacity, "hpke_public_key": _b64(self.hpke_public_key),
                "signing_public_key": _b64(self.signing_public_key), "timestamp": self.timestamp}

    @classmethod
    def from_json(cls, data: object) -> NodeReport:
        if not isinstance(data, dict) or set(data) != {"url", "capacity", "hpke_public_key",
                                                        "signing_public_key", "timestamp"}:
            raise NodeRefused("node report must have exactly: url, capacity, hpke_public_key, "
                              "signing_public_key, timestamp")
        capacity, timestamp = data["capacity"], data["timestamp"]
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise NodeRefused("node report: capacity must be a positive integer")
        if not isinstance(timestamp, (int, float)) or isinstance(timestamp, bool) or not math.isfinite(timestamp):
            raise NodeRefused("node report: timestamp must be a number of seconds since the epoch")
        url = data["url"]
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise NodeRefused("node report: url must be an http(s) URL with a host and no query")
        return cls(url.rstrip("/"), capacity, _unb64(data["hpke_public_key"], "hpke_public_key"),
                   _unb64(data["signing_public_key"], "signing_public_key"), float(timestamp))

    def body_bytes(self) -> bytes:
        """What the signature covers, after the context line: the report as canonical JSON."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    @property
    def node_id(self) -> str:
        return self.signing_public_key.hex()


@dataclass(frozen=True)
class SignedReport:
    report: NodeReport
    signature: bytes

    def to_json(self) -> dict:
        return {"report": self.report.to_json(), "signature": _b64(self.signature)}

    @classmethod
    def from_json(cls, data: object) -> SignedReport:
        if not isinstance(data, dict) or set(data) != {"report", "signature"}:
            raise NodeRefused("signed node report must be {\"report\": {...}, \"signature\": base64}")
        try:
            signature = base64.b64decode(str(data["signature"]).encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise NodeRefused("node report: signature is not valid base64") from None
        return cls(NodeReport.from_json(data["report"]), signature)

    def verify(self) -> None:
        try:
            verify_node_signature(self.report.signing_public_key, REPORT_CONTEXT, self.report.body_bytes(),
                                  self.signature)
        except BadSignature:
            raise NodeRefused("node report signature does not verify under the signing key it names") from None


def sign_report(report: NodeReport, signer: ReportSigner) -> SignedReport:
    if signer.signing_public_key != report.signing_public_key:
        raise ValueError("the report names another signing key than the one signing it")
    return SignedReport(report, signer.sign(REPORT_CONTEXT, report.body_bytes()))


@dataclass
class Node:
    """A registered node as the router sees it: its latest accepted report and its health."""
    signed: SignedReport
    capacity: int
    last_report_at: float
    failed_at: float | None = None

    @property
    def report(self) -> NodeReport:
        return self.signed.report

    @property
    def node_id(self) -> str:
        return self.report.node_id

    @property
    def url(self) -> str:
        return self.report.url

    def listing(self) -> dict:
        """What GET /nodes shows clients: enough to verify the node's report and seal request bodies to it."""
        return {"node_id": self.node_id, "url": self.url, "capacity": self.capacity,
                "hpke_public_key": _b64(self.report.hpke_public_key),
                "signing_public_key": _b64(self.report.signing_public_key), "signed_report": self.signed.to_json()}


@dataclass
class NodeRegistry:
    is_attested: IsAttested
    max_capacity: int = 1000
    report_ttl: float = 30.0
    max_skew: float = 30.0
    clock: Callable[[], float] = time.time
    _nodes: dict[str, Node] = field(default_factory=dict)

    def register(self, signed: SignedReport) -> Node:
        """Accept `signed` as the node's latest report, or raise NodeRefused saying why."""
        report, now = signed.report, self.clock()
        signed.verify()
        if not self.is_attested(report):
            raise NotAttested("node keys are not attested: the node must first answer a nonce from GET "
                              "/nodes/challenge with evidence of a release in the transparency log")
        if abs(report.timestamp - now) > self.max_skew:
            raise NodeRefused(f"node report timestamp is more than {self.max_skew:g} s from the router's clock")
        previous = self._nodes.get(report.node_id)
        if previous is not None and report.timestamp <= previous.report.timestamp:
            raise NodeRefused("node report is not newer than the last one accepted: replayed")
        for other in self._nodes.values():
            if other.url == report.url and other.node_id != report.node_id and self._fresh(other, now):
                raise NodeRefused("node report claims a URL another live node already reported")
        node = Node(signed, min(report.capacity, self.max_capacity), now)
        if previous is not None and previous.failed_at is not None and report.timestamp <= previous.failed_at:
            node.failed_at = previous.failed_at
        self._nodes[report.node_id] = node
        return node

    def _fresh(self, node: Node, now: float) -> bool:
        return now - node.last_report_at <= self.report_ttl

    def healthy(self) -> list[Node]:
        """Nodes that may be routed to now, in a fixed order (by node id), so a choice depends only on the
        random draw and never on registration order."""
        now = self.clock()
        live = [n for n in self._nodes.values()
                if n.failed_at is None and self._fresh(n, now) and self.is_attested(n.report)]
        return sorted(live, key=lambda n: n.node_id)

    def mark_failed(self, node_id: str) -> None:
        """The gateway could not reach the node: route nothing to it until it reports again, later."""
        node = self._nodes.get(node_id)
        if node is not None:
            node.failed_at = self.clock()

    def get(self, node_id: str) -> Node | None:
        return self._nodes.get(node_id)
