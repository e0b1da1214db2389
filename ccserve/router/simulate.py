"""Non-targetability, measured: does a target user's request land on an attacker's nodes T with probability
sum C(T) / sum C(S), and no more, whatever the attacker does with its own requests?

The simulation drives the gateway's real routing step, `Router.choose(NodeRegistry.healthy())`, over nodes that
registered with real signed reports. The attacker sends its own requests interleaved with the target's, choosing
their timing (bursts right before each target request), size (1 byte to 8 MiB), content (copies of the
target's), and adapting to what it observes: it keeps sending until its own last request landed outside the T it
aims at (each subset tried, in turn), betting that the next draw (the target's) is then more likely to fall in T.
The target's requests vary in size and content too. None of it can matter, because nothing of a request
reaches the draw; the table shows it for every T: expected share, observed share, and a chi-square test.

    python -m ccserve.router.simulate [--requests 100000] [--seed N]
"""
from __future__ import annotations

import argparse
import math
import os
import random
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ccserve.attest.evidence import signing_context
from ccserve.router.attestation import AcceptUnattested
from ccserve.router.nodes import NodeRegistry, NodeReport, sign_report
from ccserve.router.policy import Router

CAPACITIES = (10, 20, 30, 50, 80, 130, 210, 400)     # unequal on purpose: sum 930
SIZES = (1, 300, 4096, 65536, 8 << 20)


@dataclass(frozen=True)
class SimRequest:
    """What a request could carry to a router that looked (ours does not): sender, size, content, time."""
    sender: str
    size: int
    content: bytes
    at: float


@dataclass
class Row:
    subset: tuple[str, ...]
    expected: float
    observed: float
    chi2: float
    p_value: float
    target_requests: int
    attacker_requests: int


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for a chi-square variable with `dof` degrees of freedom (closed forms for integer dof)."""
    if x <= 0:
        return 1.0
    half = x / 2
    if dof % 2 == 0:
        term, total = 1.0, 1.0
        for i in range(1, dof // 2):
            term *= half / i
            total += term
        return math.exp(-half) * total
    total = math.erfc(math.sqrt(half))
    for i in range(1, (dof - 1) // 2 + 1):
        total += math.exp((i - 0.5) * math.log(half) - half - math.lgamma(i + 0.5))
    return total


def chi2_share(hits: int, n: int, p: float) -> tuple[float, float]:
    """Chi-square statistic and p-value of `hits` in T out of `n`, against probability `p` (1 dof)."""
    expected_in, expected_out = n * p, n * (1 - p)
    stat = (hits - expected_in) ** 2 / expected_in + (n - hits - expected_out) ** 2 / expected_out
    return stat, chi2_sf(stat, 1)


class SimulatedNode:
    """A node's report signer with a given key (a seeded run needs the same keys, which order the nodes, every
    time; a real node's keys come from ccserve.attest.NodeIdentity). Signs exactly as NodeIdentity does."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.signing_public_key = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, context: str, message: bytes) -> bytes:
        return self._key.sign(signing_context(context) + message)


def build_registry(capacities: tuple[int, ...] = CAPACITIES, max_capacity: int = 1000,
                   rng: random.Random | None = None) -> NodeRegistry:
    """A registry of len(capacities) nodes named n0, n1, ... that registered with genuine signed reports (keys
    from `rng` when given, so that a seeded run orders the nodes, and so maps its draws, the same way)."""
    registry = NodeRegistry(AcceptUnattested().is_attested, max_capacity=max_capacity, report_ttl=1e9)
    for i, capacity in enumerate(capacities):
        key = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)) if rng else Ed25519PrivateKey.generate()
        node = SimulatedNode(key)
        report = NodeReport(f"http://n{i}.invalid", capacity, os.urandom(32), node.signing_public_key, time.time())
        registry.register(sign_report(report, node))
    return registry


def node_names(registry: NodeRegistry) -> dict[str, str]:
    """node_id -> n<i>, from each node's URL."""
    return {n.node_id: n.url.split("//")[1].split(".")[0] for n in registry.healthy()}


def simulate(n_target: int = 100_000, seed: int | None = None, capacities: tuple[int, ...] = CAPACITIES,
             subsets: list[set[str]] | None = None) -> list[Row]:
    """One row per attacker subset T, from one run of `n_target` target requests, each preceded by one of the
    attacker's moves (in turn: none, a burst, a copy, adaptive sending aimed at each T in turn). `seed` makes
    the draws reproducible (tests); None draws from the OS CSPRNG, as the gateway does."""
    rng = random.Random(f"attacker-{seed}")          # the requests' own randomness, apart from the router's
    registry = build_registry(capacities, rng=rng if seed is not None else None)
    router = Router(random.Random(f"router-{seed}") if seed is not None else None)
    names = node_names(registry)
    subsets = subsets or default_subsets(registry)

    def route(request: SimRequest) -> str:
        # The gateway's routing step, exactly: the request is in scope here, and nothing reads it.
        return names[router.choose(registry.healthy()).node_id]

    hits, attacker, clock = [0] * len(subsets), 0, 0.0
    for i in range(n_target):
        move, aimed = i % 4, subsets[(i // 4) % len(subsets)]
        target = SimRequest("target", rng.choice(SIZES), rng.randbytes(16), clock)
        if move == 1:      # timing: a burst right before the target's request
            for _ in range(rng.randint(1, 5)):
                route(SimRequest("attacker", rng.choice(SIZES), rng.randbytes(16), clock))
                attacker += 1
        elif move == 2:    # content and size: an exact copy of the target's request, just before it
            route(SimRequest("attacker", target.size, target.content, clock))
            attacker += 1
        elif move == 3:    # adaptive: send until its own request lands outside T (at most 10 tries)
            for _ in range(10):
                attacker += 1
                if route(SimRequest("attacker", 1, b"", clock)) not in aimed:
                    break
        landed = route(target)
        for j, subset in enumerate(subsets):
            hits[j] += landed in subset
        clock += rng.expovariate(100.0)

    total = sum(n.capacity for n in registry.healthy())
    rows = []
    for subset, h in zip(subsets, hits):
        expected = sum(n.capacity for n in registry.healthy() if names[n.node_id] in subset) / total
        stat, p = chi2_share(h, n_target, expected)
        rows.append(Row(tuple(sorted(subset, key=lambda s: int(s[1:]))), expected, h / n_target, stat, p,
                        n_target, attacker))
    return rows


def default_subsets(registry: NodeRegistry) -> list[set[str]]:
    names = sorted(node_names(registry).values(), key=lambda s: int(s[1:]))
    return [{names[0]}, {names[-1]}, set(names[-2:]), set(names[:4]), set(names[::2]), set(names[1:])]


def table(rows: list[Row]) -> str:
    lines = [f"{'T':<26} {'expected':>9} {'observed':>9} {'diff':>8} {'chi2':>7} {'p':>6}"]
    for r in rows:
        lines.append(f"{'{' + ','.join(r.subset) + '}':<26} {r.expected:>9.4f} {r.observed:>9.4f} "
                     f"{r.observed - r.expected:>+8.4f} {r.chi2:>7.2f} {r.p_value:>6.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ccserve.router.simulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000, help="target requests")
    parser.add_argument("--seed", type=int, default=None, help="reproducible draws (default: OS CSPRNG)")
    args = parser.parse_args(argv)
    print(f"nodes n0..n{len(CAPACITIES) - 1}, capacities {CAPACITIES} (sum {sum(CAPACITIES)})")
    rows = simulate(args.requests, args.seed)
    print(f"{rows[0].target_requests} target requests, {rows[0].attacker_requests} attacker requests interleaved")
    print(table(rows))


if __name__ == "__main__":
    main()
