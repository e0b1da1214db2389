"""The token issuer (`ccserve issuer`): signs blinded token requests for clients that authenticate.

Authentication is a shared client credential, sent as `Authorization: Bearer <credential>`. The issuer keeps only
SHA-256 digests of the credentials it accepts (the credentials file holds one per line: the credential itself,
or `sha256:<hex digest>` so the issuer host never stores it). Each credential may obtain `quota` tokens per
`window_s` seconds, which is what bounds abuse of the anonymous service behind the gateway.

The issuer learns who asked for how many tokens, never which tokens they became (blind signatures), and never
sees a request. Its RSA key is generated at start, in memory only, and published at GET /token-key.

HTTP:  GET /token-key      JSON {variant, key_id (base64url), public_key (base64 DER SPKI), modulus_bits}
       POST /token-request body = k blinded messages concatenated (k <= MAX_BATCH), answer = k blind signatures
       GET /stats          aggregate counters only
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ccserve.router import blind_rsa, tokens
from ccserve.router.errors import CredentialRefused, IssuanceRefused, QuotaExceeded
from ccserve.router.serve import BodyTooLarge, read_limited
from ccserve.router.stats import Stats

MAX_BATCH = 64
OUTCOMES = ("issued", "unauthenticated", "over_quota", "malformed")


def credential_digest(credential: str) -> bytes:
    return hashlib.sha256(credential.encode()).digest()


def load_credentials(path: str | Path) -> set[bytes]:
    """Digests of the credentials in `path`: one per line, raw or `sha256:<hex>`; blank lines and # comments
    are skipped."""
    digests = set()
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("sha256:"):
            try:
                digest = bytes.fromhex(line[7:])
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ValueError(f"{path}:{number}: sha256: must be followed by 64 hex digits")
            digests.add(digest)
        else:
            digests.add(credential_digest(line))
    if not digests:
        raise ValueError(f"{path} holds no client credential: add one per line")
    return digests


class Issuer:
    def __init__(self, private_key: rsa.RSAPrivateKey, credentials: set[bytes], quota: int = 1000,
                 window_s: float = 3600.0, clock=time.monotonic) -> None:
        if quota < 1 or window_s <= 0:
            raise ValueError("issuer quota must be >= 1 token per window, and the window > 0 seconds")
        self._signer = blind_rsa.BlindSigner(private_key)
        self.public_key = private_key.public_key()
        self.key_id = tokens.key_id(self.public_key)
        self._credentials = frozenset(credentials)
        self.quota, self.window_s, self._clock = quota, window_s, clock
        self._used: dict[bytes, tuple[int, int]] = {}
        self._lock = threading.Lock()     # issue() runs on a thread pool: quota accounting must not race

    @classmethod
    def generate(cls, credentials: set[bytes], key_bits: int = 2048, **kwargs) -> Issuer:
        if key_bits < 2048:
            raise ValueError("token keys must have at least 2048 bits (RFC 9474 section 5.2)")
        return cls(rsa.generate_private_key(65537, key_bits), credentials, **kwargs)

    def key_info(self) -> dict:
        return {"variant": blind_rsa.VARIANT, "key_id": base64.urlsafe_b64encode(self.key_id).decode().rstrip("="),
                "public_key": base64.b64encode(tokens.public_key_der(self.public_key)).decode(),
                "modulus_bits": self.public_key.key_size}

    def authenticate(self, authorization: str | None) -> bytes:
        """The digest of the presented credential, if it is one we accept; IssuanceRefused otherwise."""
        scheme, _, credential = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise CredentialRefused("token request without 'Authorization: Bearer <credential>'")
        digest = credential_digest(credential.strip())
        if not any(hmac.compare_digest(digest, known) for known in self._credentials):
            raise CredentialRefused("token request with an unknown client credential")
        return digest

    def _charge(self, digest: bytes, count: int) -> None:
        with self._lock:
            window = int(self._clock() // self.window_s)
            start, used = self._used.get(digest, (window, 0))
            used = used if start == window else 0
            if used + count > self.quota:
                raise QuotaExceeded(f"this credential has used its {self.quota} tokens for this "
                                    f"{self.window_s:g}-second window: wait for the next one")
            self._used[digest] = (window, used + count)

    def issue(self, authorization: str | None, body: bytes) -> bytes:
        """Blind signatures for the blinded messages in `body`, for an authenticated client within its quota."""
        digest = self.authenticate(authorization)
        size = blind_rsa.modulus_len(self.public_key)
        count = len(body) // size
        if not body or len(body) % size or count > MAX_BATCH:
            raise IssuanceRefused(f"token request body must be 1..{MAX_BATCH} blinded messages of {size} bytes")
        self._charge(digest, count)
        return b"".join(self._signer.blind_sign(body[i:i + size]) for i in range(0, len(body), size))


def issuer_app(issuer: Issuer) -> Starlette:
    stats = Stats(OUTCOMES)

    async def token_key(request: Request) -> Response:
        return JSONResponse(issuer.key_info(), headers={"cache-control": "max-age=60"})

    async def token_request(request: Request) -> Response:
        try:
            body = await read_limited(request, MAX_BATCH * blind_rsa.modulus_len(issuer.public_key))
        except BodyTooLarge:
            stats.count("malformed")
            return JSONResponse({"error": f"at most {MAX_BATCH} blinded messages per request"}, status_code=413)
        try:
            signed = await run_in_threadpool(issuer.issue, request.headers.get("authorization"), body)
        except IssuanceRefused as exc:
            status, outcome = ((401, "unauthenticated") if isinstance(exc, CredentialRefused)
                               else (429, "over_quota") if isinstance(exc, QuotaExceeded) else (400, "malformed"))
            stats.count(outcome)
            return JSONResponse({"error": str(exc)}, status_code=status)
        stats.count("issued", len(body) // blind_rsa.modulus_len(issuer.public_key))
        return Response(signed, media_type="application/octet-stream")

    async def get_stats(request: Request) -> Response:
        return JSONResponse(stats.snapshot())

    return Starlette(routes=[Route("/token-key", token_key), Route("/token-request", token_request,
                                                                    methods=["POST"]),
                             Route("/stats", get_stats)])


# ---- client side of the issuance protocol ---------------------------------------------------------------------

def fetch_token_key(issuer_url: str, http: httpx.Client) -> rsa.RSAPublicKey:
    """The issuer's current token key (GET /token-key), checked against the key id it is published with.
    Every client must see the same key (a per-client key would tag its tokens): compare with others if you
    can, e.g. through the gateway, which accepts only the keys it fetched itself."""
    response = http.get(issuer_url.rstrip("/") + "/token-key")
    response.raise_for_status()
    info = response.json()
    if info.get("variant") != blind_rsa.VARIANT:
        raise IssuanceRefused(f"issuer uses {info.get('variant')!r}, this client implements {blind_rsa.VARIANT}")
    key = tokens.load_public_key(base64.b64decode(info["public_key"]))
    if base64.urlsafe_b64encode(tokens.key_id(key)).decode().rstrip("=") != info.get("key_id"):
        raise IssuanceRefused("issuer's key id does not match its public key")
    return key


def fetch_tokens(issuer_url: str, credential: str, count: int, http: httpx.Client,
                 public_key: rsa.RSAPublicKey | None = None) -> list[tokens.Token]:
    """`count` fresh tokens, fetched in batches. Fetch ahead of use: spending a token right after fetching it
    lets whoever sees both sides match them by time."""
    public_key = public_key or fetch_token_key(issuer_url, http)
    out: list[tokens.Token] = []
    while len(out) < count:
        pending = [tokens.begin(public_key) for _ in range(min(MAX_BATCH, count - len(out)))]
        response = http.post(issuer_url.rstrip("/") + "/token-request", content=b"".join(p.blinded for p in pending),
                             headers={"authorization": f"Bearer {credential}",
                                      "content-type": "application/octet-stream"})
        if response.status_code != 200:
            raise IssuanceRefused(f"issuer answered {response.status_code}: {response.json().get('error')}")
        size = blind_rsa.modulus_len(public_key)
        if len(response.content) != size * len(pending):
            raise IssuanceRefused("issuer answered the wrong number of blind signatures")
        out += [p.complete(response.content[i * size:(i + 1) * size]) for i, p in enumerate(pending)]
    return out
