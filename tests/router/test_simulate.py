"""Non-targetability, measured (issue 9): 10^5 target requests over nodes of unequal capacity, an attacker
holding T and playing with timing, size, content and adaptive sending; every T lands within 1% of
sum C(T) / sum C(S), and a chi-square test does not reject it."""
from ccserve.router import simulate


def test_share_in_every_attacker_subset_matches_capacity(capsys):
    rows = simulate.simulate(n_target=100_000, seed=2024)
    print(simulate.table(rows))
    assert len(rows) == 6 and rows[0].attacker_requests > 100_000
    for row in rows:
        assert abs(row.observed - row.expected) < 0.01, row
        assert row.p_value > 1e-3, row
    expected = {r.subset: r.expected for r in rows}
    assert expected[("n7",)] == 400 / 930 and expected[("n0",)] == 10 / 930
    assert "expected" in capsys.readouterr().out


def test_a_biased_router_would_be_caught():
    """The measurement can fail: a router that sends 2% more traffic to the biggest node is rejected."""
    n, expected = 100_000, 400 / 930
    stat, p = simulate.chi2_share(round(n * (expected + 0.02)), n, expected)
    assert p < 1e-6


def test_cli_prints_the_table(capsys):
    simulate.main(["--requests", "2000", "--seed", "1"])
    out = capsys.readouterr().out
    assert "{n7}" in out and "expected" in out and "observed" in out
