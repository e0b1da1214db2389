"""The routing policy: for every request, one node drawn at random in proportion to capacity.

This is what makes the service non-targetable (seed deck, section 4): if an attacker holds a subset T of the
nodes S, a user's request lands in T with probability sum C(T) / sum C(S), and nothing the user or the attacker
sends can change that. So `choose` takes the candidate nodes and nothing else: no user, token, content, size,
history or session; no stickiness, no priorities, no load feedback (load is the attacker's to create). The
draw comes from the operating system's CSPRNG, so nobody can predict which node the next request gets.
"""
from __future__ import annotations

import random
import secrets
from collections.abc import Sequence
from typing import Protocol, TypeVar

from ccserve.router.errors import NoHealthyNode


class Weighted(Protocol):
    capacity: int


N = TypeVar("N", bound=Weighted)


class Router:
    def __init__(self, rng: random.Random | None = None) -> None:
        """`rng` only for tests and simulations; by default secrets.SystemRandom (os.urandom)."""
        self._rng = rng if rng is not None else secrets.SystemRandom()

    def choose(self, nodes: Sequence[N]) -> N:
        """Node i with probability C(i) / sum C: an exact integer draw, no floating-point bias."""
        if not nodes:
            raise NoHealthyNode("no healthy, attested node is registered: start nodes or wait for their reports")
        x = self._rng.randrange(sum(node.capacity for node in nodes))
        for node in nodes:
            if x < node.capacity:
                return node
            x -= node.capacity
        raise AssertionError("unreachable: x < sum of capacities")
