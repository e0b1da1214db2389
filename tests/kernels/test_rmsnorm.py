import pytest
import torch

from ccserve.kernels.rmsnorm import rmsnorm_ref, rmsnorm_triton

# The CPU interpreter rounds to bf16/fp16 toward zero, not to nearest: allow 1-2 ulp there.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1e-2, rtol=2 ** -6)}


def _weight(width: int, dtype: torch.dtype) -> torch.Tensor:
    return (1 + 0.2 * torch.randn(width)).to(dtype)


@pytest.mark.parametrize("rows,width,dtype", [
    (7, 576, torch.float32),     # SmolLM2 hidden size: not a power of two
    (5, 128, torch.bfloat16),    # one head of q: several rows per program
    (3, 80, torch.float16),
    (2, 4096, torch.bfloat16),   # Llama-3-8B hidden size
])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_matches_reference(rows, width, dtype, with_residual):
    torch.manual_seed(0)
    x = (3 * torch.randn(rows, width)).to(dtype)
    residual = torch.randn(rows, width).to(dtype) if with_residual else None
    weight = _weight(width, dtype)
    before = x.clone(), None if residual is None else residual.clone()

    got = rmsnorm_triton(x, weight, 1e-6, residual)
    expect = rmsnorm_ref(x, weight, 1e-6, residual)

    if with_residual:
        # The new residual stream, then the norm of it: a 1-ulp difference in the interpreter's bf16 sum would
        # otherwise compound through the three roundings of the norm.
        torch.testing.assert_close(got[1], expect[1], **TOL[dtype])
        got, expect = got[0], rmsnorm_ref(got[1], weight, 1e-6)
    assert got.dtype == expect.dtype
    torch.testing.assert_close(got, expect, **TOL[dtype])
    assert torch.equal(x, before[0]) and (residual is None or torch.equal(residual, before[1]))  # inputs kept


def test_rmsnorm_reads_strided_views_in_place():
    """Rows of a wider tensor (row stride 3N) beside a contiguous residual, and the per-head [T, H, D] view of
    a fused qkv output."""
    torch.manual_seed(1)
    tokens, heads, head_dim = 6, 3, 64
    x, residual = torch.randn(tokens, 3 * 576)[:, 576:1152], torch.randn(tokens, 576)
    weight = _weight(576, torch.float32)
    for got, expect in zip(rmsnorm_triton(x, weight, 1e-5, residual), rmsnorm_ref(x, weight, 1e-5, residual)):
        torch.testing.assert_close(got, expect, **TOL[torch.float32])

    qkv = torch.randn(tokens, (heads + 2) * head_dim)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    weight = _weight(head_dim, torch.float32)
    got = rmsnorm_triton(q, weight, 1e-6)
    assert got.shape == q.shape
    torch.testing.assert_close(got, rmsnorm_ref(q, weight, 1e-6), **TOL[torch.float32])


def test_rmsnorm_mixed_dtypes_follow_torch_promotion():
    """An fp32 weight over bf16 activations gives fp32 out (weight * h.to(bf16)), as the reference does."""
    torch.manual_seed(2)
    x = torch.randn(4, 96).to(torch.bfloat16)
    weight = _weight(96, torch.float32)
    got, expect = rmsnorm_triton(x, weight, 1e-6), rmsnorm_ref(x, weight, 1e-6)
    assert got.dtype == expect.dtype == torch.float32
    torch.testing.assert_close(got, expect, **TOL[torch.bfloat16])


def test_rmsnorm_no_rows():
    x = torch.empty(0, 64)
    out, residual = rmsnorm_triton(x, torch.ones(64), 1e-6, x)
    assert out.shape == residual.shape == (0, 64)
