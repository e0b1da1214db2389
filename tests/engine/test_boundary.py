"""The engine's boundary packs a step's host arrays into one sealed message and unpacks typed views of it."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ccserve.engine.boundary import Boundary
from ccserve.secure import IntegrityError


def arrays() -> list[np.ndarray]:
    return [np.arange(5, dtype=np.int64), np.array([3, 1, 4], dtype=np.int32), np.zeros((2, 3), dtype=np.int32) + 7,
            np.zeros(0, dtype=np.int32), np.array([0.5, 2.0, 1.0], dtype=np.float32),
            np.array([True, False, True]), np.array([[1, 2]], dtype=np.int64)]


@pytest.mark.parametrize("cc", ["off", "naive", "pipelined"])
def test_arrays_arrive_with_their_dtypes_shapes_and_values(cc):
    boundary = Boundary(SimpleNamespace(cc=cc, cc_threads=2), torch.device("cpu"))
    before = boundary.channel.stats.h2d_bytes if cc != "off" else 0   # the start-up message that compiles kernels
    out = boundary.to_device(arrays())
    for a, t in zip(arrays(), out):
        assert t.data_ptr() % 16 == 0 or t.numel() == 0     # as kernels expect of separate allocations
        assert t.dtype == torch.from_numpy(a).dtype and tuple(t.shape) == a.shape
        assert np.array_equal(t.numpy(), a)
    if cc != "off":
        stats = boundary.channel.stats
        assert stats.h2d_bytes - before == sum(-(-a.nbytes // 16) * 16 for a in arrays())   # ONE message, aligned
    boundary.close()


def test_a_failed_channel_is_replaced_with_fresh_keys():
    boundary = Boundary(SimpleNamespace(cc="naive", cc_threads=2), torch.device("cpu"))
    first = boundary.channel
    pending = first.to_host_async(torch.arange(4))
    pending.sealed.wire[1] ^= 1
    with pytest.raises(IntegrityError):
        pending.result()
    boundary.reset_if_failed()
    assert boundary.channel is not first and not boundary.channel.failed
    assert np.array_equal(boundary.to_device([np.arange(3)])[0].numpy(), np.arange(3))
