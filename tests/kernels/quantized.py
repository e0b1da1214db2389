"""Shared inputs for the quantized-KV kernel tests: caches of every format, filled the way the engine fills them
(prefill chunks, then decode appends), through the reference store."""
from __future__ import annotations

import torch

from ccserve.kernels.kv_quant import PagedCache, dequantize_blocks_ref
from ccserve.kernels.kv_store import store_kv_ref
from ccserve.kv.cache import KVCache
from ccserve.kv.formats import PRESETS, KVFormat, TensorFormat
from tests.kernels.paged import shuffled_tables

QUANTIZED = [name for name, f in PRESETS.items() if f.quantized]
# Beyond the presets: token-axis keys (LeanKV's per-token scheme), channel groups shorter than a block,
# int2 keys, and a quantized operand beside a model-dtype one.
EXTRA = {
    "K4tok-V4": KVFormat("K4tok-V4", TensorFormat("int", 4, group=8), TensorFormat("int", 4, group=8)),
    "K2ch4-V8": KVFormat("K2ch4-V8", TensorFormat("int", 2, axis="channel", group=4), TensorFormat("int", 8)),
    "K16-V4": KVFormat("K16-V4", TensorFormat(), TensorFormat("int", 4, group=8)),
}
ALL_FORMATS = {**{n: PRESETS[n] for n in QUANTIZED}, **EXTRA}


def make_cache(fmt: KVFormat, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
               dtype: torch.dtype = torch.float32) -> tuple[KVCache, object, object]:
    """A one-layer cache of the format and its layer-0 K and V operands."""
    cache = KVCache(1, num_kv_heads, block_size, head_dim, num_blocks, dtype, torch.device("cpu"),
                    fmt.resolve(head_dim, block_size))
    return cache, cache.keys.layer(0), cache.values.layer(0)


def as_float(cache: torch.Tensor | PagedCache) -> torch.Tensor:
    """All blocks of an operand in fp32 [blocks, Hk, bs, D]."""
    if isinstance(cache, torch.Tensor):
        return cache.float()
    return dequantize_blocks_ref(cache, torch.arange(cache.data.shape[0]))


def fill_paged(fmt: KVFormat, seq_lens: list[int], num_kv_heads: int, block_size: int, head_dim: int,
               chunk: int = 5, dtype: torch.dtype = torch.float32):
    """Quantized K/V caches holding seq_lens tokens per sequence over shuffled blocks, written in chunks of up to
    `chunk` tokens per sequence per step (all sequences in each step), so channel groups are extended across
    steps as in decode. Returns (k, v, block_tables)."""
    tables, num_blocks = shuffled_tables(seq_lens, block_size)
    _, k, v = make_cache(fmt, num_blocks, num_kv_heads, block_size, head_dim, dtype)
    done = [0] * len(seq_lens)
    while done != seq_lens:
        slots = []
        for s, n in enumerate(seq_lens):
            take = min(chunk, n - done[s])
            slots += [int(tables[s, p // block_size]) * block_size + p % block_size
                      for p in range(done[s], done[s] + take)]
            done[s] += take
        x = torch.randn(2, len(slots), num_kv_heads, head_dim)
        x[0, :, :, 1] *= 8                                      # an outlier channel in the keys
        store_kv_ref(x[0].to(dtype), x[1].to(dtype), k, v, torch.tensor(slots))
    return k, v, tables
