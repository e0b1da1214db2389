"""Which pieces of the CUDA caching allocator the idle scrub asks for (privacy/free_memory.py). The allocation and
zeroing run on a GPU only (bench/gpu_canary.py checks them there); the reading of the allocator's snapshot is
plain logic, checked here on a snapshot of the shape torch.cuda.memory_snapshot() returns."""
from __future__ import annotations

import torch

from ccserve.privacy import free_memory

MIB = 1 << 20


def _segment(address, blocks, stream=0, kind="large", pool=(0, 0), device=0):
    return dict(device=device, address=address, stream=stream, segment_type=kind, segment_pool_id=pool,
                total_size=sum(size for size, _ in blocks),
                blocks=[dict(size=size, state=state) for size, state in blocks])


def test_free_blocks_are_the_default_pools_inactive_blocks_at_their_addresses(monkeypatch):
    snapshot = [
        _segment(0x1000000, [(4 * MIB, "active_allocated"), (6 * MIB, "inactive"), (2 * MIB, "inactive")]),
        _segment(0x9000000, [(512, "active_allocated"), (2 * MIB - 512, "inactive")], stream=77, kind="small"),
        _segment(0xA000000, [(8 * MIB, "inactive")], pool=(1, 3)),          # a CUDA graph's private pool
        _segment(0xB000000, [(8 * MIB, "inactive")], device=1),             # another GPU
    ]
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: snapshot)
    pieces = free_memory.free_blocks(torch.device("cuda", 0))
    assert pieces == [
        free_memory.FreeBlock(0, 0x1000000 + 4 * MIB, 6 * MIB),
        free_memory.FreeBlock(0, 0x1000000 + 10 * MIB, 2 * MIB),
        free_memory.FreeBlock(77, 0x9000000 + 512, MIB),                  # small segments: 1 MiB requests
        free_memory.FreeBlock(77, 0x9000000 + 512 + MIB, MIB - 512),
    ]
