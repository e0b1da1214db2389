"""Checks that a tensor-parallel group can work, run before any worker starts and before any GPU memory is
taken: the model's shapes split by the size, enough GPUs are visible, and each GPU has room for its share.

Why before: a group that fails later has spawned processes, joined a process group and loaded weights on every
GPU, and its error then arrives from one rank among N tracebacks. Here it is one sentence naming the flag.
"""
from __future__ import annotations

import torch
import transformers

from ccserve.config import EngineConfig
from ccserve.distributed.env import check_visible_gpus
from ccserve.kv.formats import kv_format
from ccserve.models.loader import check_tensor_parallel, checkpoint_dtype, read_hf_config
from ccserve.models.registry import get_model_class

GIB = 1 << 30


def check_tensor_parallel_setup(config: EngineConfig) -> None:
    """Raise ValueError naming --tensor-parallel-size and what to do, if the group cannot work."""
    size = config.tensor_parallel_size
    hf_config = read_hf_config(config.model)
    check_tensor_parallel(hf_config, size)
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    if config.kv_sparsity is not None and kv_heads % size:
        raise ValueError("--kv-sparsity shares each layer's budget over its KV heads, which this tensor-parallel "
                         "size replicates (fewer KV heads than GPUs): drop --kv-sparsity or choose a "
                         f"--tensor-parallel-size that divides num_key_value_heads ({kv_heads})")
    if config.torch_device.type != "cuda":
        return
    check_visible_gpus(size)
    # mem_get_info(i) opens a context on GPU i in this process; the workers' own contexts are on top of it.
    free = [torch.cuda.mem_get_info(i)[0] for i in range(size)]
    weights = weight_bytes(config, hf_config)
    if config.gpu_weight_budget_gb is not None:     # each rank streams what its budget does not hold
        weights = min(weights, int(config.gpu_weight_budget_gb * GIB) * size)
    check_fits(weights, kv_bytes_per_sequence(config, hf_config), size, free)


def check_fits(weights: int, kv_per_sequence: int, size: int, free: list[int]) -> None:
    """Each rank holds weights / size and, at least, its share of one max_model_len sequence of KV."""
    total = weights + kv_per_sequence
    for gpu, available in enumerate(free):
        if total / size > available:
            enough = -(-total // max(min(free), 1))
            raise ValueError(
                f"the model does not fit tensor_parallel_size {size}: each GPU needs about {total / size / GIB:.1f} "
                f"GiB (weights {weights / GIB:.1f} GiB and one sequence of KV cache {kv_per_sequence / GIB:.1f} GiB, "
                f"split {size} ways) but GPU {gpu} has {available / GIB:.1f} GiB free: raise --tensor-parallel-size "
                f"(at least {enough} such GPUs), lower --max-model-len, or free GPU memory")


def weight_bytes(config: EngineConfig, hf_config: transformers.PretrainedConfig) -> int:
    """The whole model's parameters in the compute dtype, counted on the meta device (no memory, no file read;
    the same for real and dummy weights)."""
    with torch.device("meta"):
        model = get_model_class(hf_config)(hf_config)
    itemsize = config.torch_dtype(checkpoint_dtype(hf_config)).itemsize
    return sum(p.numel() for p in model.parameters()) * itemsize


def kv_bytes_per_sequence(config: EngineConfig, hf_config: transformers.PretrainedConfig) -> int:
    """Keys and values of one max_model_len sequence in every layer, in the cache's format."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    max_len = config.max_model_len or getattr(hf_config, "max_position_embeddings", None) or 2048
    itemsize = config.torch_dtype(checkpoint_dtype(hf_config)).itemsize
    fmt = kv_format(config.kv_format).resolve(head_dim, config.block_size)
    per_token = fmt.bytes_per_token(head_dim, config.block_size, itemsize)
    return int(hf_config.num_hidden_layers * kv_heads * max_len * per_token)
