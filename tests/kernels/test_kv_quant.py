"""Quantized KV: error bounds of every format (reference), and the Triton store and attention kernels against
their references on caches of every format."""
import pytest
import torch

from ccserve.kernels.decode_attention import DecodeConfig, decode_attention_ref, decode_attention_triton
from ccserve.kernels.kv_quant import (PagedCache, dequantize_blocks_ref, pack, quantize_tokens_ref,
                                      store_channel_group_ref, unpack)
from ccserve.kernels.kv_store import store_kv_ref, store_kv_triton
from ccserve.kernels.prefill_attention import PrefillConfig, prefill_attention_ref, prefill_attention_triton
from ccserve.kv.formats import KVFormat, TensorFormat
from tests.kernels.paged import TOLERANCE
from tests.kernels.quantized import ALL_FORMATS, as_float, fill_paged, make_cache


def outlier_data(*shape: int) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(*shape)
    x[..., 3] *= 20                     # an outlier channel, as real keys have
    x.view(-1)[::97] *= 5               # and scattered large values
    return x


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 16), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, 5, 16 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 32), (2, 32), (4, 8)])
def test_int_token_error_bound(bits, group):
    """|x - x^| <= scale / 2 (+ fp16 rounding of scale and zero: 2^-10 of the group's magnitude), where
    scale = (max - min) / (2^bits - 1) of the group."""
    x = outlier_data(64, 4, 64)
    codes, scale, zero = quantize_tokens_ref(x, "int", bits, group)
    g = x.view(64, 4, -1, group)
    x_hat = (unpack(codes, bits).float().view_as(g) * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1))
    err = (g - x_hat).abs()
    mag = g.abs().amax(-1, keepdim=True)
    bound = scale.float().unsqueeze(-1) / 2 + 2 ** -10 * mag
    assert torch.all(err <= bound)
    assert (err / bound).max() > 0.5               # the bound is not vacuous


def test_fp8_error_bound():
    """|x - x^| <= 2^-4 |x| (3 mantissa bits) + 2^-9 scale (subnormals), scale = amax / 448 per token and head."""
    x = outlier_data(64, 4, 64)
    codes, scale, zero = quantize_tokens_ref(x, "fp8", 8, 64)
    assert zero is None and codes.dtype == torch.float8_e4m3fn
    scale = scale.float()                                 # [64, 4, 1]: one group per head
    x_hat = codes.float() * scale
    err = (x - x_hat).abs()
    assert torch.all(err <= 2 ** -4 * x.abs() + 2 ** -9 * scale)
    assert (err / (2 ** -4 * x.abs() + 2 ** -9 * scale)).max() > 0.5
    assert torch.all(codes.float().abs() <= 448)


def _channel_cache(bits: int, block_size: int = 8, head_dim: int = 16) -> PagedCache:
    fmt = KVFormat("k", TensorFormat("int", bits, axis="channel"), TensorFormat())
    return make_cache(fmt, 2, 2, block_size, head_dim)[1]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_channel_group_written_at_once_error_bound(bits):
    """A whole group in one step: |x - x^| <= scale / 2 (+ fp16 rounding) per channel over the group's tokens."""
    cache = _channel_cache(bits)
    x = outlier_data(8, 2, 16)
    store_channel_group_ref(x, cache, block=1, first_row=0)
    x_hat = dequantize_blocks_ref(cache, torch.tensor([1]))[0].transpose(0, 1)     # [bs, Hk, D]
    scale = cache.scale[1, :, 0].float()                                            # [Hk, D]
    bound = scale / 2 + 2 ** -10 * x.abs().amax(0)
    assert torch.all((x - x_hat).abs() <= bound)


def test_channel_group_append_inside_range_changes_nothing():
    """Appending tokens whose values lie inside every channel's stored range keeps scales, zeros and codes."""
    cache = _channel_cache(4)
    x = outlier_data(8, 2, 16)
    store_channel_group_ref(x[:4], cache, block=0, first_row=0)
    before = cache.data[0].clone(), cache.scale[0].clone(), cache.zero[0].clone()
    lo, hi = x[:4].amin(0), x[:4].amax(0)
    inside = lo + (hi - lo) * torch.rand(4, 2, 16) * 0.9 + 0.05 * (hi - lo)
    store_channel_group_ref(inside, cache, block=0, first_row=4)
    assert torch.equal(cache.data[0][:, :4], before[0][:, :4])
    assert torch.equal(cache.scale[0], before[1]) and torch.equal(cache.zero[0], before[2])


@pytest.mark.parametrize("bits", [8, 4])
def test_channel_group_appended_one_by_one_error_bound(bits):
    """Decode appends one token at a time; each range growth re-encodes the old rows. A token's error is at most
    (re-encodings it went through + 1) * final scale / 2: the documented worst case, checked on keys whose range
    grows at every step."""
    cache = _channel_cache(bits)
    x = outlier_data(8, 2, 16) * torch.linspace(0.2, 1.0, 8)[:, None, None]      # growing range
    for row in range(8):
        store_channel_group_ref(x[row:row + 1], cache, block=0, first_row=row)
    x_hat = dequantize_blocks_ref(cache, torch.tensor([0]))[0].transpose(0, 1)
    scale = cache.scale[0, :, 0].float()
    for row in range(8):
        encodings = 8 - row
        bound = encodings * scale / 2 + 2 ** -9 * x.abs().amax(0)
        assert torch.all((x[row] - x_hat[row]).abs() <= bound), row


@pytest.mark.parametrize("name", list(ALL_FORMATS))
def test_store_kernel_matches_reference(name):
    """Prefill chunks, decode appends and padding slots through the Triton store equal the reference bit for bit
    (codes, scales and zero points)."""
    torch.manual_seed(1)
    num_kv_heads, block_size, head_dim = 2, 8, 32
    _, k_ref, v_ref = make_cache(ALL_FORMATS[name], 9, num_kv_heads, block_size, head_dim)
    _, k_got, v_got = make_cache(ALL_FORMATS[name], 9, num_kv_heads, block_size, head_dim)
    tables = [[4, 0, 7], [2, 8, 1]]
    lens = [0, 0]
    for chunks in ([(0, 11), (1, 3)], [(0, 1), (1, 1)], [(1, 6), (0, 1)], [(0, 1), (1, 1)], [(1, 9)]):
        slots = []
        for s, n in chunks:
            slots += [tables[s][p // block_size] * block_size + p % block_size for p in range(lens[s], lens[s] + n)]
            lens[s] += n
        slots = [-1] + slots + [-1]           # padding rows (CUDA-graph batches pad with slot -1)
        kv = torch.randn(len(slots), 2, num_kv_heads, head_dim)
        kv[:, 0, :, 5] *= 10
        slot_mapping = torch.tensor(slots)
        store_kv_ref(kv[:, 0], kv[:, 1], k_ref, v_ref, slot_mapping)
        store_kv_triton(kv[:, 0], kv[:, 1], k_got, v_got, slot_mapping)
    for got, ref in ((k_got, k_ref), (v_got, v_ref)):
        tensors = [(got, ref)] if isinstance(got, torch.Tensor) else [
            (got.data, ref.data), (got.scale, ref.scale), (got.zero, ref.zero)]
        for g, r in tensors:
            if g is not None:
                assert torch.equal(g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g,
                                   r.view(torch.uint8) if r.dtype == torch.float8_e4m3fn else r)
        assert as_float(got).abs().sum() > 0


@pytest.mark.parametrize("name", list(ALL_FORMATS))
def test_decode_on_quantized_cache_matches_reference(name):
    torch.manual_seed(2)
    seq_lens = [37, 0, 90, 1]
    k, v, tables = fill_paged(ALL_FORMATS[name], [max(n, 1) for n in seq_lens], 2, 8, 32)
    q = torch.randn(len(seq_lens), 4, 32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    expect = decode_attention_ref(q, k, v, lens, tables, 32 ** -0.5)
    got = decode_attention_triton(q, k, v, lens, tables, 32 ** -0.5, num_splits=2, config=DecodeConfig(block_n=16))
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,dtype", [(n, torch.float32) for n in ALL_FORMATS] +
                         [("K4V2", torch.bfloat16), ("fp8", torch.float16)])
def test_prefill_on_quantized_cache_matches_reference(name, dtype):
    torch.manual_seed(3)
    chunks = [(21, 0), (9, 30), (1, 16)]              # (query tokens, cached context before them)
    seq_lens = [q_len + ctx for q_len, ctx in chunks]
    k, v, tables = fill_paged(ALL_FORMATS[name], seq_lens, 1, 8, 32, dtype=dtype)
    cu = torch.tensor([0] + [q for q, _ in chunks]).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), 3, 32).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    expect = prefill_attention_ref(q, k, v, cu, lens, tables, 32 ** -0.5, 21)
    got = prefill_attention_triton(q, k, v, cu, lens, tables, 32 ** -0.5, 21,
                                   config=PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1))
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expect.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["K8V8", "K4V2", "fp8"])
def test_quantized_attention_is_close_to_full_precision(name):
    """The quantized cache changes attention output by a format-sized amount, not more (and not zero)."""
    torch.manual_seed(4)
    seq_lens = [64, 40]
    fmt = ALL_FORMATS[name]
    torch.manual_seed(5)
    k, v, tables = fill_paged(fmt, seq_lens, 2, 8, 32)
    torch.manual_seed(5)
    k_full, v_full, _ = fill_paged(KVFormat("full", TensorFormat(), TensorFormat()), seq_lens, 2, 8, 32)
    q = torch.randn(2, 4, 32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    quant = decode_attention_ref(q, k, v, lens, tables, 32 ** -0.5)
    full = decode_attention_ref(q, k_full, v_full, lens, tables, 32 ** -0.5)
    rel = ((quant - full).norm() / full.norm()).item()
    assert 0 < rel < {"K8V8": 0.01, "fp8": 0.05, "K4V2": 0.6}[name]
