"""RFC 6962 / RFC 9162 Merkle trees: tree hashes, inclusion and consistency proofs, and their verification.

Why our own ~100 lines and not a library: `pymerkle` (7.0) computes RFC 6962 roots, but its proofs are its own
format (a 1-based index, "rule"/"subset" bit lists, the base leaf inside the path) and it verifies only those;
a client must verify the plain RFC 9162 audit paths any RFC 9162 log serves. So the tree and both verification
algorithms (RFC 9162 sections 2.1.3.2 and 2.1.4.2) are written out here, and tested against the published
transparency-dev/merkle vectors (tests/attest/vectors/).

Hashing (RFC 6962 section 2.1): leaf = SHA-256(0x00 || data), node = SHA-256(0x01 || left || right), the empty
tree's root is SHA-256(""). Indexes are 0-based.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ccserve.attest.errors import InvalidProof

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2): where RFC 6962 splits a tree of n leaves."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of a list of leaf *hashes*."""
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = _split(n)
    return node_hash(root(leaves[:k]), root(leaves[k:]))


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) (RFC 6962 section 2.1.1): the audit path of leaf `index` in the tree of `leaves` (hashes)."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf index {index} is outside a tree of {len(leaves)} leaves")
    return _path(index, leaves)


def _path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return _path(m, leaves[:k]) + [root(leaves[k:])]
    return _path(m - k, leaves[k:]) + [root(leaves[:k])]


def consistency_proof(old_size: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) (RFC 6962 section 2.1.2) from the tree of the first `old_size` leaves to all of them."""
    if not 0 < old_size <= len(leaves):
        raise ValueError(f"a consistency proof needs 0 < old size <= new size, got {old_size} and {len(leaves)}")
    return _subproof(old_size, leaves, True)


def _subproof(m: int, leaves: Sequence[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [root(leaves)]
    k = _split(n)
    if m <= k:
        return _subproof(m, leaves[:k], complete) + [root(leaves[k:])]
    return _subproof(m - k, leaves[k:], False) + [root(leaves[:k])]


def _check_hashes(*hashes: bytes) -> None:
    """Proof nodes and leaf hashes must be hash-sized (roots are only compared, as the upstream verifier does)."""
    for h in hashes:
        if not isinstance(h, bytes) or len(h) != HASH_SIZE:
            raise InvalidProof(f"a hash in the proof is not {HASH_SIZE} bytes")


def verify_inclusion(index: int, tree_size: int, leaf: bytes, proof: Sequence[bytes], root_hash: bytes) -> None:
    """RFC 9162 section 2.1.3.2: raise InvalidProof unless `proof` shows leaf hash `leaf` at `index` in the tree
    of `tree_size` leaves whose root is `root_hash`."""
    _check_hashes(leaf, *proof)
    if not 0 <= index < tree_size:
        raise InvalidProof(f"leaf index {index} is outside a tree of {tree_size} leaves")
    fn, sn, r = index, tree_size - 1, leaf
    for p in proof:
        if sn == 0:
            raise InvalidProof("the inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise InvalidProof("the inclusion proof is shorter than the tree is deep")
    if r != root_hash:
        raise InvalidProof("the inclusion proof does not lead to the tree's root hash")


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> None:
    """RFC 9162 section 2.1.4.2: raise InvalidProof unless the tree (`new_size`, `new_root`) extends the tree
    (`old_size`, `old_root`) append-only. A proof from the empty tree is meaningless and refused (as the
    transparency-dev verifier does); callers treat size 0 as consistent with everything."""
    _check_hashes(*proof)
    if old_size == 0 or new_size < old_size:
        raise InvalidProof(f"no consistency proof exists from size {old_size} to size {new_size}")
    if old_size == new_size:
        if proof:
            raise InvalidProof("equal tree sizes need an empty consistency proof")
        if old_root != new_root:
            raise InvalidProof("two trees of the same size have different roots")
        return
    if not proof:
        raise InvalidProof("the consistency proof is empty")
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # an exact power of 2: the old root is itself a node of the new tree
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise InvalidProof("the consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise InvalidProof("the consistency proof is shorter than the tree is deep")
    if fr != old_root:
        raise InvalidProof("the consistency proof does not lead to the old root: the log was rewritten")
    if sr != new_root:
        raise InvalidProof("the consistency proof does not lead to the new root")
