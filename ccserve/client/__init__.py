"""The client SDK: verify nodes (evidence, transparency log, log consistency) and talk to them through requests
sealed to their attested keys. SecureClient talks to one node directly; RelayedClient to a deployment through its
OHTTP relay, with anonymous tokens, sealing each request to every verified node (see session.py, relayed.py and
verify.verify_node)."""
from ccserve.attest.errors import (BadSignature, HardwareRequired, LogForked, LogInconsistent, LogRolledBack,
                                   MalformedEvidence, SealedMessageError, StaleEvidence, UnknownMeasurement,
                                   VerificationError)
from ccserve.client.openai_api import APIError
from ccserve.client.relayed import GatewayError, NoVerifiedNode, RelayedClient
from ccserve.client.session import SecureClient
from ccserve.client.verify import VerifiedNode, verify_node
from ccserve.router.oblivious import RelayRefused

__all__ = ["APIError", "BadSignature", "GatewayError", "HardwareRequired", "LogForked", "LogInconsistent",
           "LogRolledBack", "MalformedEvidence", "NoVerifiedNode", "RelayRefused", "RelayedClient",
           "SealedMessageError", "SecureClient", "StaleEvidence", "UnknownMeasurement", "VerificationError",
           "VerifiedNode", "verify_node"]
