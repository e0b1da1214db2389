"""Errors of the encrypted channel: each one says what happened and that nothing unauthenticated was released."""
from __future__ import annotations


class IntegrityError(Exception):
    """Ciphertext failed authentication: tampered, replayed, reordered or truncated.

    The destination holds zeros, never unauthenticated plaintext. The channel that raised it is failed closed:
    further transfers raise too, because the lock-step IV streams can no longer be trusted.
    """


class ChannelClosed(RuntimeError):
    """The channel was closed (keys zeroized) or failed an integrity check; open a new Channel."""


class OwnerEnded(KeyError):
    """The owner's storage key was destroyed: its data is unrecoverable by design (crypto-shredding)."""
