import math

import pytest
import torch

from ccserve.kernels import skinny_gemm as sg
from ccserve.kernels.skinny_gemm import SkinnyConfig, choose_config, skinny_gemm, skinny_gemm_ref, skinny_gemm_triton
from ccserve.layers.linear import SKINNY_MAX_ROWS, use_skinny_gemm

# The CPU interpreter rounds to bf16/fp16 toward zero, not to nearest: allow 1-2 ulp there.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1e-2, rtol=2 ** -6)}

CONFIGS = [   # every code path: fma / dot, whole K or split (combined in-kernel or by a second kernel), ragged K
    SkinnyConfig(block_n=8, block_k=32, use_dot=False),
    SkinnyConfig(block_n=16, block_k=32, split_k=3, use_dot=False),
    SkinnyConfig(block_n=16, block_k=64),
    SkinnyConfig(block_n=32, block_k=16, split_k=4),
    SkinnyConfig(block_n=16, block_k=32, split_k=2, serial_combine=False),
    SkinnyConfig(block_n=8, block_k=16, split_k=2, use_dot=False, serial_combine=False),
]


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """Every float buffer the launcher allocates (output, split-K partials) starts as NaN: an element the kernel
    forgets to write fails the comparison instead of passing on leftover memory."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(math.nan) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", empty)


def _operands(m: int, n: int, k: int, dtype: torch.dtype, bias: bool):
    """Weights scaled by 1/sqrt(K) so outputs are O(1) and the bf16 tolerance means ~1 ulp."""
    x = torch.randn(m, k).to(dtype)
    w = (torch.randn(n, k) / k ** 0.5).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    return x, w, b


def _check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    expect = skinny_gemm_ref(x, w, b)
    assert got.shape == expect.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, expect, **TOL[x.dtype])


@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("n,k,dtype,bias", [
    (100, 72, torch.bfloat16, False),    # odd N and K: partial column slab, ragged last K tile
    (100, 72, torch.bfloat16, True),
    (960, 576, torch.bfloat16, True),    # SmolLM2-135M qkv (Qwen2-style bias)
    (576, 1536, torch.float16, False),   # SmolLM2-135M down_proj
])
def test_default_config_matches_reference(m, n, k, dtype, bias):
    torch.manual_seed(m * 1000 + n + k)
    x, w, b = _operands(m, n, k, dtype, bias)
    _check(skinny_gemm_triton(x, w, b), x, w, b)


@pytest.mark.parametrize("config", CONFIGS, ids=SkinnyConfig.describe)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_config_matches_reference(config, m, dtype):
    torch.manual_seed(m)
    x, w, b = _operands(m, 100, 200, dtype, bias=True)
    _check(skinny_gemm_triton(x, w, b, config), x, w, b)


def test_strided_rows_leading_dims_and_transposed_input():
    """A column slice of a wider tensor is read in place; [B, T, K] keeps its leading dims; a K-strided input
    is copied first."""
    torch.manual_seed(7)
    w, b = torch.randn(40, 48).bfloat16(), torch.randn(40).bfloat16()
    wide = torch.randn(5, 3 * 48).bfloat16()
    x = wide[:, 48:96]
    assert x.stride() == (144, 1)
    _check(skinny_gemm_triton(x, w, b), x, w, b)
    x3 = torch.randn(2, 3, 48).bfloat16()
    got = skinny_gemm_triton(x3, w)
    assert got.shape == (2, 3, 40)
    _check(got, x3, w, None)
    xt = torch.randn(48, 4).bfloat16().t()
    _check(skinny_gemm_triton(xt, w, b, CONFIGS[1]), xt, w, b)


def test_serial_split_k_leaves_counters_zero_and_is_deterministic():
    """The last program of each slab resets its counter, so back-to-back launches (and CUDA graph replays)
    start from zero; partials are summed in split order, so repeats are bit-identical."""
    torch.manual_seed(3)
    x, w, b = _operands(4, 300, 256, torch.float32, bias=True)
    config = SkinnyConfig(block_n=16, block_k=32, split_k=4)
    first = skinny_gemm_triton(x, w, b, config)
    again = skinny_gemm_triton(x, w, b, config)
    assert torch.equal(first, again)
    assert not sg._split_counters(x.device).any()
    _check(first, x, w, b)


def test_no_rows_and_errors():
    w = torch.randn(32, 64)
    assert skinny_gemm_triton(torch.empty(0, 64), w).shape == (0, 32)
    with pytest.raises(ValueError, match="at most 16 rows"):
        skinny_gemm_triton(torch.randn(17, 64), w)
    with pytest.raises(ValueError, match="row-major"):
        skinny_gemm_triton(torch.randn(2, 64), w.t().contiguous().t())
    with pytest.raises(ValueError, match="row-major"):
        skinny_gemm_triton(torch.randn(2, 64).bfloat16(), w)


def test_dispatcher_uses_reference_off_gpu():
    torch.manual_seed(5)
    x, w, b = _operands(2, 24, 40, torch.float32, bias=True)
    assert torch.equal(skinny_gemm(x, w, b), skinny_gemm_ref(x, w, b))


LLAMA3_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
             "lm_head": (128256, 4096)}


@pytest.mark.parametrize("m", [1, 2, 8, 16])
@pytest.mark.parametrize("shape", LLAMA3_8B.values(), ids=LLAMA3_8B.keys())
def test_chooser_fills_the_gpu_with_valid_configs(m, shape):
    """At least ~one program per SM on a 132-SM H100, whole K tiles for Llama-3-8B, and counters enough."""
    n, k = shape
    config = choose_config(m, n, k, num_sms=132)
    tiles = -(-n // config.block_n)
    assert tiles * config.split_k >= 132
    assert k % (config.split_k * config.block_k) == 0
    assert config.split_k == 1 or tiles <= sg.MAX_SERIAL_TILES
    assert config.use_dot == (m > 1) and (not config.use_dot or config.block_n >= 16)


def test_linear_dispatch_rule_is_shape_only():
    assert use_skinny_gemm(1, 4096, 4096) and use_skinny_gemm(SKINNY_MAX_ROWS, 6144, 4096)
    assert not use_skinny_gemm(1, 28672, 4096)  # gate_up stays on cuBLAS
    assert not use_skinny_gemm(0, 4096, 4096) and not use_skinny_gemm(SKINNY_MAX_ROWS + 1, 4096, 4096)
    assert SKINNY_MAX_ROWS <= sg.MAX_ROWS
