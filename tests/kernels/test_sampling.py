"""The Gumbel-max sampling kernel against its reference (same counter-based noise, so the same tokens), and
the noise itself: uniform, independent across rows, keys and positions."""
import pytest
import torch

from ccserve.kernels.sampling import gumbel_ref, row_keys, sample_ref, sample_triton


@pytest.mark.parametrize("rows,vocab,dtype", [(5, 1000, torch.float32), (3, 4099, torch.bfloat16),
                                              (2, 70, torch.float16)])
def test_kernel_draws_the_reference_tokens(rows, vocab, dtype):
    torch.manual_seed(rows)
    logits = (2 * torch.randn(rows, vocab)).to(dtype)
    inv_t = 1 / (0.3 + torch.rand(rows))
    keys = row_keys(torch.randint(0, 2 ** 62, (rows,)), torch.randint(0, 5000, (rows,)))
    greedy = torch.zeros(rows, dtype=torch.bool)
    greedy[0] = True
    got = sample_triton(logits, inv_t, keys, greedy)
    expect = sample_ref(logits, inv_t, keys, greedy)
    assert torch.equal(got, expect)
    assert got[0] == logits[0].float().argmax()


def test_kernel_reads_strided_rows_and_masked_tokens():
    torch.manual_seed(1)
    wide = torch.randn(4, 300)
    logits = wide[:, :257]                       # row stride 300
    logits[1, 100:] = float("-inf")              # a filtered row: only its first 100 tokens may come out
    inv_t, keys = torch.ones(4), row_keys(torch.arange(4), torch.full((4,), 7))
    greedy = torch.zeros(4, dtype=torch.bool)
    got = sample_triton(logits, inv_t, keys, greedy)
    assert torch.equal(got, sample_ref(logits, inv_t, keys, greedy)) and got[1] < 100


def test_noise_is_gumbel_and_keys_separate_rows_and_positions():
    keys = row_keys(torch.tensor([5, 5, 6]), torch.tensor([0, 1, 0]))
    assert len({tuple(k.tolist()) for k in keys}) == 3
    g = gumbel_ref(keys, 200_000)
    u = torch.exp(-torch.exp(-g.double()))                       # back to the uniforms
    for row in u:
        hist = torch.histc(row, bins=20, min=0, max=1)
        expected = row.numel() / 20
        assert ((hist - expected) ** 2 / expected).sum() < 43.8   # chi2 0.999, 19 dof
    assert abs(torch.corrcoef(u)[0, 1]) < 0.01 and abs(torch.corrcoef(u)[0, 2]) < 0.01
