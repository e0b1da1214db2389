"""KV-cache formats: how keys and values are stored, each on its own (keys at more bits than values, as LeanKV
and KIVI found keys need), named for `--kv-format`.

Pure description, no torch: the config validates names with it and the cache sizes itself from it. The
layouts and the arithmetic live in kernels/kv_quant.py. Presets (KIVI's axes: keys in per-channel groups along
a block's tokens, values in per-token groups of channels):

    bf16   the model's dtype, unchanged (the default; the name is the GPU dtype, float32 runs on the CPU)
    fp8    e4m3 keys and values, one scale per token and head
    K8V8   int8 keys (per channel, one group per block), int8 values (per token, one group per head)
    K8V4   int8 keys (per channel), int4 values (per token, groups of 32 channels)
    K4V4   int4 keys (per channel), int4 values (per token, groups of 32)
    K4V2   int4 keys (per channel), int2 values (per token, groups of 32)

Scales and zero points are fp16 (4 bytes a group), stored in the same paged blocks, so a block id addresses
codes and scales alike, and the bytes per block (and so the blocks that fit) follow the format.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

FLAG = "--kv-format"


@dataclass(frozen=True)
class TensorFormat:
    """How one of K or V is stored. kind: "model" (the model's dtype), "fp8" (e4m3) or "int" (bits 8, 4, 2).
    axis: "token" (groups of `group` channels of one token) or "channel" (groups of `group` tokens of one
    channel within a block). group 0 means the whole head (token axis) or the whole block (channel axis)."""

    kind: str = "model"
    bits: int = 16
    axis: str = "token"
    group: int = 0

    def resolve(self, head_dim: int, block_size: int) -> TensorFormat:
        """The same format with group made concrete, or a ValueError naming what the model cannot use."""
        if self.kind == "model":
            return self
        group = self.group or (head_dim if self.axis == "token" else block_size)
        span, what = (head_dim, "head_dim") if self.axis == "token" else (block_size, "block_size")
        if group & (group - 1) or span % group:
            raise ValueError(f"{what} {span} cannot be split into {self.axis}-axis groups of {group}: the groups "
                             "must be a power of two that divides it")
        if self.kind == "int" and head_dim % (8 // self.bits):
            raise ValueError(f"head_dim {head_dim} cannot be packed {8 // self.bits} codes to a byte")
        return replace(self, group=group)

    def bytes_per_token(self, head_dim: int, block_size: int, model_itemsize: int) -> float:
        """Bytes one head of one token takes, scales included (the format must be resolved)."""
        if self.kind == "model":
            return head_dim * model_itemsize
        if self.kind == "fp8":
            return head_dim + 2 * head_dim / self.group
        # fp16 scale + zero: per `group` channels of each token, or per channel of each `group` tokens
        return head_dim * self.bits / 8 + 4 * head_dim / self.group

    def describe(self) -> str:
        if self.kind == "model":
            return "model dtype"
        name = "fp8 e4m3" if self.kind == "fp8" else f"int{self.bits}"
        unit = "channels" if self.axis == "token" else "tokens"
        return f"{name}, {self.axis} axis, groups of {self.group or 'all'} {unit}"


@dataclass(frozen=True)
class KVFormat:
    """A named pair of key and value formats."""

    name: str
    key: TensorFormat
    value: TensorFormat

    @property
    def quantized(self) -> bool:
        return self.key.kind != "model" or self.value.kind != "model"

    def resolve(self, head_dim: int, block_size: int) -> KVFormat:
        """Groups made concrete for this model, or a ValueError naming the flag and what to choose instead."""
        try:
            return replace(self, key=self.key.resolve(head_dim, block_size),
                           value=self.value.resolve(head_dim, block_size))
        except ValueError as e:
            raise ValueError(f"{FLAG} {self.name} does not fit this model: {e}; choose another format "
                             f"({', '.join(PRESETS)})") from None

    def bytes_per_token(self, head_dim: int, block_size: int, model_itemsize: int) -> float:
        """Bytes of K plus V of one token of one KV head of one layer."""
        return sum(f.bytes_per_token(head_dim, block_size, model_itemsize) for f in (self.key, self.value))


MODEL = TensorFormat()
_CHANNEL = dict(axis="channel")
PRESETS: dict[str, KVFormat] = {
    "bf16": KVFormat("bf16", MODEL, MODEL),
    "fp8": KVFormat("fp8", TensorFormat("fp8", 8), TensorFormat("fp8", 8)),
    "K8V8": KVFormat("K8V8", TensorFormat("int", 8, **_CHANNEL), TensorFormat("int", 8)),
    "K8V4": KVFormat("K8V4", TensorFormat("int", 8, **_CHANNEL), TensorFormat("int", 4, group=32)),
    "K4V4": KVFormat("K4V4", TensorFormat("int", 4, **_CHANNEL), TensorFormat("int", 4, group=32)),
    "K4V2": KVFormat("K4V2", TensorFormat("int", 4, **_CHANNEL), TensorFormat("int", 2, group=32)),
}


def kv_format(name: str) -> KVFormat:
    """The preset of that name, or a ValueError naming the flag and the choices."""
    if name not in PRESETS:
        raise ValueError(f"unknown {FLAG} {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
