"""Keys that exist only in memory: random per process, overwritten when their owner is done with them."""
from __future__ import annotations

import secrets
import threading
from collections.abc import Hashable

from ccserve.secure.errors import OwnerEnded

KEY_BYTES = 32


class SecretKey:
    """32 random bytes in one mutable buffer, so `zeroize` can overwrite them in place.

    Never pickled, printed or written anywhere. OpenSSL contexts built from it copy the bytes (unavoidable through
    `cryptography`); their owners drop those contexts when they zeroize, so only this buffer needs scrubbing here.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray(secrets.token_bytes(KEY_BYTES))

    @property
    def alive(self) -> bool:
        return any(self._buf)

    def material(self) -> bytes:
        """The key bytes, for building a cipher context; raises once zeroized."""
        if not self.alive:
            raise ValueError("this key was zeroized")
        return bytes(self._buf)

    def zeroize(self) -> None:
        for i in range(len(self._buf)):
            self._buf[i] = 0

    def __repr__(self) -> str:
        return f"SecretKey({'alive' if self.alive else 'zeroized'})"

    def __reduce__(self):
        raise TypeError("SecretKey cannot be pickled: keys never leave process memory")


class SessionKeys:
    """The channel's two session keys, one per direction, as the H100 CC driver keeps them."""

    def __init__(self) -> None:
        self.h2d = SecretKey()
        self.d2h = SecretKey()

    def zeroize(self) -> None:
        self.h2d.zeroize()
        self.d2h.zeroize()


class OwnerKeys:
    """One key per owner (request) for host-side storage; `destroy` makes everything sealed under it unreadable."""

    def __init__(self) -> None:
        self._keys: dict[Hashable, SecretKey] = {}
        self._lock = threading.Lock()

    def create(self, owner: Hashable) -> SecretKey:
        with self._lock:
            if owner in self._keys:
                raise ValueError(f"owner {owner!r} already has a key")
            key = self._keys[owner] = SecretKey()
            return key

    def get(self, owner: Hashable) -> SecretKey:
        with self._lock:
            key = self._keys.get(owner)
        if key is None:
            raise OwnerEnded(f"owner {owner!r} has no key: it ended (data shredded) or was never opened")
        return key

    def destroy(self, owner: Hashable) -> None:
        with self._lock:
            key = self._keys.pop(owner, None)
        if key is not None:
            key.zeroize()

    def __contains__(self, owner: Hashable) -> bool:
        return owner in self._keys

    def __len__(self) -> int:
        return len(self._keys)
