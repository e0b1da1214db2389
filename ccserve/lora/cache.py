"""The GPU adapter cache: `max_loras` slots of the LoRA weight stacks, filled from host memory, least recently
used out first.

Each adapter crosses the GPU boundary as ONE message: all its A and B matrices packed in a fixed order into one
host buffer at start. With --cc naive or pipelined that message goes through an encrypted channel of its own
(AES-GCM, authenticated: a tampered adapter raises IntegrityError and is never used), with a SchedulePredictor:
after each schedule the engine says which adapters the waiting queue needs next (`prefetch`), and pipelined mode
seals them ahead on worker threads. One channel per traffic class, as docs/secure.md says: the step channel's
FIFO predictor and this schedule never disturb each other.

Counters are aggregates (loads, hits); nothing here knows which request uses an adapter.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ccserve.layers.lora import LoraTarget
from ccserve.lora.adapter import LoraAdapter
from ccserve.secure import Channel, Schedule, SchedulePredictor
from ccserve.secure.rekeying import RekeyingChannel
from ccserve.secure.totals import CryptoTotals


class AdapterCache:
    def __init__(self, adapters: list[LoraAdapter], targets: dict[str, LoraTarget], device: torch.device,
                 cc: str, threads: int) -> None:
        self.targets, self.device = targets, device
        self.cc, self.threads = cc, threads
        self.num_slots = next(iter(targets.values())).a.shape[0]
        self.resident: OrderedDict[str, int] = OrderedDict()     # name -> slot, least recently used first
        # Only the packed copy stays on the host (the per-module tensors are dropped with the adapters).
        self.packed = {a.name: _pack(a, targets) for a in adapters}
        self.layouts = {a.name: [(m, *(t.shape for t in a.weights[m])) for m in targets if m in a.weights]
                        for a in adapters}
        self._channels = RekeyingChannel(self._new_channel) if cc != "off" else None
        self.loads = 0
        self.hits = 0

    def _new_channel(self) -> Channel:
        """A fresh channel (new keys, IVs from zero) with every adapter's host buffer registered under its name."""
        channel = Channel(self.device, mode=self.cc, threads=self.threads, predictor=SchedulePredictor())
        for name, buffer in self.packed.items():
            channel.register(buffer, key=_key(name))
        return channel

    @property
    def channel(self) -> Channel | None:
        """The adapter channel in use (None with --cc off)."""
        return None if self._channels is None else self._channels.channel

    def close(self) -> None:
        """Zeroize the adapter channel's keys and stop its workers (the engine is closing)."""
        if self._channels is not None:
            self._channels.close()

    def slot(self, name: str | None) -> int:
        """The slot a resident adapter occupies; -1 for no adapter."""
        return -1 if name is None else self.resident[name]

    def activate(self, names: set[str]) -> None:
        """Make every adapter of the next batch resident (at most num_slots of them: the scheduler's limit),
        evicting the least recently used others. Raises IntegrityError if an adapter's message was altered."""
        for name in sorted(names & self.resident.keys()):
            self.resident.move_to_end(name)
            self.hits += 1
        for name in sorted(names - self.resident.keys()):
            self._load(name, self._free_slot(names))

    def prefetch(self, upcoming: list[str]) -> None:
        """The adapters the waiting queue needs next, soonest first: pipelined mode seals those not resident
        ahead (the schedule replaces the previous one)."""
        if self.channel is not None and self.channel.pipeline is not None:
            self.channel.hint(Schedule(tuple(_key(n) for n in upcoming if n not in self.resident)))

    def reset_if_failed(self) -> None:
        """Re-key after an integrity failure. The adapter whose message failed was never marked resident, so its
        next use loads it again."""
        if self._channels is not None:
            self._channels.reset_if_failed()

    def totals(self) -> CryptoTotals:
        """Crypto counters of adapter loads since start (closed channels included)."""
        return CryptoTotals() if self._channels is None else self._channels.totals()

    def _free_slot(self, keep: set[str]) -> int:
        used = set(self.resident.values())
        free = [s for s in range(self.num_slots) if s not in used]
        if free:
            return free[0]
        victim = next((n for n in self.resident if n not in keep), None)
        if victim is None:
            raise RuntimeError(f"a batch needs more than {self.num_slots} adapters (--max-loras): scheduler bug")
        return self.resident.pop(victim)

    def _load(self, name: str, slot: int) -> None:
        """One transfer of the adapter's packed buffer, then copies into its slot of every stack."""
        buffer = self.packed[name]
        if self.channel is not None:
            data = self.channel.to_device(buffer, key=_key(name))
        else:
            data = buffer.to(self.device, non_blocking=buffer.is_pinned())
        for target in self.targets.values():
            target.a[slot].zero_()
            target.b[slot].zero_()
        offset = 0
        for module, a_shape, b_shape in self.layouts[name]:
            target = self.targets[module]
            target.a[slot, :a_shape[0]].copy_(data[offset:offset + a_shape.numel()].view(a_shape))
            offset += a_shape.numel()
            target.b[slot, :, :b_shape[1]].copy_(data[offset:offset + b_shape.numel()].view(b_shape))
            offset += b_shape.numel()
        self.resident[name] = slot
        self.loads += 1


def _key(name: str) -> tuple[str, str]:
    return ("lora", name)


def _pack(adapter: LoraAdapter, targets: dict[str, LoraTarget]) -> torch.Tensor:
    """All of an adapter's matrices in one flat host tensor, in the order of `targets` (A then B for each)."""
    parts = [t.reshape(-1) for module in targets if module in adapter.weights for t in adapter.weights[module]]
    flat = torch.cat(parts)
    return flat.pin_memory() if torch.cuda.is_available() else flat
