"""The routing policy: capacity-proportional, and blind to everything but the candidate nodes."""
import inspect
import random
from dataclasses import dataclass

import pytest

from ccserve.router.errors import NoHealthyNode
from ccserve.router.policy import Router
from ccserve.router.simulate import chi2_sf


@dataclass
class N:
    name: str
    capacity: int


def test_choice_is_proportional_to_capacity():
    nodes = [N("a", 1), N("b", 2), N("c", 7)]
    router, counts, n = Router(random.Random(5)), {"a": 0, "b": 0, "c": 0}, 50_000
    for _ in range(n):
        counts[router.choose(nodes).name] += 1
    stat = sum((counts[x.name] - n * x.capacity / 10) ** 2 / (n * x.capacity / 10) for x in nodes)
    assert chi2_sf(stat, 2) > 1e-3, counts


def test_default_draws_from_the_os_and_single_node_always_wins():
    router = Router()
    assert type(router._rng).__name__ == "SystemRandom"
    assert {router.choose([N("only", 3)]).name for _ in range(20)} == {"only"}
    with pytest.raises(NoHealthyNode):
        router.choose([])


def test_choose_takes_nothing_but_the_nodes():
    """The interface is the guarantee: if someone adds a parameter (user, token, size, session...), this fails."""
    assert list(inspect.signature(Router.choose).parameters) == ["self", "nodes"]
    assert list(inspect.signature(Router.__init__).parameters) == ["self", "rng"]


def test_chi2_sf_matches_tables():
    # 5% critical values of the chi-square distribution for 1..6 degrees of freedom
    for dof, critical in ((1, 3.841), (2, 5.991), (3, 7.815), (4, 9.488), (5, 11.070), (6, 12.592)):
        assert chi2_sf(critical, dof) == pytest.approx(0.05, abs=2e-4)
    assert chi2_sf(0, 3) == 1.0 and chi2_sf(1000, 1) < 1e-100
