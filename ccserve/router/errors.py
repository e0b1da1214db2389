"""Why the relay, the gateway, the token issuer or the node registry refused something.

Each message says what was wrong and what to do; none ever quotes request content, a token or a key.
"""
from __future__ import annotations


class RouterError(Exception):
    """Base of every refusal in ccserve.router."""


class MalformedMessage(RouterError, ValueError):
    """A binary HTTP message (RFC 9292) or an OHTTP encoding that does not parse: the sender is broken or
    speaks another version."""


class Truncated(MalformedMessage):
    """The bytes end before the message does; for a stream, wait for more bytes, otherwise it is malformed."""


class DecryptError(RouterError):
    """An encapsulated request or response failed authentication: it was altered in transit (by a relay, say),
    truncated, or sealed to a key this gateway does not hold. Nothing of it was used."""


class UnknownKey(DecryptError):
    """The encapsulated request names a key identifier or algorithms this gateway does not offer: fetch the
    current key configuration (GET /ohttp-keys) and encapsulate again."""


class TokenRefused(RouterError):
    """An anonymous token is missing, malformed, signed by a key the gateway does not accept, or already
    spent. Each token pays for one request: fetch fresh tokens from the issuer."""


class IssuanceRefused(RouterError):
    """The token issuer refused to sign: a wrong or missing client credential, a malformed blinded message, or
    the credential's quota is used up for this window."""


class CredentialRefused(IssuanceRefused):
    """A token request without a client credential, or with one the issuer does not accept."""


class QuotaExceeded(IssuanceRefused):
    """The client credential has obtained all the tokens it may for the current window: wait for the next."""


class NodeRefused(RouterError):
    """A node's signed report was refused: bad signature, unattested key, stale or replayed timestamp, or an
    invalid field. The node is not routed to until it sends a valid report."""


class NoHealthyNode(RouterError):
    """No healthy, attested node is registered: start nodes (or wait for their reports) and retry."""


class NotAttested(NodeRefused):
    """A node's report names keys no verified evidence binds: it must (again) answer a nonce from the router with
    evidence of a release in the transparency log. The node agent does so when told this."""


ERROR_TRAILER = "ccserve-error"
"""The sealed trailer by which the gateway ends a streamed response whose node failed mid-response."""
