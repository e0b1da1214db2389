"""Reading the transparency log over HTTP, trusting nothing it says until a signature or a proof checks it (the
client SDK and the router both read it this way)."""
from __future__ import annotations

import httpx

from ccserve.attest.checkpoint import Checkpoint, open_checkpoint
from ccserve.attest.encoding import b64decode
from ccserve.attest.errors import MalformedEvidence, UnknownMeasurement
from ccserve.attest.note import Verifier


class LogClient:
    def __init__(self, url: str, verifier: Verifier, http: httpx.Client) -> None:
        self.url, self.verifier, self.http = url.rstrip("/"), verifier, http

    def checkpoint(self) -> tuple[Checkpoint, str]:
        """The log's latest checkpoint, verified under the pinned key, and its signed text."""
        signed = self._get("/checkpoint").text
        return open_checkpoint(signed, self.verifier), signed

    def inclusion(self, leaf_hash: bytes, tree_size: int) -> tuple[int, list[bytes]]:
        """(leaf index, audit path) of an entry; UnknownMeasurement when the log has no such entry."""
        r = self._get("/proof/inclusion", leaf_hash=leaf_hash.hex(), tree_size=tree_size, missing_ok=True)
        if r.status_code == 404:
            raise UnknownMeasurement(f"the node's measurement (leaf {leaf_hash.hex()[:16]}...) is not among the "
                                     f"{tree_size} releases in log {self.verifier.name}: it runs an unpublished "
                                     "build, config or model")
        body = r.json()
        return int(body["leaf_index"]), _hashes(body["proof"])

    def consistency(self, old_size: int, new_size: int) -> list[bytes]:
        return _hashes(self._get("/proof/consistency", old_size=old_size, new_size=new_size).json()["proof"])

    def _get(self, path: str, missing_ok: bool = False, **params: object) -> httpx.Response:
        try:
            r = self.http.get(self.url + path, params=params)
        except httpx.HTTPError as exc:
            raise MalformedEvidence(f"the log at {self.url} cannot be reached ({exc})") from None
        if r.status_code == 404 and missing_ok:
            return r
        if r.status_code != 200:
            raise MalformedEvidence(f"the log at {self.url} answered {r.status_code} to {path}: {r.text[:200]}")
        return r


def _hashes(items: object) -> list[bytes]:
    if not isinstance(items, list):
        raise MalformedEvidence("the log's proof is not a list of base64 hashes")
    try:
        return [b64decode(h, "a proof hash") for h in items]
    except ValueError as exc:
        raise MalformedEvidence(str(exc)) from None
