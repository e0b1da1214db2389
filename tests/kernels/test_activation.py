import pytest
import torch

from ccserve.kernels.activation import silu_and_mul_ref, silu_and_mul_triton

# The CPU interpreter rounds to bf16/fp16 toward zero, not to nearest: allow 1-2 ulp there.
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float16: dict(atol=1e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1e-2, rtol=2 ** -6)}


@pytest.mark.parametrize("tokens,inter,dtype", [
    (5, 96, torch.float32),
    (3, 1536, torch.bfloat16),   # SmolLM2 intermediate size: more than one tile per row, the last one partial
    (4, 200, torch.float16),
])
def test_silu_and_mul_matches_reference(tokens, inter, dtype):
    torch.manual_seed(0)
    x = (4 * torch.randn(tokens, 2 * inter)).to(dtype)
    got, expect = silu_and_mul_triton(x), silu_and_mul_ref(x)
    assert got.shape == (tokens, inter) and got.dtype == dtype
    torch.testing.assert_close(got, expect, **TOL[dtype])


def test_silu_and_mul_strided_rows_and_leading_dims():
    torch.manual_seed(1)
    wide = torch.randn(6, 3 * 64)
    x = wide[:, 32:160]                     # rows with stride 192, not 128
    torch.testing.assert_close(silu_and_mul_triton(x), silu_and_mul_ref(x), **TOL[torch.float32])
    x3 = torch.randn(2, 3, 2 * 40)
    got = silu_and_mul_triton(x3)
    assert got.shape == (2, 3, 40)
    torch.testing.assert_close(got, silu_and_mul_ref(x3), **TOL[torch.float32])


def test_silu_and_mul_no_rows():
    assert silu_and_mul_triton(torch.empty(0, 64)).shape == (0, 32)
