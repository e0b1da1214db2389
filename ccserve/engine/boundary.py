"""The GPU boundary of one engine: every host<->device transfer the runner makes per step crosses here.

With --cc off it is a plain pinned copy per array, exactly as before (no packing, no extra work). With --cc naive
or pipelined the step's host-built arrays (token ids, positions, slot mapping, block tables, sequence lengths,
sampling settings) are packed into ONE byte message, sealed by the encrypted channel (ccserve.secure) and
verified on the device before anything reads it; the sampled tokens come back as ONE sealed message per step or
decode window. Why one message: each message costs a GCM setup and a tag on both ends and an IV, so packing
keeps the per-step cost to one small seal each way (docs/cc.md has the formats).
"""
from __future__ import annotations

import numpy as np
import torch

from ccserve.config import EngineConfig
from ccserve.secure import Channel, PendingHost
from ccserve.secure.rekeying import RekeyingChannel
from ccserve.secure.totals import CryptoTotals

STEP_KEY = ("step",)
# Every array starts at a multiple of 16 bytes: int64 / float32 views of the message are legal, and the kernels that
# read them see the alignment Triton specializes on, as with separate allocations. At 8 bytes, arrays sat off a
# 16-byte boundary whenever the sizes before them changed (A-mixed: every few steps), and each such pattern compiled
# new variants of the attention and sampling kernels in the middle of serving.
ALIGN = 16


class Boundary:
    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        self.config, self.device = config, device
        self._channels = RekeyingChannel(self._new_channel) if config.cc != "off" else None
        if self._channels is not None:
            self._warm_up()

    def _warm_up(self) -> None:
        """One small message each way now: the GPU kernels of both directions compile (seconds each on a fresh
        machine) while the engine starts, not inside a request's step."""
        self.to_host(self.to_device([np.zeros(16, dtype=np.uint8)])[0])

    @property
    def channel(self) -> Channel | None:
        """The step channel in use (None with --cc off)."""
        return None if self._channels is None else self._channels.channel

    @property
    def cc(self) -> bool:
        return self._channels is not None

    def _new_channel(self) -> Channel:
        """Fresh session keys and IV streams. Nothing to predict: step messages exist only when they are sent (KV
        swap has a channel of its own, engine/swapper.py)."""
        return Channel(self.device, mode=self.config.cc, threads=self.config.cc_threads)

    def reset_if_failed(self) -> None:
        """Re-key after an integrity failure, so that the requests not in the failed message continue."""
        if self._channels is not None:
            self._channels.reset_if_failed()

    def totals(self) -> CryptoTotals:
        """Crypto counters of this boundary (step messages, sampled tokens) since the engine started."""
        return CryptoTotals() if self._channels is None else self._channels.totals()

    def to_device(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """The step's host arrays on the device: one copy each (cc off), or one authenticated message (cc)."""
        if self.channel is None:
            return [_to(a, self.device) for a in arrays]
        arrays = [np.ascontiguousarray(a) for a in arrays]
        layout, parts, offset = [], [], 0
        for a in arrays:
            raw = a.reshape(-1).view(np.uint8)
            layout.append((offset, raw.size, torch.from_numpy(a[:0].reshape(-1)).dtype, a.shape))
            parts.append(raw)
            pad = -raw.size % ALIGN
            if pad:
                parts.append(np.zeros(pad, dtype=np.uint8))
            offset += raw.size + pad
        # One fixed transfer name: the channel remembers sources by name, and step buffers are never predicted.
        message = self.channel.to_device(torch.from_numpy(np.concatenate(parts)), key=STEP_KEY)
        return [message[o:o + n].view(dtype).view(shape) for o, n, dtype, shape in layout]

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A device tensor on the host now (one message under cc); with cc off the tensor itself, whose
        .tolist() copies it as before."""
        if self.channel is None:
            return tensor
        return self.channel.to_host_async(tensor).result()

    def to_host_async(self, tensor: torch.Tensor) -> PendingHost:
        """Start a device->host message; only its result() waits (cc mode only)."""
        return self.channel.to_host_async(tensor)

    def close(self) -> None:
        if self._channels is not None:
            self._channels.close()


def _to(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor
