"""KVCache.gather / scatter: what a swap moves is every tensor of the chosen blocks (codes, scales, zero points of
K and V in all layers), bit for bit, into other block ids."""
from __future__ import annotations

import pytest
import torch

from ccserve.kv.cache import KVCache
from ccserve.kv.formats import kv_format


def filled_cache(name: str, seed: int) -> KVCache:
    cache = KVCache(2, 2, 8, 32, num_blocks=6, dtype=torch.float32, device=torch.device("cpu"),
                    kv_format=kv_format(name).resolve(32, 8))
    g = torch.Generator().manual_seed(seed)
    for t in cache.tensors:
        raw = t.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=g))
    return cache


@pytest.mark.parametrize("name", ["bf16", "fp8", "K8V4", "K4V2"])
def test_gather_then_scatter_moves_every_tensor_of_the_blocks(name):
    src, dst = filled_cache(name, 0), filled_cache(name, 1)
    before = [t.clone() for t in dst.tensors]
    data = src.gather([1, 3])
    assert data.dtype == torch.uint8 and data.numel() == 2 * src.block_bytes()
    dst.scatter([4, 0], data)
    for s, d, b in zip(src.tensors, dst.tensors, before):
        s, d, b = s.view(torch.uint8), d.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(s[:, [1, 3]], d[:, [4, 0]])
        assert torch.equal(d[:, [1, 2, 3, 5]], b[:, [1, 2, 3, 5]])      # other blocks untouched
    if name != "bf16":
        assert len(src.tensors) > 2                                       # scales (and zeros) travelled too


def test_scatter_refuses_data_of_another_size():
    cache = filled_cache("K8V4", 0)
    with pytest.raises(ValueError, match="another cache format"):
        cache.scatter([0], filled_cache("bf16", 0).gather([0]))


class _Layer(torch.nn.Module):
    """What bind touches on an attention layer."""

    def __init__(self) -> None:
        super().__init__()
        self.k_cache = self.v_cache = torch.empty(0)
        self.pruned = self.importance = None


def test_unbind_lets_a_bound_cache_be_freed():
    """The engine's memory profile binds a temporary cache: the layers' views must not keep it alive after."""
    import gc
    import weakref
    layers = [_Layer(), _Layer()]
    cache = KVCache(2, 2, 8, 32, num_blocks=4, dtype=torch.float32, device=torch.device("cpu"), sparse=True)
    cache.bind(layers)
    storage = weakref.ref(cache.k.untyped_storage())
    del cache
    gc.collect()
    assert storage() is not None          # bound: the layers hold views
    KVCache.unbind(layers)
    gc.collect()
    assert storage() is None
    assert all(layer.k_cache.numel() == 0 and layer.pruned is None for layer in layers)
