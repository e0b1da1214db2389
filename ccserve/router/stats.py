"""Aggregate counters: the only thing the relay, the gateway and the issuer record about requests.

The outcome names are fixed when a service starts; a count of anything else raises, so a mistake fails a test
instead of leaking something per request. No timestamps, addresses, sizes or identifiers are kept.
"""
from __future__ import annotations


class Stats:
    def __init__(self, outcomes: tuple[str, ...]) -> None:
        self._counts = dict.fromkeys(outcomes, 0)

    def count(self, outcome: str, n: int = 1) -> None:
        if outcome not in self._counts:
            raise KeyError(f"unregistered outcome {outcome!r}: add it to the service's OUTCOMES")
        self._counts[outcome] += n

    def snapshot(self) -> dict[str, int]:
        return dict(self._counts)
