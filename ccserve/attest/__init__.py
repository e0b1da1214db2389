"""Verifiable serving: a node's identity and measurement, its evidence, hardware roots, the sealed envelope,
and the transparency log of releases (docs/attest.md).

Nothing in this package imports server/ or router/: the server mounts `http.attestation_router` and the
`http.SealedBody` middleware; the client SDK and the router both verify with `verify.py` over `logclient.py`;
`ccserve release`, `ccserve log` and `ccserve client` live in `commands.py`. Nothing here imports torch, so a
router or a client needs none of the GPU stack.
"""
from ccserve.attest.errors import (BadSignature, HardwareRequired, InvalidProof, LogForked, LogInconsistent,
                                   LogRolledBack, MalformedEvidence, SealedMessageError, StaleEvidence,
                                   UnknownMeasurement, VerificationError)
from ccserve.attest.identity import NodeIdentity, answer_attestation
from ccserve.attest.measure import Measurement, measure, measurement_config

__all__ = ["BadSignature", "HardwareRequired", "InvalidProof", "LogForked", "LogInconsistent", "LogRolledBack",
           "MalformedEvidence", "Measurement", "NodeIdentity", "SealedMessageError", "StaleEvidence",
           "UnknownMeasurement", "VerificationError", "answer_attestation", "measure", "measurement_config"]
