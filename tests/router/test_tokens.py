"""Anonymous tokens: issuance to authenticated clients only, each token spent once, nothing forged passes."""
import dataclasses

import httpx
import pytest

from ccserve.router import issuer as issuer_mod
from ccserve.router import tokens
from ccserve.router.errors import CredentialRefused, IssuanceRefused, QuotaExceeded, TokenRefused
from ccserve.router.issuer import Issuer, fetch_tokens, issuer_app, load_credentials
from ccserve.router.serve import BackgroundServer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer.generate({issuer_mod.credential_digest("alice-secret")}, quota=10_000)


def issue_one(issuer: Issuer, credential: str = "alice-secret") -> tokens.Token:
    pending = tokens.begin(issuer.public_key)
    return pending.complete(issuer.issue(f"Bearer {credential}", pending.blinded))


def test_token_is_spent_once(issuer):
    verifier = tokens.TokenVerifier([issuer.public_key])
    token = issue_one(issuer)
    parsed = tokens.Token.from_header(token.header_value())
    assert parsed == token
    verifier.redeem(parsed)
    with pytest.raises(TokenRefused, match="already spent"):
        verifier.redeem(tokens.Token.from_header(token.header_value()))
    # a different msg_prefix over the same nonce is no way around it (and its signature fails anyway)
    with pytest.raises(TokenRefused):
        verifier.redeem(dataclasses.replace(token, msg_prefix=bytes(32)))
    assert verifier.spent_count() == 1


def test_forged_and_foreign_tokens_are_refused(issuer):
    verifier = tokens.TokenVerifier([issuer.public_key])
    token = issue_one(issuer)
    for forged in (dataclasses.replace(token, nonce=bytes(32)),
                   dataclasses.replace(token, signature=token.signature[:-1] + b"\x00"),
                   dataclasses.replace(token, signature=token.signature[:-1])):
        with pytest.raises(TokenRefused):
            verifier.redeem(forged)
    other = Issuer.generate({issuer_mod.credential_digest("x")})
    with pytest.raises(TokenRefused, match="does not accept"):
        verifier.redeem(issue_one(other, "x"))
    for header in ("", "!!!", tokens.Token(b"k" * 32, b"p" * 32, b"n" * 32, b"").header_value()):
        with pytest.raises(TokenRefused):
            verifier.redeem(tokens.Token.from_header(header))
    verifier.redeem(token)        # none of the failures above burnt the genuine token's nonce


def test_verifier_keeps_a_bounded_number_of_keys(issuer):
    verifier = tokens.TokenVerifier([issuer.public_key])
    old_token = issue_one(issuer)
    for _ in range(tokens.KEEP_KEYS):
        verifier.add_key(Issuer.generate(set()).public_key)
    with pytest.raises(TokenRefused, match="does not accept"):
        verifier.redeem(old_token)


def test_issuer_authenticates_and_enforces_quota(tmp_path):
    path = tmp_path / "credentials"
    path.write_text(f"# clients\nalice-secret\nsha256:{issuer_mod.credential_digest('bob-secret').hex()}\n")
    clock = Clock()
    issuer = Issuer.generate(load_credentials(path), quota=3, window_s=60, clock=clock)
    blinded = tokens.begin(issuer.public_key).blinded
    for authorization in (None, "Basic alice-secret", "Bearer wrong", "Bearer "):
        with pytest.raises(CredentialRefused):
            issuer.issue(authorization, blinded)
    issuer.issue("Bearer bob-secret", blinded * 3)
    with pytest.raises(QuotaExceeded):
        issuer.issue("Bearer bob-secret", blinded)
    issuer.issue("Bearer alice-secret", blinded)          # quotas are per credential
    clock.now = 61.0
    issuer.issue("Bearer bob-secret", blinded)            # a new window
    with pytest.raises(IssuanceRefused):
        issuer.issue("Bearer alice-secret", blinded[:-1])
    with pytest.raises(IssuanceRefused):
        issuer.issue("Bearer alice-secret", blinded * (issuer_mod.MAX_BATCH + 1))
    with pytest.raises(ValueError):
        (tmp_path / "empty").write_text("# nobody\n")
        load_credentials(tmp_path / "empty")


def test_issuer_over_http(issuer):
    with BackgroundServer(issuer_app(issuer)) as server, httpx.Client(timeout=30) as http:
        got = fetch_tokens(server.url, "alice-secret", 70, http)          # two batches
        assert len(got) == 70 and len({t.nonce for t in got}) == 70
        verifier = tokens.TokenVerifier([issuer_mod.fetch_token_key(server.url, http)])
        for token in got:
            verifier.redeem(token)
        with pytest.raises(IssuanceRefused, match="401"):
            fetch_tokens(server.url, "mallory", 1, http)
        stats = http.get(server.url + "/stats").json()
        assert stats["issued"] == 70 and stats["unauthenticated"] == 1
