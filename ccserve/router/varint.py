"""QUIC variable-length integers (RFC 9000, section 16): the length prefix of binary HTTP and chunked OHTTP.

The two high bits of the first byte give the length (1, 2, 4 or 8 bytes); the rest is the value, big-endian.
"""
from __future__ import annotations

from ccserve.router.errors import Truncated

MAX = (1 << 62) - 1


def encode(value: int) -> bytes:
    """The shortest encoding of `value` (0 <= value < 2**62)."""
    if value < 0 or value > MAX:
        raise ValueError(f"varint out of range: {value} (must be 0..2**62-1)")
    if value < 1 << 6:
        return value.to_bytes(1, "big")
    if value < 1 << 14:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 1 << 30:
        return (value | 0x8000_0000).to_bytes(4, "big")
    return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")


def decode(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at `pos`; Truncated when `buf` ends inside it."""
    if pos >= len(buf):
        raise Truncated("message ends where a length or number was expected")
    size = 1 << (buf[pos] >> 6)
    if pos + size > len(buf):
        raise Truncated("message ends inside a length or number")
    value = int.from_bytes(bytes(buf[pos:pos + size]), "big") & ((1 << (8 * size - 2)) - 1)
    return value, pos + size
