"""--kv-sparsity in the attention kernels: the references honour the keep mask per KV head and record the attention
mass per token; the Triton kernels (interpreter) match the references with a mask, whole tiles pruned included,
and the importance kernels add the same mass from the attention's log2-sum-exp."""
import pytest
import torch

from ccserve.kernels.attention_importance import add_decode_importance, add_prefill_importance
from ccserve.kernels.decode_attention import DecodeConfig, decode_attention_ref, decode_attention_triton
from ccserve.kernels.prefill_attention import PrefillConfig, prefill_attention_ref, prefill_attention_triton
from ccserve.kv.formats import kv_format
from tests.kernels.paged import paged_cache
from tests.kernels.quantized import fill_paged

SMALL_TILES = PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)


def random_pruned(num_blocks: int, num_kv_heads: int, block_size: int, share: float) -> torch.Tensor:
    """A random mask that never prunes a block's first token (so block 0's token 0, a sink, stays for every row)."""
    pruned = (torch.rand(num_blocks, num_kv_heads, block_size) < share).to(torch.uint8)
    pruned[:, :, 0] = 0
    return pruned


def decode_inputs(num_heads=4, num_kv_heads=2, head_dim=32, block_size=16):
    torch.manual_seed(0)
    seq_lens = [37, 0, 200, 1, 64]
    k, v, tables = paged_cache([max(n, 1) for n in seq_lens], num_kv_heads, block_size, head_dim,
                               torch.float32, torch.float32)
    q = torch.randn(len(seq_lens), num_heads, head_dim)
    return q, k, v, torch.tensor(seq_lens, dtype=torch.int32), tables


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_triton_honours_mask(num_splits):
    q, k, v, lens, tables = decode_inputs()
    pruned = random_pruned(k.shape[0], k.shape[1], k.shape[2], 0.5)
    pruned[tables[2, 2], 1, 1:] = 1      # a whole 16-token tile of sequence 2 gone for KV head 1 (block_n 16)
    expect = decode_attention_ref(q, k, v, lens, tables, 0.2, pruned=pruned)
    got = decode_attention_triton(q, k, v, lens, tables, 0.2, num_splits=num_splits, config=DecodeConfig(block_n=16),
                                  pruned=pruned)
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expect, decode_attention_ref(q, k, v, lens, tables, 0.2))


def test_prefill_triton_honours_mask():
    torch.manual_seed(0)
    chunks = [(37, 0), (20, 50), (1, 16), (33, 7)]
    seq_lens = [a + b for a, b in chunks]
    k, v, tables = paged_cache(seq_lens, 2, 16, 32, torch.float32, torch.float32)
    cu = torch.tensor([0] + [a for a, _ in chunks]).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), 4, 32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    pruned = random_pruned(k.shape[0], 2, 16, 0.4)
    pruned[tables[1, 1], 0, 1:] = 1       # most of a tile in the mask-free (pre-diagonal) loop
    expect = prefill_attention_ref(q, k, v, cu, lens, tables, 0.2, 37, pruned=pruned)
    got = prefill_attention_triton(q, k, v, cu, lens, tables, 0.2, 37, config=SMALL_TILES, pruned=pruned)
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)


def test_an_empty_mask_changes_nothing():
    q, k, v, lens, tables = decode_inputs()
    none = torch.zeros(k.shape[:3], dtype=torch.uint8)
    assert torch.equal(decode_attention_ref(q, k, v, lens, tables, 0.2, pruned=none),
                       decode_attention_ref(q, k, v, lens, tables, 0.2))
    got = decode_attention_triton(q, k, v, lens, tables, 0.2, num_splits=2, pruned=none)
    assert torch.equal(got, decode_attention_triton(q, k, v, lens, tables, 0.2, num_splits=2))


def test_a_pruned_token_is_invisible_to_its_head_only():
    """Changing a token's key and value changes nothing for the KV head that pruned it, and changes the other's."""
    q, k, v, lens, tables = decode_inputs()
    pruned = torch.zeros(k.shape[:3], dtype=torch.uint8)
    block, row = tables[2, 3], 5                       # sequence 2, position 53
    pruned[block, 0, row] = 1
    before = decode_attention_ref(q, k, v, lens, tables, 0.2, pruned=pruned)
    k[block, :, row] += 3.0
    v[block, :, row] -= 5.0
    after = decode_attention_ref(q, k, v, lens, tables, 0.2, pruned=pruned)
    triton = decode_attention_triton(q, k, v, lens, tables, 0.2, num_splits=1, pruned=pruned)
    assert torch.equal(after[2, :2], before[2, :2])         # query heads 0, 1 belong to KV head 0
    assert not torch.allclose(after[2, 2:], before[2, 2:])
    torch.testing.assert_close(triton, after, atol=1e-4, rtol=1e-4)


def test_importance_is_the_attention_mass_per_kv_head():
    """Each query's probabilities sum to 1 over what it sees: a KV head with G query heads gains G per query,
    nothing on pruned or padded tokens."""
    q, k, v, lens, tables = decode_inputs()
    pruned = random_pruned(k.shape[0], k.shape[1], k.shape[2], 0.3)
    importance = torch.zeros(k.shape[:3])
    decode_attention_ref(q, k, v, lens, tables, 0.2, pruned=pruned, importance=importance)
    live = torch.tensor([n > 0 for n in lens.tolist()]).sum()
    torch.testing.assert_close(importance.sum(dim=(0, 2)), torch.full((2,), 2.0 * live), atol=1e-4, rtol=0)
    assert importance[pruned != 0].abs().max() == 0

    torch.manual_seed(1)
    k, v, tables = paged_cache([40], 2, 16, 32, torch.float32, torch.float32)
    importance = torch.zeros(k.shape[:3])
    prefill_attention_ref(torch.randn(40, 4, 32), k, v, torch.tensor([0, 40], dtype=torch.int32),
                          torch.tensor([40], dtype=torch.int32), tables, 0.2, 40, importance=importance)
    torch.testing.assert_close(importance.sum(dim=(0, 2)), torch.full((2,), 2.0 * 40), atol=1e-3, rtol=0)


# ---- importance on the GPU path: the attention's log2-sum-exp, then a second pass over the keys ----------------

@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("sparse", [False, True])
def test_decode_importance_kernel_matches_the_reference(num_splits, sparse):
    """The Triton attention writes each head's log2-sum-exp; the importance kernel adds the same attention mass
    per token and KV head as the reference (on top of what was there), nothing on pruned or padded tokens."""
    q, k, v, lens, tables = decode_inputs()
    pruned = random_pruned(k.shape[0], k.shape[1], k.shape[2], 0.4) if sparse else None
    start = torch.rand(k.shape[:3])
    expect = start.clone()
    decode_attention_ref(q, k, v, lens, tables, 0.2, pruned=pruned, importance=expect)
    lse = torch.empty(q.shape[:2])
    got = start.clone()
    decode_attention_triton(q, k, v, lens, tables, 0.2, num_splits=num_splits, config=DecodeConfig(block_n=16),
                            pruned=pruned, lse=lse)
    add_decode_importance(q, k, lens, tables, 0.2, lse, got, pruned)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-4)
    assert torch.isinf(lse[1]).all()                      # the padding row (seq_len 0) saw nothing


@pytest.mark.parametrize("sparse", [False, True])
def test_prefill_importance_kernel_matches_the_reference(sparse):
    """Chunks with cached context (the causal cut inside and before the chunk), one query alone, GQA rows."""
    torch.manual_seed(2)
    chunks = [(37, 0), (20, 50), (1, 16), (33, 7)]
    seq_lens = [a + b for a, b in chunks]
    k, v, tables = paged_cache(seq_lens, 2, 16, 32, torch.float32, torch.float32)
    cu = torch.tensor([0] + [a for a, _ in chunks]).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), 4, 32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    pruned = random_pruned(k.shape[0], 2, 16, 0.4) if sparse else None
    expect = torch.zeros(k.shape[:3])
    prefill_attention_ref(q, k, v, cu, lens, tables, 0.2, 37, pruned=pruned, importance=expect)
    lse = torch.empty(q.shape[:2])
    prefill_attention_triton(q, k, v, cu, lens, tables, 0.2, 37, config=SMALL_TILES, pruned=pruned, lse=lse)
    got = torch.zeros(k.shape[:3])
    add_prefill_importance(q, k, cu, lens, tables, 0.2, lse, got, pruned)
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)
    assert got.sum() > 0


@pytest.mark.parametrize("name", ["fp8", "K8V4"])
def test_importance_kernels_on_quantized_keys(name):
    """Keys with one scale per token (fp8: the scores are scaled) and channel-grouped int8 keys (dequantized)."""
    torch.manual_seed(3)
    seq_lens = [40, 9, 70]
    k, v, tables = fill_paged(kv_format(name), seq_lens, 2, 16, 32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    q = torch.randn(3, 4, 32)
    expect = torch.zeros(k.data.shape[:3])
    decode_attention_ref(q, k, v, lens, tables, 0.2, importance=expect)
    lse = torch.empty(q.shape[:2])
    decode_attention_triton(q, k, v, lens, tables, 0.2, num_splits=2, lse=lse)
    got = torch.zeros_like(expect)
    add_decode_importance(q, k, lens, tables, 0.2, lse, got)
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-3)
