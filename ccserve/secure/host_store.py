"""Host-side storage for data that left the GPU (swapped KV, spilled state): ciphertext under a key per owner.

Stateless by construction: each owner (a request) gets a random key when it opens; everything it stores is sealed
under that key with IVs from the owner's own sequence; `end` zeroizes the key, so whatever copies of the
ciphertext remain (host memory dumps, a later disk spill) can no longer be decrypted: crypto-shredding. The index
(item -> IV, size, type) is trusted memory, so a ciphertext swapped between items or replaced by an older version
of the same item fails authentication.
"""
from __future__ import annotations

import threading
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from ccserve.kernels.aes_gcm import alloc_wire, check_chunk_bytes, num_chunks
from ccserve.secure.cpu_crypto import CpuCipher, WorkerPool
from ccserve.secure.errors import IntegrityError, OwnerEnded
from ccserve.secure.iv import IVSequence, Lane
from ccserve.secure.keys import OwnerKeys


@dataclass
class _Item:
    wire: torch.Tensor
    nbytes: int
    counter: int
    shape: torch.Size
    dtype: torch.dtype


@dataclass
class _Owner:
    cipher: CpuCipher
    ivs: IVSequence = field(default_factory=lambda: IVSequence(Lane.HOST_STORE))
    items: dict[Hashable, _Item] = field(default_factory=dict)


class HostStore:
    def __init__(self, pool: WorkerPool, chunk_bytes: int = 1 << 20) -> None:
        check_chunk_bytes(chunk_bytes)
        self.pool, self.chunk_bytes = pool, chunk_bytes
        self.keys = OwnerKeys()
        self._owners: dict[Hashable, _Owner] = {}
        self._lock = threading.Lock()

    def open(self, owner: Hashable) -> None:
        """Give a new owner its own key."""
        with self._lock:
            self._owners[owner] = _Owner(CpuCipher(self.keys.create(owner), self.pool))

    def put(self, owner: Hashable, name: Hashable, tensor: torch.Tensor) -> None:
        """Seal a host tensor under the owner's key, replacing any earlier item of that name."""
        if tensor.device.type != "cpu":
            raise ValueError("HostStore.put takes a CPU tensor (move it off the GPU through the Channel first)")
        own = self._owner(owner)
        src = tensor.detach().contiguous()
        nbytes = src.nbytes
        wire = alloc_wire(nbytes, self.chunk_bytes, "cpu")
        counter = own.ivs.take(max(1, num_chunks(nbytes, self.chunk_bytes)))
        if nbytes:
            own.cipher.seal(src.reshape(-1).view(torch.uint8).numpy(), wire.numpy(), nbytes, self.chunk_bytes,
                            Lane.HOST_STORE, counter)
        own.items[name] = _Item(wire, nbytes, counter, src.shape, src.dtype)

    def get(self, owner: Hashable, name: Hashable, out: torch.Tensor | None = None) -> torch.Tensor:
        """Verify and decrypt an item; raises IntegrityError if its ciphertext was altered. `out`: a contiguous
        uint8 CPU buffer of at least the item's size to decrypt into (a reused staging buffer: no page faults of
        a fresh allocation per call); the result is a view of its first bytes."""
        own = self._owner(owner)
        item = own.items[name]
        out = torch.empty(item.nbytes, dtype=torch.uint8) if out is None else out.view(-1)[:item.nbytes]
        if item.nbytes and not own.cipher.open(item.wire.numpy(), out.numpy(), item.nbytes, self.chunk_bytes,
                                               Lane.HOST_STORE, item.counter):
            out.zero_()
            raise IntegrityError(f"stored item {name!r} of owner {owner!r} failed authentication")
        return out.view(item.dtype).view(item.shape)

    def pop(self, owner: Hashable, name: Hashable) -> torch.Tensor:
        out = self.get(owner, name)
        del self._owner(owner).items[name]
        return out

    def discard(self, owner: Hashable, name: Hashable) -> None:
        """Drop an item without opening it (its plaintext was already taken)."""
        self._owner(owner).items.pop(name, None)

    def ciphertext(self, owner: Hashable, name: Hashable) -> torch.Tensor:
        """The stored bytes of an item, as a dump of host memory (or a disk spill) would show them."""
        return self._owner(owner).items[name].wire

    def end(self, owner: Hashable) -> None:
        """The owner is done: zeroize its key and drop its items. Idempotent."""
        with self._lock:
            own = self._owners.pop(owner, None)
        if own is not None:
            own.cipher.zeroize()
            own.items.clear()
        self.keys.destroy(owner)

    def _owner(self, owner: Hashable) -> _Owner:
        own = self._owners.get(owner)
        if own is None:
            raise OwnerEnded(f"owner {owner!r} is not open: it ended (its data is shredded) or never opened")
        return own

    def __contains__(self, owner: Hashable) -> bool:
        return owner in self._owners

    def __len__(self) -> int:
        """Open owners (each holds a live key)."""
        return len(self._owners)

    @property
    def num_items(self) -> int:
        return sum(len(o.items) for o in list(self._owners.values()))
