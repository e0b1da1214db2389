"""Byte-exact encodings shared by signer and verifier: canonical JSON (what gets hashed and signed) and base64.

Why canonical JSON: a measurement or an evidence statement is hashed or signed, so both sides must produce the
same bytes from the same values. Sorted keys, no whitespace, UTF-8, no NaN; floats use Python's shortest repr.
"""
from __future__ import annotations

import base64
import binascii
import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    """The one byte string that `value` (JSON-able: dict, list, str, int, float, bool, None) hashes as."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def b64encode(data: bytes) -> str:
    """Standard base64 (RFC 4648 section 4), as checkpoints and signed notes use."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, what: str) -> bytes:
    """Strict standard base64; a ValueError names `what` was malformed."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, AttributeError):
        raise ValueError(f"{what} is not valid base64") from None


def hexdecode(text: str, what: str) -> bytes:
    """Lowercase or uppercase hex; a ValueError names `what` was malformed."""
    try:
        return bytes.fromhex(text)
    except (ValueError, TypeError):
        raise ValueError(f"{what} is not valid hex") from None
