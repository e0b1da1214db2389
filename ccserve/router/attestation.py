"""Which nodes count as attested: the router checks each node's evidence itself before routing a request to it.

A node asks for a nonce (GET /nodes/challenge) and registers with evidence answering it (ccserve.attest's
format). The router accepts the node's keys only if the evidence is signed by the signing key the report names,
binds the report's HPKE key, answers a nonce this router issued (once, within NONCE_TTL), is at most `max_age`
seconds old, and carries a measurement included in the transparency log under a checkpoint signed by the pinned
log key and consistent with every checkpoint this router saw before. The checks are ccserve.attest's, the very
ones the client SDK runs, so router and clients cannot disagree on what "attested" means.

Afterwards the node's heartbeats need no evidence: its keys live only in its memory and die with it, so the
attestation holds for the keys' lifetime. A router that restarts forgets it, and tells nodes so (NotAttested),
whose agents then attest again.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import httpx

from ccserve.attest.checkpoint import Checkpoint
from ccserve.attest.errors import StaleEvidence, VerificationError
from ccserve.attest.evidence import Evidence
from ccserve.attest.logclient import LogClient
from ccserve.attest.note import Verifier
from ccserve.attest.verify import check_evidence, check_included, next_checkpoint
from ccserve.router.errors import NodeRefused
from ccserve.router.nodes import NodeReport

NONCE_LEN = 32
NONCE_TTL = 60.0
MAX_OUTSTANDING = 10_000


class EvidenceAttestor:
    """Verifies nodes' evidence against the transparency log at `log_url`, whose key (`log_key`, note verifier
    form) the operator pins."""

    def __init__(self, log_url: str, log_key: str, http: httpx.Client, max_age: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.log = LogClient(log_url, Verifier.parse(log_key), http)
        self.max_age, self._clock = max_age, clock
        self._nonces: OrderedDict[bytes, float] = OrderedDict()   # issued and unused -> expiry
        self._attested: dict[bytes, bytes] = {}                     # signing key -> the HPKE key it was attested with
        self._checkpoint: Checkpoint | None = None
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()

    def challenge(self) -> bytes:
        """A fresh nonce for one node's evidence; it expires after NONCE_TTL seconds or its first use."""
        nonce, now = secrets.token_bytes(NONCE_LEN), self._clock()
        with self._lock:
            while self._nonces and (len(self._nonces) >= MAX_OUTSTANDING or next(iter(self._nonces.values())) < now):
                self._nonces.popitem(last=False)
            self._nonces[nonce] = now + NONCE_TTL
        return nonce

    def verify(self, report: NodeReport, document: object) -> None:
        """Check `document`, evidence sent with `report`; on success the report's keys count as attested.
        NodeRefused names the check that failed. Blocking (it reads the log): call it off the event loop."""
        try:
            evidence = Evidence.parse(document)
            self._spend(evidence.nonce)
            check_evidence(evidence, evidence.nonce, self.max_age)
            if (evidence.signing_key, evidence.hpke_public_key) != (report.signing_public_key,
                                                                     report.hpke_public_key):
                raise NodeRefused("the evidence binds other keys than the node report names")
            check_included(self.log, evidence.measurement, self._advance())
        except VerificationError as exc:
            raise NodeRefused(f"node evidence refused ({type(exc).__name__}): {exc}") from None
        with self._lock:
            self._attested[report.signing_public_key] = report.hpke_public_key

    def is_attested(self, report: NodeReport) -> bool:
        return self._attested.get(report.signing_public_key) == report.hpke_public_key

    def _spend(self, nonce: bytes) -> None:
        with self._lock:
            expiry = self._nonces.pop(nonce, None)
        if expiry is None or expiry < self._clock():
            raise StaleEvidence("the evidence does not answer a nonce this router issued, or answers one already "
                                "used or expired: get a fresh one from GET /nodes/challenge")

    def _advance(self) -> Checkpoint:
        """The log's checkpoint now, proven consistent with the last one this router saw (then kept instead).
        One at a time, so every checkpoint is compared with the latest before it."""
        with self._log_lock:
            new, _ = next_checkpoint(self.log, self._checkpoint)
            if self._checkpoint is None or new.size > self._checkpoint.size:
                self._checkpoint = new
            return new


class AcceptUnattested:
    """Development only (`--insecure-accept-unattested-nodes`, refused under the pcc policy): every node whose
    report signature verifies counts as attested, and evidence, if sent, is not looked at."""

    def challenge(self) -> bytes:
        return secrets.token_bytes(NONCE_LEN)

    def verify(self, report: NodeReport, document: object) -> None:
        return None

    def is_attested(self, report: NodeReport) -> bool:
        return True


Attestor = EvidenceAttestor | AcceptUnattested
