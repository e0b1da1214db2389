"""Per-link keys and IV counters of the tensor-parallel group, in one process: what rank s seals for rank r opens
only on r's side of that link, in order, and nowhere else."""
from __future__ import annotations

import pickle

import pytest
import torch

from ccserve.kernels.aes_gcm import alloc_plain, alloc_wire
from ccserve.secure import ChannelClosed
from ccserve.secure.links import LinkKeyAgreement

CHUNK = 128
CPU = torch.device("cpu")


def three_ranks():
    agreements = [LinkKeyAgreement() for _ in range(3)]
    offers = [a.offer for a in agreements]
    return [a.derive(rank, offers, CPU, CHUNK) for rank, a in enumerate(agreements)]


def send(links, peer, data: torch.Tensor) -> torch.Tensor:
    wire = alloc_wire(data.numel(), CHUNK, CPU)
    plain = alloc_plain(data.numel(), CPU)
    plain[:data.numel()].copy_(data)
    links.seal(peer, plain, data.numel(), wire)
    return wire


def receive(links, peer, wire, n) -> tuple[bool, torch.Tensor]:
    out = alloc_plain(n, CPU)
    return bool(links.open(peer, wire, out, n).all()), out[:n]


def test_each_directed_link_opens_only_at_its_receiver_in_order():
    ranks = three_ranks()
    data = torch.randint(0, 256, (300,), dtype=torch.uint8)
    first, second = send(ranks[0], 2, data), send(ranks[0], 2, data)
    assert not torch.equal(first, second)                  # a fresh IV per message
    assert receive(ranks[2], 1, first, 300)[0] is False    # another link's key (1 -> 2)
    ok, out = receive(ranks[2], 0, first, 300)
    assert ok and torch.equal(out, data)
    assert receive(ranks[2], 0, first, 300)[0] is False    # replayed: the cursor has moved on
    back = send(ranks[2], 0, data)
    assert receive(ranks[1], 2, back, 300)[0] is False     # link 2 -> 0 is not 2 -> 1
    ok, out = receive(ranks[0], 2, back, 300)
    assert ok and torch.equal(out, data)


def test_the_gpu_kernels_and_openssl_speak_the_same_links():
    """Rank 0 seals and opens with the Triton kernels (interpreted on the CPU), rank 1 with OpenSSL; messages sit at
    an offset inside a larger buffer, as the group's all_to_all packs them."""
    a, b = LinkKeyAgreement(), LinkKeyAgreement()
    gpu = a.derive(0, [a.offer, b.offer], CPU, CHUNK, backend="triton")
    ref = b.derive(1, [a.offer, b.offer], CPU, CHUNK)
    data = torch.randint(0, 256, (300,), dtype=torch.uint8)
    width = gpu.wire_width(300)
    assert width == alloc_wire(300, CHUNK, CPU).numel()
    packed = torch.zeros(2 * width, dtype=torch.uint8)
    plain = alloc_plain(300, CPU)
    plain[:300].copy_(data)
    gpu.seal(1, plain, 300, packed[width:])
    ok, out = receive(ref, 0, packed[width:].clone(), 300)
    assert ok and torch.equal(out, data)
    ok, out = receive(gpu, 1, send(ref, 0, data), 300)
    assert ok and torch.equal(out, data)
    bad = send(ref, 0, data)
    bad[CHUNK + 16 + 1] ^= 1
    ok, out = receive(gpu, 1, bad, 300)
    assert not ok and not out[CHUNK:2 * CHUNK].any()    # the failed chunk is zeros, never plaintext


def test_keys_stay_in_memory_and_are_zeroized():
    ranks = three_ranks()
    with pytest.raises(TypeError, match="never leave process memory"):
        pickle.dumps(ranks[0])
    ranks[0].close()
    with pytest.raises(ChannelClosed):
        send(ranks[0], 1, torch.ones(16, dtype=torch.uint8))


def test_an_agreement_is_used_once_and_checks_the_offers():
    a, b = LinkKeyAgreement(), LinkKeyAgreement()
    with pytest.raises(ValueError, match="this rank's own offer"):
        a.derive(0, [b.offer, a.offer], CPU, CHUNK)
    a.derive(0, [a.offer, b.offer], CPU, CHUNK)
    with pytest.raises(RuntimeError, match="already used"):
        a.derive(0, [a.offer, b.offer], CPU, CHUNK)
