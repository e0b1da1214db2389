"""One traffic class's encrypted channel across re-keys.

A channel that failed an integrity check stays closed: its lock-step IVs can no longer be trusted. Its owner (the
engine's step boundary, KV swap, LoRA adapter loads) replaces it with a fresh one (new keys, IVs from zero) and
carries on; the retired channels' counters still count in the totals (/metrics).
"""
from __future__ import annotations

from collections.abc import Callable

from ccserve.secure.channel import Channel
from ccserve.secure.totals import CryptoTotals


class RekeyingChannel:
    def __init__(self, open_channel: Callable[[], Channel]) -> None:
        """open_channel: makes a fresh channel of this traffic class (its mode, predictor, registered sources)."""
        self._open = open_channel
        self.channel = open_channel()
        self._retired = CryptoTotals()      # counters of channels closed by a re-key

    def reset_if_failed(self) -> None:
        """Replace the channel with a fresh one if it failed an integrity check."""
        if self.channel.failed:
            self._retired.add_channel(self.channel)
            self.channel.close()
            self.channel = self._open()

    def totals(self) -> CryptoTotals:
        """Crypto counters of this traffic class since start, closed channels included."""
        totals = CryptoTotals()
        totals.add(self._retired)
        totals.add_channel(self.channel)
        return totals

    def close(self) -> None:
        self.channel.close()
