"""Sealed links between the ranks of a tensor-parallel group: per-link keys from an X25519 exchange, and one IV
counter per directed link that both ends advance in lock-step.

The counters live in device memory and advance on the device after each message: the kernels read them when they
run, so a CUDA graph that captured a collective uses fresh IVs on every replay (a counter passed at launch would be
frozen into the graph and repeat). Both ends run the same sequence of collectives, eager or replayed, so they stay
in lock-step.

On an H100 in confidential-computing mode, data moving between GPUs passes through memory the host can read and
write, so every activation a collective carries is AES-256-GCM sealed by the sending GPU and verified by the
receiving one (the kernels of `ccserve.kernels.aes_gcm`; OpenSSL on CPU tensors). This module is the recipe: its
caller (ccserve.distributed.sealed) names a peer rank and bytes, never a key or an IV.

Why per directed link (sender -> receiver), not per sender: with one key per sender, every rank of the group
holds every sender's key, so any rank could forge another's messages, and the compromise of one rank's memory
exposes every link. With a key per link, the key of s -> r exists only in ranks s and r. It costs N-1 seals of
each contribution instead of one; at N = 2 (the size the issue measures) the two are the same work.

Key setup: each rank draws a fresh X25519 key pair and 16 random bytes; the group exchanges these offers over a
trusted path (the caller's job: a host-side process group inside the confidential VM, not the GPU links, so the
host cannot substitute a public key). Ranks s and r agree on the ECDH secret of their two key pairs; the key of
s -> r is HKDF-SHA256 of that secret with salt = every rank's random bytes in rank order (a group nonce: keys
differ per group instance even if a key pair repeated) and info naming s and r (so the two directions of a link
have different keys and an IV can never repeat under a key). Private keys are dropped once the links are
derived; link keys live only in this process's memory and are zeroized by `close`.
"""
from __future__ import annotations

import secrets

import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ccserve.kernels.aes_gcm import DeviceKey, gcm_decrypt, gcm_encrypt, num_chunks, wire_bytes
from ccserve.secure.errors import ChannelClosed
from ccserve.secure.iv import Lane
from ccserve.secure.keys import KEY_BYTES

PUBLIC_BYTES = 32
NONCE_BYTES = 16
OFFER_BYTES = PUBLIC_BYTES + NONCE_BYTES
INFO = b"ccserve tensor-parallel link v1"


class LinkKeyAgreement:
    """This rank's half of the key setup: a fresh X25519 key pair and its share of the group nonce."""

    def __init__(self) -> None:
        self._private: X25519PrivateKey | None = X25519PrivateKey.generate()
        public = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.offer = public + secrets.token_bytes(NONCE_BYTES)     # what the group exchanges: no secret in it

    def derive(self, rank: int, offers: list[bytes], device: torch.device, chunk_bytes: int,
               backend: str | None = None) -> SealedLinks:
        """The links of `rank` to every other rank, from every rank's offer (in rank order). Usable once.
        backend: DeviceKey's (default: the GPU kernels on CUDA, OpenSSL on the CPU; tests run "triton" on CPU
        tensors under the interpreter)."""
        if self._private is None:
            raise RuntimeError("this key agreement was already used")
        if len(offers) < 2 or any(len(o) != OFFER_BYTES for o in offers) or offers[rank] != self.offer:
            raise ValueError("the group's key offers are malformed or do not include this rank's own offer")
        salt = b"".join(o[PUBLIC_BYTES:] for o in offers)
        send, recv = {}, {}
        for peer, offer in enumerate(offers):
            if peer == rank:
                continue
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(offer[:PUBLIC_BYTES]))
            send[peer] = _link_key(shared, salt, rank, peer, device, backend)
            recv[peer] = _link_key(shared, salt, peer, rank, device, backend)
        self._private = None
        return SealedLinks(send, recv, chunk_bytes, device)


def _link_key(shared: bytes, salt: bytes, sender: int, receiver: int, device: torch.device,
              backend: str | None) -> DeviceKey:
    """The key of the directed link sender -> receiver, as the kernels need it; the derived bytes are overwritten
    once the key's tables (GPU) or cipher context (CPU) exist."""
    info = INFO + sender.to_bytes(4, "big") + receiver.to_bytes(4, "big")
    key = bytearray(HKDF(hashes.SHA256(), KEY_BYTES, salt, info).derive(shared))
    try:
        return DeviceKey(key, device, backend)
    finally:
        key[:] = bytes(len(key))


class SealedLinks:
    """Seal to and open from each peer: one key and one IV counter per direction of every link.

    The sender seals under its send counter for that peer; the receiver decrypts under its own receive counter and
    never reads an IV from the wire, so a replayed, reordered or dropped message fails its tag. Each counter is an
    int64 on the device, advanced by the message's chunk count right after the message's kernels (64 bits of
    counter: no wrap in any lifetime)."""

    def __init__(self, send: dict[int, DeviceKey], recv: dict[int, DeviceKey], chunk_bytes: int,
                 device: torch.device) -> None:
        self._send_keys, self._recv_keys = send, recv
        for key in (*send.values(), *recv.values()):
            key.reserve_powers(chunk_bytes)     # grown now, never later: captured graphs hold the table's address
        self._send_at = {peer: torch.zeros(1, dtype=torch.int64, device=device) for peer in send}
        self._recv_at = {peer: torch.zeros(1, dtype=torch.int64, device=device) for peer in recv}
        self.chunk_bytes = chunk_bytes

    def wire_width(self, nbytes: int) -> int:
        """Bytes one sealed message of nbytes takes on the wire (tags included), padded as the kernels need."""
        return -(-wire_bytes(nbytes, self.chunk_bytes) // 16) * 16

    def seal(self, peer: int, plain: torch.Tensor, nbytes: int, wire: torch.Tensor) -> None:
        """Encrypt the first nbytes of `plain` (uint8) into `wire` for `peer`."""
        key = self._key(self._send_keys, peer)
        at = self._send_at[peer]
        gcm_encrypt(key, plain, wire, nbytes, self.chunk_bytes, Lane.TP_LINK, 0, counter_at=at)
        at.add_(num_chunks(nbytes, self.chunk_bytes))

    def open(self, peer: int, wire: torch.Tensor, plain: torch.Tensor, nbytes: int) -> torch.Tensor:
        """Verify and decrypt `peer`'s next message into `plain`; returns int32 ok flags per chunk (a failed chunk
        decrypts to zeros). The counters are consumed even when it fails."""
        key = self._key(self._recv_keys, peer)
        at = self._recv_at[peer]
        ok = gcm_decrypt(key, wire, plain, nbytes, self.chunk_bytes, Lane.TP_LINK, 0, counter_at=at)
        at.add_(num_chunks(nbytes, self.chunk_bytes))
        return ok

    def close(self) -> None:
        """Zeroize every link key (GPU tables, CPU cipher contexts dropped). Idempotent."""
        for key in (*self._send_keys.values(), *self._recv_keys.values()):
            key.zeroize()
        self._send_keys, self._recv_keys = {}, {}

    @staticmethod
    def _key(keys: dict[int, DeviceKey], peer: int) -> DeviceKey:
        if not keys:
            raise ChannelClosed("the tensor-parallel links were closed (keys zeroized)")
        return keys[peer]

    def __reduce__(self):
        raise TypeError("SealedLinks cannot be pickled: keys never leave process memory")
