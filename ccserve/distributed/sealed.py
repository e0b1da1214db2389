"""Sealed collectives: the tensor-parallel group of `--cc naive|pipelined`, where every byte a collective moves
between GPUs is AES-256-GCM sealed under a per-link key and verified on receipt (docs/tp.md, phase 3).

Same interface as TensorParallelGroup (rank, size, group, all_reduce, all_gather, min_over_ranks, close), so the
layers do not know which one they hold. Both collectives are built on one exchange: each rank seals its
contribution once per peer (ccserve.secure.links: key and IV counter of that directed link), the sealed messages
cross in one all_to_all, and each rank verifies and decrypts what its peers sent. Then
- all_reduce sums the contributions locally in rank order, so every rank computes the same additions in the same
  order and holds a bit-identical sum (a ring all-reduce over sealed data would need a seal per hop instead);
- all_gather concatenates them in rank order.
A message that fails authentication does not stop the collective, and never releases what it carried: its failed
chunks decrypt to zeros, and the receiving rank sets its sticky `failed` flag on the device. Every message carries
its sender's flag (a 16-byte trailer, inside the seal), so a failure anywhere reaches every rank with the
collectives that follow; the engine asks `verify()` once per step, after it has read the step's tokens (a point
where it waits for the GPU anyway), and a failed step ends the group (the existing worker-failure path).

Capturable in a CUDA graph: the IV counters live on the device (ccserve.secure.links) and the verdict stays on the
device until verify(), so no collective waits for the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import torch
import torch.distributed as dist

from ccserve.distributed.group import TensorParallelGroup
from ccserve.kernels.aes_gcm import alloc_plain
from ccserve.secure.errors import IntegrityError
from ccserve.secure.links import OFFER_BYTES, LinkKeyAgreement, SealedLinks

CHUNK_BYTES = 64 << 10      # one GCM message per 64 KiB: a decode step's all-reduce still spreads over the GPU
TRAILER_BYTES = 16          # after the payload (padded to 16 bytes), inside the seal: the sender's failed flag


@dataclass
class LinksCheck:
    """The failed flag as of some point in the stream: copied to the host without waiting, `event` marks when the
    copy has landed (None on the CPU, where it is done at once)."""

    host: torch.Tensor
    event: torch.cuda.Event | None


class SealedTensorParallelGroup:
    """A tensor-parallel group whose collectives carry only sealed payloads between ranks."""

    def __init__(self, plain: TensorParallelGroup, device: torch.device, chunk_bytes: int = CHUNK_BYTES) -> None:
        """Agree on link keys with every other rank (a collective: every rank constructs its group together).
        device: this rank's device; CUDA tensors are sealed by the GPU kernels, CPU tensors through OpenSSL."""
        if plain.size < 2:
            raise ValueError("a sealed tensor-parallel group needs at least 2 ranks (size 1 has no links)")
        self.rank, self.size, self.group = plain.rank, plain.size, plain.group
        self._plain = plain
        self.device = device
        self._links = self._agree(device, chunk_bytes)
        self.failed = torch.zeros(1, dtype=torch.int32, device=device)   # sticky: a message failed, here or before

    def _agree(self, device: torch.device, chunk_bytes: int) -> SealedLinks:
        """Exchange key offers over a gloo group: its connections stay in host memory of the confidential VM, a
        trusted path, so the host cannot replace a public key as it could on the GPU links."""
        control = dist.new_group(backend="gloo")
        try:
            agreement = LinkKeyAgreement()
            mine = torch.frombuffer(bytearray(agreement.offer), dtype=torch.uint8)
            offers = [torch.empty(OFFER_BYTES, dtype=torch.uint8) for _ in range(self.size)]
            dist.all_gather(offers, mine, group=control)
        finally:
            dist.destroy_process_group(control)
        return agreement.derive(self.rank, [o.numpy().tobytes() for o in offers], device, chunk_bytes)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place: every rank adds the same contributions in rank order."""
        x.copy_(reduce(torch.add, self._exchange(x)))
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's x along the last dimension, in rank order: [..., n] -> [..., size * n]."""
        return torch.cat(self._exchange(x), dim=-1)

    def min_over_ranks(self, value: int, device: torch.device) -> int:
        """Delegated unsealed: a KV block count is sizing, not request data."""
        return self._plain.min_over_ranks(value, device)

    def mark_failed(self) -> None:
        """Something this rank received for the group failed authentication outside the collectives (a worker's KV
        swap message): the flag travels to rank 0 like a failed collective's, and fails the step there."""
        self.failed.fill_(1)

    def checkpoint(self) -> LinksCheck:
        """Snapshot the failed flag after the work enqueued so far, without waiting for it: verify(check) then
        waits for that work only, not for work enqueued later (a decode window continued on the device)."""
        cuda = self.device.type == "cuda"
        host = torch.empty(1, dtype=torch.int32, pin_memory=cuda)
        host.copy_(self.failed, non_blocking=True)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        return LinksCheck(host, event)

    def verify(self, check: LinksCheck | None = None) -> None:
        """Raise IntegrityError if a message failed authentication on this rank, or on a rank whose messages have
        reached this one since, as of `check` (default: now, waiting for all enqueued work). The group is closed
        then: fail closed."""
        if check is None:
            failed = int(self.failed.item())
        else:
            if check.event is not None:
                check.event.synchronize()
            failed = int(check.host[0])
        if failed:
            self.close()
            raise IntegrityError(f"a tensor-parallel message to rank {self.rank} or to a rank it heard from failed "
                                 "authentication (tampered, replayed or reordered): zeros stood in for what it "
                                 "carried, and the results computed since the last check are discarded")

    def close(self) -> None:
        """Zeroize the link keys; further collectives raise ChannelClosed."""
        self._links.close()

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x, in rank order: this rank's own, the others' verified and decrypted (zeros where a
        message failed, which sets `failed`)."""
        x = x.contiguous()
        nbytes = x.numel() * x.element_size()
        if nbytes == 0:
            return [x] * self.size
        body = -(-nbytes // 16) * 16
        plain = torch.zeros(body + TRAILER_BYTES, dtype=torch.uint8, device=x.device)
        plain[:nbytes].copy_(x.view(-1).view(torch.uint8))
        plain[body:body + 4].view(torch.int32).copy_(self.failed)
        size = body + TRAILER_BYTES
        width = self._links.wire_width(size)
        peers = [p for p in range(self.size) if p != self.rank]
        send = torch.empty(len(peers) * width, dtype=torch.uint8, device=x.device)
        for i, peer in enumerate(peers):
            self._links.seal(peer, plain, size, send[i * width:(i + 1) * width])
        recv = self._transfer(send, width)
        parts = []
        for p in range(self.size):
            if p == self.rank:
                parts.append(x)
                continue
            i = peers.index(p)
            out = alloc_plain(size, x.device)
            ok = self._links.open(p, recv[i * width:(i + 1) * width], out, size).to(x.device)
            sender_failed = out[body:body + 4].view(torch.int32)
            self.failed.bitwise_or_((ok == 0).any().to(torch.int32) | sender_failed)
            parts.append(out[:nbytes].view(x.dtype).view(x.shape))
        return parts

    def _transfer(self, send: torch.Tensor, width: int) -> torch.Tensor:
        """One all_to_all: `width` sealed bytes to each peer (in rank order), none to this rank itself."""
        splits = [0 if p == self.rank else width for p in range(self.size)]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, splits, splits, group=self.group)
        return recv

