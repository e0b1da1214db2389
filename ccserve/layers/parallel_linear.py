"""Megatron-style tensor-parallel linear layers.

A column-parallel layer splits its outputs across ranks (each rank computes some heads of q/k/v, or some
columns of gate/up), a row-parallel layer splits its inputs and sums the ranks' partial products with one
all-reduce. An attention block or an MLP is column then row, so it costs exactly one all-reduce. At size 1
every class here computes what its base class computes, with the same kernels and no collective.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ccserve.distributed.group import TensorParallelGroup
from ccserve.kernels.skinny_gemm import skinny_gemm_triton
from ccserve.layers.linear import Linear, MergedLinear
from ccserve.layers.sharding import Sharded, narrow_checked, split


class ColumnParallelLinear(Linear, Sharded):
    """y_r = x W_r^T + b_r: rank r keeps rows [r * out / size, (r + 1) * out / size) of W and b, and its output
    stays sharded (the following row-parallel layer consumes it as is)."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallelGroup, bias: bool = False,
                 what: str = "the output features") -> None:
        self.full_out = out_features
        super().__init__(in_features, split(out_features, tp.size, what), bias)
        self.tp = tp

    def rank_slice(self, param_name: str, tensor: torch.Tensor, shard: int | None) -> torch.Tensor:
        n = self.weight.shape[0]
        return narrow_checked(tensor, 0, self.full_out, self.tp.rank * n, n)

    def full_shape(self, shard: int | None) -> tuple[int, int]:
        return self.full_out, self.weight.shape[1]


class MergedColumnParallelLinear(MergedLinear, Sharded):
    """Several column-parallel projections of one input in one GEMM (gate/up): each projection is split
    across ranks on its own, so rank r holds gate_r and up_r side by side and SiluAndMul pairs them locally."""

    def __init__(self, in_features: int, output_sizes: list[int], tp: TensorParallelGroup, bias: bool = False,
                 what: str = "the output features") -> None:
        self.full_sizes = list(output_sizes)
        super().__init__(in_features, [split(n, tp.size, what) for n in output_sizes], bias)
        self.tp = tp

    def rank_slice(self, param_name: str, tensor: torch.Tensor, shard: int | None) -> torch.Tensor:
        n = self.output_sizes[shard]
        return narrow_checked(tensor, 0, self.full_sizes[shard], self.tp.rank * n, n)

    def full_shape(self, shard: int | None) -> tuple[int, int]:
        return self.full_sizes[shard], self.weight.shape[1]


class QKVParallelLinear(MergedLinear, Sharded):
    """q, k and v of attention, split by heads: rank r computes query heads [r * H / size, (r + 1) * H / size)
    and the key/value heads those queries read. With fewer KV heads than ranks (GQA at large TP, MQA), each KV
    head is replicated on the size / KV ranks whose query heads use it."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 tp: TensorParallelGroup, bias: bool = False) -> None:
        self.num_heads = split(num_heads, tp.size, "the attention heads (num_attention_heads)")
        self.num_kv_heads, self.kv_head_start = kv_heads_of_rank(num_kv_heads, tp)
        self.head_dim, self.full_heads = head_dim, [num_heads, num_kv_heads, num_kv_heads]
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        super().__init__(hidden_size, [q, kv, kv], bias)
        self.tp = tp

    def rank_slice(self, param_name: str, tensor: torch.Tensor, shard: int | None) -> torch.Tensor:
        d = self.head_dim
        first = self.tp.rank * self.num_heads if shard == 0 else self.kv_head_start
        return narrow_checked(tensor, 0, self.full_heads[shard] * d, first * d, self.output_sizes[shard])

    def full_shape(self, shard: int | None) -> tuple[int, int]:
        return self.full_heads[shard] * self.head_dim, self.weight.shape[1]


def kv_heads_of_rank(num_kv_heads: int, tp: TensorParallelGroup) -> tuple[int, int]:
    """(KV heads this rank keeps, index of its first): an equal share when the ranks divide the KV heads,
    else one head replicated on size / num_kv_heads consecutive ranks."""
    if num_kv_heads >= tp.size:
        n = split(num_kv_heads, tp.size, "the key/value heads (num_key_value_heads)")
        return n, tp.rank * n
    if tp.size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size {tp.size} is larger than num_key_value_heads ({num_kv_heads}) "
                         "and not a multiple of it, so KV heads cannot be replicated evenly: choose a size that "
                         f"divides {num_kv_heads} or is a multiple of it")
    return 1, tp.rank // (tp.size // num_kv_heads)


class RowParallelLinear(Linear, Sharded):
    """y = sum_r x_r W_r^T + b: rank r keeps columns [r * in / size, (r + 1) * in / size) of W and reads the
    matching slice of a column-parallel output; one all-reduce sums the partial products. The bias is
    replicated and added by rank 0 only, so the sum carries it once."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallelGroup, bias: bool = False,
                 what: str = "the input features") -> None:
        self.full_in = in_features
        super().__init__(split(in_features, tp.size, what), out_features, bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x)
        return self.tp.all_reduce(self.partial(x))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's addend of the sum (the bias on rank 0 only): what LoRA adds its own addend to before the
        all-reduce (layers/lora.py)."""
        bias = self.bias if self.tp.rank == 0 else None
        return skinny_gemm_triton(x, self.weight, bias) if self._skinny(x) else F.linear(x, self.weight, bias)

    def rank_slice(self, param_name: str, tensor: torch.Tensor, shard: int | None) -> torch.Tensor:
        if param_name == "bias":
            return tensor
        n = self.weight.shape[1]
        return narrow_checked(tensor, 1, self.full_in, self.tp.rank * n, n)

    def full_shape(self, shard: int | None) -> tuple[int, int]:
        return self.weight.shape[0], self.full_in
