"""Zero the GPU memory PyTorch's caching allocator holds but nobody uses: the freed activations of eager steps.

Why: a freed tensor's memory goes back to the caching allocator, not to the driver, and keeps its bytes until a
later allocation overwrites them. Eager prefills leave a request's hidden states there (embeddings of its prompt,
MLP activations), the channel's streams its decrypted step inputs and swapped-in KV. Rule S (stateless
computation) wants nothing of a request to survive it, so when the engine is idle (ModelRunner.scrub_idle) every
free block of the allocator's default pool is allocated, zeroed and given back. CUDA graphs' private pools are not
touched here (their activations are overwritten by replaying the graphs on zero inputs, scrub_idle), nor is memory
the allocator already returned to the driver.

How: the allocator's snapshot lists each segment (its stream, its pool: small segments serve requests of at most
1 MiB) and its blocks in address order. For every free block, requests of its size (pieces of at most 1 MiB in a
small segment) are made on the block's stream, largest first, so that the allocator's best fit hands out that very
block; a piece is zeroed only if it landed at the block's address. A request that lands elsewhere (new memory) is
given back, and so is any segment that appeared meanwhile (empty_cache at the end): reserved memory never grows.
`bench/gpu_canary.py` checks on the GPU that a prompt's marker is gone from free memory afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_POOL = (0, 0)
SMALL_REQUEST = 1 << 20     # the caching allocator serves requests up to this size from its small segments


@dataclass(frozen=True)
class FreeBlock:
    stream: int
    address: int
    size: int


def free_blocks(device: torch.device) -> list[FreeBlock]:
    """The free blocks of the default pool on `device`, as pieces one request each can take, largest first."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    pieces = []
    for segment in torch.cuda.memory_snapshot():
        if segment["device"] != index or tuple(segment.get("segment_pool_id", DEFAULT_POOL)) != DEFAULT_POOL:
            continue
        limit = SMALL_REQUEST if segment.get("segment_type") == "small" else None
        address = segment["address"]
        for block in segment["blocks"]:
            if block["state"] == "inactive":
                step = limit or block["size"]
                pieces += [FreeBlock(segment["stream"], address + at, min(step, block["size"] - at))
                           for at in range(0, block["size"], step)]
            address += block["size"]
    return sorted(pieces, key=lambda p: p.size, reverse=True)


def take_free_blocks(device: torch.device) -> list[torch.Tensor]:
    """Allocate the free blocks of the default pool (each piece a uint8 tensor at the block's address, on the
    block's stream). The caller holds them while it reads or writes them, then drops them."""
    reserved = torch.cuda.memory_reserved(device)
    taken = []
    for piece in free_blocks(device):
        stream = (torch.cuda.default_stream(device) if piece.stream == 0
                  else torch.cuda.ExternalStream(piece.stream, device=device))
        try:
            with torch.cuda.stream(stream):
                block = torch.empty(piece.size, dtype=torch.uint8, device=device)
        except torch.OutOfMemoryError:
            continue
        if block.data_ptr() == piece.address:
            taken.append(block)
        del block
    if torch.cuda.memory_reserved(device) > reserved:
        torch.cuda.empty_cache()     # requests that landed in new memory: give it back (it held nothing)
    return taken


def zero_cached_free_memory(device: torch.device) -> int:
    """Zero the free blocks of the caching allocator's default pool on `device`; returns the bytes zeroed."""
    taken = take_free_blocks(device)
    for block in taken:
        block.zero_()
    torch.cuda.synchronize(device)
    zeroed = sum(block.numel() for block in taken)
    del taken
    return zeroed
