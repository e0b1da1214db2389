"""What the launch heuristics of several kernels need to know about the device."""
from __future__ import annotations

import functools

import torch


@functools.cache
def num_sms(device: torch.device) -> int:
    """SMs of the device (cached: heuristics ask on every launch); the interpreter on the CPU gets a few."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
