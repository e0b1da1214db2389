"""What an engine's channels did, summed: bytes each way, predictions sealed ahead / used / relinquished, and the
host time the engine spent waiting on crypto. Aggregates only (issue 6's metrics): no per-transfer or per-request
detail exists here, so nothing of a request can reach /metrics through it."""
from __future__ import annotations

from dataclasses import dataclass, fields

from ccserve.secure.channel import Channel


@dataclass
class CryptoTotals:
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    speculated: int = 0         # transfers sealed ahead on a prediction (pipelined mode)
    speculation_hits: int = 0   # ... and used as predicted
    relinquished: int = 0       # ... and given up (bypassed, stale or forgotten); never an IV reused
    unpredicted: int = 0        # transfers that found no speculation and were sealed on demand
    wait_s: float = 0.0         # host time on the critical path: sealing on demand, waiting for a speculation,
                                # waiting for and opening device->host messages

    def add_channel(self, channel: Channel | None) -> None:
        """Add one channel's counters (None: a component without a channel, e.g. with --cc off)."""
        if channel is None:
            return
        s = channel.stats
        self.h2d_bytes += s.h2d_bytes
        self.d2h_bytes += s.d2h_bytes
        self.wait_s += s.seal_s + s.open_s
        if channel.pipeline is not None:
            p = channel.pipeline.stats
            self.speculated += p.speculated
            self.speculation_hits += p.hits
            self.relinquished += p.relinquished
            self.unpredicted += p.misses
            self.wait_s += p.wait_s

    def add(self, other: CryptoTotals) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
