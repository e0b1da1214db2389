import pytest
import torch

from ccserve.layers.sampler import Sampler, SamplingBatch
from ccserve.sampling_params import SamplingParams

sampler = Sampler()


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: torch.Tensor | None = None):
    batch = SamplingBatch.build(params, "cpu")
    return sampler(logits, batch, torch.zeros(len(params), dtype=torch.int64) if positions is None else positions)


def draws(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """n independent samples of one row, as one batch of n identical rows (each row its own random key)."""
    torch.manual_seed(seed)
    return sample(logits_row.expand(n, -1).contiguous(), [params] * n).token_ids


def test_greedy_is_argmax_with_lowest_id_on_ties():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    logits[2, [7, 30]] = 100.0
    out = sample(logits, [SamplingParams(temperature=0)] * 6)
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits.argmax(-1)) and out.token_ids[2] == 7
    assert out.logprobs is None and out.top_ids is None


def test_all_greedy_batch_skips_the_random_path():
    batch = SamplingBatch.build([SamplingParams(temperature=0)] * 3, "cpu")
    assert batch.all_greedy and not (batch.need_top_k or batch.need_top_p or batch.need_min_p)
    assert batch.max_logprobs is None


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    observed = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    return ((observed - expected) ** 2 / expected).sum().item()


def test_temperature_sampling_matches_softmax():
    """Chi-square goodness of fit over 8 tokens. With fixed seeds the statistic is a fixed number; the bound
    (chi2 0.999 quantile for 7 degrees of freedom is 24.3) would only fail if the distribution were wrong."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    for temperature in (1.0, 0.7):
        tokens = draws(logits, SamplingParams(temperature=temperature), 200_000)
        assert chi_square(tokens, torch.softmax(logits / temperature, -1)) < 24.3, temperature


def test_filtered_sampling_matches_renormalized_softmax():
    """Top-k 3 of the same logits: the three survivors keep their relative odds (chi2 0.999, 2 dof: 13.8)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    tokens = draws(logits, SamplingParams(temperature=0.8, top_k=3), 100_000)
    kept = torch.tensor([0, 6, 1])
    assert set(tokens.tolist()) == set(kept.tolist())
    remapped = torch.searchsorted(kept.sort().values, tokens)
    assert chi_square(remapped, torch.softmax(logits[kept.sort().values] / 0.8, -1)) < 13.8


def test_top_k_never_leaves_the_top_k():
    torch.manual_seed(1)
    logits = torch.randn(64, 100)
    out = sample(logits, [SamplingParams(top_k=5, temperature=2.0)] * 64).token_ids
    top5 = logits.topk(5, dim=-1).indices
    assert (top5 == out.unsqueeze(1)).any(dim=1).all()
    tokens = draws(logits[0], SamplingParams(top_k=5, temperature=2.0), 20_000)
    assert set(tokens.tolist()) == set(top5[0].tolist())


def test_top_k_larger_than_vocab_is_no_filter():
    logits = torch.zeros(4)
    tokens = draws(logits, SamplingParams(top_k=50), 2_000)
    assert set(tokens.tolist()) == {0, 1, 2, 3}


def test_top_p_keeps_the_minimal_nucleus():
    # probs 0.5, 0.25, 0.15, 0.1: top_p 0.5 is reached by {0}; 0.7 and 0.74 need {0, 1}; 0.76 needs {0, 1, 2}.
    logits = torch.tensor([0.5, 0.25, 0.15, 0.1]).log()
    cases = {0.5: {0}, 0.7: {0, 1}, 0.74: {0, 1}, 0.76: {0, 1, 2}, 1.0: {0, 1, 2, 3}}
    for top_p, nucleus in cases.items():
        tokens = draws(logits, SamplingParams(top_p=top_p), 5_000)
        assert set(tokens.tolist()) == nucleus, top_p
    # Never empty: the top token survives even a top_p so small that 1 - top_p rounds to 1 in float32.
    tiny = draws(logits[[3, 1, 0, 2]], SamplingParams(top_p=1e-9), 500)
    assert set(tiny.tolist()) == {2}


def test_top_p_and_top_k_together():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    tokens = draws(logits, SamplingParams(top_k=3, top_p=0.8), 5_000)
    # top-k keeps {0, 1, 2} renormalized to 4/9, 3/9, 2/9: the nucleus of 0.8 is all three.
    assert set(tokens.tolist()) == {0, 1, 2}
    tokens = draws(logits, SamplingParams(top_k=3, top_p=0.7), 5_000)
    assert set(tokens.tolist()) == {0, 1}


def test_min_p_drops_tokens_below_the_fraction_of_the_top():
    logits = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]).log()
    tokens = draws(logits, SamplingParams(min_p=0.15), 5_000)  # floor 0.075: keeps 0.5, 0.3, 0.1
    assert set(tokens.tolist()) == {0, 1, 2}


def test_seeded_request_is_reproducible_alone_and_in_any_batch():
    """A seeded row's draw depends on its seed and the position it samples at, never on its neighbours."""
    torch.manual_seed(3)
    row = torch.randn(1000)
    seeded = SamplingParams(temperature=1.3, top_p=0.95, seed=7)

    def run(others_before: int, others_after: int, steps: int = 20) -> list[int]:
        params = [SamplingParams(top_k=20)] * others_before + [seeded] + [SamplingParams()] * others_after
        picked = []
        for step in range(steps):
            logits = torch.randn(len(params), 1000)
            logits[others_before] = row
            positions = torch.randint(0, 500, (len(params),))
            positions[others_before] = 100 + step
            picked.append(sample(logits, params, positions).token_ids[others_before].item())
        return picked

    alone = run(0, 0)
    assert run(3, 2) == alone and run(0, 5) == alone and run(6, 0) == alone
    assert len(set(alone)) > 1  # it does sample
    other_seed = SamplingParams(temperature=1.3, top_p=0.95, seed=8)
    assert [sample(row[None], [other_seed], torch.tensor([100 + i])).token_ids.item() for i in range(20)] != alone


def test_logprobs_are_log_softmax_of_raw_logits():
    torch.manual_seed(4)
    logits = torch.randn(3, 40)
    params = [SamplingParams(temperature=0.5, logprobs=2), SamplingParams(temperature=0, logprobs=5),
              SamplingParams(top_k=3)]
    out = sample(logits, params)
    expected = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, expected.gather(1, out.token_ids[:, None]).squeeze(1))
    top = expected.topk(5, dim=-1)
    assert out.top_ids.shape == (3, 5)
    assert torch.equal(out.top_ids, top.indices) and torch.allclose(out.top_logprobs, top.values)


def test_logprobs_zero_gives_only_the_sampled_token():
    out = sample(torch.randn(2, 10), [SamplingParams(logprobs=0), SamplingParams()])
    assert out.logprobs.shape == (2,) and out.top_ids is None and out.top_logprobs is None


def test_mixed_greedy_and_sampled_batch():
    torch.manual_seed(5)
    logits = torch.randn(8, 30)
    params = [SamplingParams(temperature=0) if i % 2 == 0 else SamplingParams(temperature=1.0, top_k=2)
              for i in range(8)]
    batch = SamplingBatch.build(params, "cpu")
    assert not batch.all_greedy and batch.need_top_k
    tokens = sampler(logits, batch, torch.arange(8)).token_ids
    assert torch.equal(tokens[0::2], logits[0::2].argmax(-1))
    top2 = logits[1::2].topk(2, dim=-1).indices
    assert (top2 == tokens[1::2, None]).any(dim=1).all()


def test_sampler_leaves_logits_untouched():
    logits = torch.randn(4, 20)
    before = logits.clone()
    sample(logits, [SamplingParams(top_k=3, top_p=0.5, min_p=0.1, temperature=0.3)] * 4)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(top_k=4, top_p=0.9, min_p=0.05)])
def test_sampler_never_reads_tensors_on_the_host(params, monkeypatch):
    """No .item()/.tolist()/bool() on a tensor inside the sampler: such calls would synchronize the GPU."""
    batch = SamplingBatch.build([params, SamplingParams(temperature=0, logprobs=3)], "cpu")
    logits = torch.randn(2, 50)
    positions = torch.tensor([3, 9])
    for name in ("item", "tolist", "__bool__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("host read inside the sampler"))
    out = sampler(logits, batch, positions)
    monkeypatch.undo()
    assert out.token_ids.shape == (2,)
