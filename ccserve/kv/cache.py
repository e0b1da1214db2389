"""KV-cache memory: one key tensor and one value tensor for all layers, viewed per layer.

Layout [layers, blocks, kv_heads, block_size, head_dim]: within a block each head's tokens are contiguous,
so a kernel reads one (block, head) tile as a single run of memory, and per-head paging (each KV head its
own token count, for sparsity) can later split a block along the head axis without moving data. Keys and
values are separate tensors so that each can get its own format (kv/formats.py): a quantized operand keeps
packed codes in the same layout (head_dim * bits / 8 bytes a row) plus fp16 scale and zero-point tensors
whose second axis is also the block id, so one block id addresses all of them and scrubbing a block zeroes
its scales too.
"""
from __future__ import annotations

import torch
from torch import nn

from ccserve.kernels.kv_quant import PagedCache, cache_shapes
from ccserve.kv.formats import PRESETS, KVFormat, TensorFormat
from ccserve.kv.sparsity import SparseState


class _Operand:
    """All layers of one of K or V: codes, and for a quantized format its scales and zero points."""

    def __init__(self, fmt: TensorFormat, lead: tuple[int, int, int], block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.fmt = fmt
        codes, codes_dtype, scales = cache_shapes(fmt.kind, fmt.bits, fmt.axis, fmt.group, block_size, head_dim,
                                                  dtype)
        self.data = torch.zeros(*lead, *codes, dtype=codes_dtype, device=device)
        self.scale = torch.zeros(*lead, *scales, dtype=torch.float16, device=device) if scales else None
        self.zero = torch.zeros_like(self.scale) if fmt.kind == "int" else None

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.data, self.scale, self.zero) if t is not None]

    def layer(self, i: int) -> torch.Tensor | PagedCache:
        """Layer i's view: a plain tensor for the model dtype (today's kernels), else a PagedCache."""
        if self.fmt.kind == "model":
            return self.data[i]
        zero = self.zero[i] if self.zero is not None else None
        return PagedCache(self.data[i], self.scale[i], zero, self.fmt.kind, self.fmt.bits, self.fmt.axis,
                          self.fmt.group)


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, block_size: int, head_dim: int, num_blocks: int,
                 dtype: torch.dtype, device: torch.device, kv_format: KVFormat | None = None,
                 sparse: bool = False) -> None:
        """kv_format must be resolved for this head_dim and block_size (KVFormat.resolve); None is bf16. sparse adds
        the per-token importance scores and pruned flags of --kv-sparsity (kv/sparsity.py), paged like the rest."""
        self.num_blocks = num_blocks
        self.format = kv_format or PRESETS["bf16"]
        lead = (num_layers, num_blocks, num_kv_heads)
        self.keys = _Operand(self.format.key, lead, block_size, head_dim, dtype, device)
        self.values = _Operand(self.format.value, lead, block_size, head_dim, dtype, device)
        self.k, self.v = self.keys.data, self.values.data
        self.sparse = SparseState(num_layers, num_blocks, num_kv_heads, block_size, device) if sparse else None

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache owns (codes, scales, zero points of K and V; sparsity's scores and flags): all
        indexed [layer, block, ...], so scrubbing and swapping cover them."""
        sparse = self.sparse.tensors if self.sparse is not None else []
        return self.keys.tensors + self.values.tensors + sparse

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def bind(self, attn_layers: list[nn.Module]) -> None:
        """Give each attention layer its views of the cache."""
        for i, layer in enumerate(attn_layers):
            layer.k_cache = self.keys.layer(i)
            layer.v_cache = self.values.layer(i)
            if self.sparse is not None:
                layer.pruned = self.sparse.pruned[i]
                layer.importance = self.sparse.importance[i]

    @staticmethod
    def unbind(attn_layers: list[nn.Module]) -> None:
        """Drop the layers' views of whatever cache they were bound to, so that its memory can be given back."""
        for layer in attn_layers:
            layer.k_cache = layer.v_cache = torch.empty(0)
            layer.pruned = layer.importance = None

    def scrub(self, block_ids: list[int]) -> None:
        """Zero the given blocks in every layer: codes, scales and zero points of keys and values, one batched
        kernel per tensor. The block ids go over from pinned memory, non-blocking: a copy from pageable memory
        may make the host wait for the GPU work queued before it (CUDA stages it through pinned memory), and a busy
        engine frees blocks in most steps. Scrubbing as a whole cost 2.1% on A-mixed on the H100 before this change
        (bench/gpu_engine.py SCRUB_AB=1); not re-measured since."""
        idx = torch.tensor(block_ids, dtype=torch.int64)
        if self.k.device.type == "cuda":
            idx = idx.pin_memory().to(self.k.device, non_blocking=True)
        for t in self.tensors:
            if t.dtype == torch.float8_e4m3fn:      # index_fill_ has no fp8 kernel: fill its bytes
                t.view(torch.uint8).index_fill_(1, idx, 0)
            else:
                t.index_fill_(1, idx, 0)

    def block_bytes(self) -> int:
        """Bytes of one block across every tensor and layer: what swapping one block moves."""
        return sum(t.nbytes // t.shape[1] for t in self.tensors)

    def gather(self, block_ids: list[int]) -> torch.Tensor:
        """The given blocks of every tensor (codes, scales, zero points of K and V, all layers) as ONE flat
        uint8 tensor, so a swap crosses the boundary as one message; quantized formats stay compressed."""
        idx = torch.tensor(block_ids, dtype=torch.int64, device=self.k.device)
        return torch.cat([t.view(torch.uint8).index_select(1, idx).reshape(-1) for t in self.tensors])

    def scatter(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Write what gather() returned for as many blocks back into `block_ids` (which may differ)."""
        if data.numel() != len(block_ids) * self.block_bytes():
            raise ValueError(f"swap-in data has {data.numel()} bytes, {len(block_ids)} blocks need "
                             f"{len(block_ids) * self.block_bytes()}: it was gathered from another cache format")
        idx = torch.tensor(block_ids, dtype=torch.int64, device=self.k.device)
        offset = 0
        for t in self.tensors:
            raw = t.view(torch.uint8)
            shape = (raw.shape[0], len(block_ids), *raw.shape[2:])
            n = shape[0] * len(block_ids) * (raw[0, 0].numel())
            raw.index_copy_(1, idx, data[offset:offset + n].view(shape))
            offset += n
