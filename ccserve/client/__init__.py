"""The client SDK: verify a node (evidence, transparency log, log consistency) and talk to it through requests
sealed to its attested key. See session.SecureClient and verify.verify_node."""
from ccserve.attest.errors import (BadSignature, HardwareRequired, LogForked, LogInconsistent, LogRolledBack,
                                   MalformedEvidence, SealedMessageError, StaleEvidence, UnknownMeasurement,
                                   VerificationError)
from ccserve.client.session import APIError, SecureClient
from ccserve.client.verify import VerifiedNode, verify_node

__all__ = ["APIError", "BadSignature", "HardwareRequired", "LogForked", "LogInconsistent", "LogRolledBack",
           "MalformedEvidence", "SealedMessageError", "SecureClient", "StaleEvidence", "UnknownMeasurement",
           "VerificationError", "VerifiedNode", "verify_node"]
