"""Zero the GPU memory PyTorch's caching allocator holds but nobody uses: the freed activations of eager steps.

Why: a freed tensor's memory goes back to the caching allocator, not to the driver, and keeps its bytes until a
later allocation overwrites them. Eager prefills leave a request's hidden states there (embeddings of its prompt,
MLP activations). Rule S (stateless computation) wants nothing of a request to survive it, so when the engine is
idle (ModelRunner.scrub_idle) every free block of the allocator's default pool is allocated, zeroed and given
back. CUDA graphs' private pools are not touched here (their activations are overwritten by replaying the graphs
on zero inputs, scrub_idle), nor is memory the allocator returned to the driver.

How: the allocator's snapshot lists each segment's blocks with their sizes and states. Requesting exactly the
inactive blocks' sizes, largest first, makes the allocator's best fit hand out those very blocks. A request the
allocator places in new memory instead (a small remainder split off a large segment is out of reach of the small
pool's requests) is given back unzeroed and the block it aimed at stays as it was: best effort, which the canary
bench measures. `bench/gpu_canary.py` checks on the GPU that a prompt's marker
no longer shows in free memory afterwards.
"""
from __future__ import annotations

import torch

DEFAULT_POOL = (0, 0)


def zero_cached_free_memory(device: torch.device) -> int:
    """Zero the free blocks of the caching allocator's default pool on `device`; returns the bytes zeroed."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    sizes = sorted((block["size"] for segment in torch.cuda.memory_snapshot()
                    if segment["device"] == index and tuple(segment.get("segment_pool_id", DEFAULT_POOL)) == DEFAULT_POOL
                    for block in segment["blocks"] if block["state"] == "inactive"), reverse=True)
    held, zeroed = [], 0
    try:
        for size in sizes:
            reserved = torch.cuda.memory_reserved(device)
            block = torch.empty(size, dtype=torch.uint8, device=device)
            if torch.cuda.memory_reserved(device) > reserved:     # new memory: that free block is out of reach
                del block
                continue
            block.zero_()
            held.append(block)
            zeroed += size
    except torch.OutOfMemoryError:
        pass
    torch.cuda.synchronize(device)
    del held
    return zeroed
