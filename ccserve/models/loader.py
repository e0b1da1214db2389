"""Build a model from an HF-format directory: read config.json, construct the model directly on the target
device in the compute dtype, then fill it from the safetensors files (or with dummy values).

Under tensor parallelism every rank builds its share of the model and reads only its slice of each checkpoint
tensor that is split (layers/sharding.py, CheckpointTensor); tensors every rank holds whole are read whole."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from ccserve.config import EngineConfig
from ccserve.distributed.group import SINGLE, TensorParallelGroup
from ccserve.layers.linear import MergedLinear
from ccserve.layers.norm import RMSNorm
from ccserve.layers.sharding import Sharded, split
from ccserve.models.registry import get_model_class

DUMMY_RANGE = 1e-3  # vLLM's dummy weights: uniform in [-1e-3, 1e-3]


def load_model(config: EngineConfig, tp: TensorParallelGroup = SINGLE,
               device: torch.device | None = None) -> tuple[nn.Module, transformers.PretrainedConfig]:
    """The model (this rank's share of it under tensor parallelism), in eval mode on `device` (default
    config.torch_device), and its HF config."""
    hf_config = read_hf_config(config.model)
    model_class = get_model_class(hf_config)
    check_sliding_window(hf_config, config.max_model_len)
    check_tensor_parallel(hf_config, tp.size)
    dtype = config.torch_dtype(checkpoint_dtype(hf_config))
    # Parameters are created where they will live: an 8B model never passes through host memory.
    with _default_dtype(dtype), torch.device(device or config.torch_device):
        model = model_class(hf_config, tp)
    if config.load_format == "dummy":
        # Built on the host for a GPU (weight streaming): draw the values on the GPU, as a resident build does.
        on_host_for_gpu = device is not None and device.type == "cpu" and config.torch_device.type == "cuda"
        init_dummy_weights(model, config.seed, torch.device("cuda") if on_host_for_gpu else None)
    else:
        model.load_weights(iterate_safetensors(safetensors_files(config.model), lazy=tp.size > 1))
    return model.eval(), hf_config


def read_hf_config(model_dir: str) -> transformers.PretrainedConfig:
    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"model directory {model_dir!r} does not exist: pass an HF-format directory "
                         "(config.json, *.safetensors, tokenizer files)")
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {model_dir!r} has no config.json: pass an HF-format model directory")
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except ValueError as e:  # e.g. a model_type this transformers version does not know
        raise ValueError(f"config.json in {model_dir!r} could not be read by transformers: {e}") from e


def checkpoint_dtype(hf_config: transformers.PretrainedConfig) -> torch.dtype | None:
    """The dtype config.json declares (transformers 5 calls it dtype, older configs torch_dtype)."""
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def sliding_window(hf_config: transformers.PretrainedConfig) -> int | None:
    """The attention window of the model, or None when every layer sees the whole context. transformers 5
    lists per-layer attention kinds in layer_types (Qwen2/3); Mistral applies sliding_window to all layers."""
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return getattr(hf_config, "sliding_window", None)


def check_sliding_window(hf_config: transformers.PretrainedConfig, max_model_len: int | None) -> None:
    """Our attention is full causal attention; it equals sliding-window attention only while sequences fit
    in the window, so longer limits are refused rather than silently computed differently."""
    window = sliding_window(hf_config)
    max_len = max_model_len or hf_config.max_position_embeddings
    if window is not None and window < max_len:
        raise ValueError(f"{hf_config.architectures[0]} uses sliding-window attention (sliding_window={window} "
                         f"in config.json), which ccserve does not implement; pass max_model_len <= {window} "
                         "so that the window never slides")


def check_tensor_parallel(hf_config: transformers.PretrainedConfig, size: int) -> None:
    """Refuse a tensor-parallel size the model's shapes cannot be split by, before anything is allocated (the
    engine can call this before it starts any worker). Query heads and MLP features must divide; KV heads must
    divide or, when fewer than the ranks, divide the size (each is then replicated)."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    if size == 1:
        return
    split(hf_config.num_attention_heads, size, "the attention heads (num_attention_heads in config.json)")
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    if kv_heads >= size:
        split(kv_heads, size, "the key/value heads (num_key_value_heads in config.json)")
    elif size % kv_heads:
        raise ValueError(f"tensor_parallel_size {size} is larger than num_key_value_heads ({kv_heads}, "
                         "config.json) and not a multiple of it, so KV heads cannot be replicated evenly: choose "
                         f"a size that divides {kv_heads} or is a multiple of it")
    for name in ("intermediate_size", "ffn_dim"):
        if getattr(hf_config, name, None):
            split(getattr(hf_config, name), size, f"the MLP's {name} (config.json)")


def safetensors_files(model_dir: str) -> list[Path]:
    """The checkpoint's files: those its index names if it has one (repos may also hold consolidated
    copies under other names), else every *.safetensors."""
    path = Path(model_dir)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {model_dir!r} has no *.safetensors files; convert the checkpoint "
                         "to safetensors, or use load_format='dummy' for random weights")
    return files


def iterate_safetensors(files: list[Path], lazy: bool = False
                        ) -> Iterator[tuple[str, torch.Tensor | CheckpointTensor]]:
    """Every tensor of the checkpoint, read whole; lazy (tensor parallelism): not read yet, so that a rank
    reads only its slice of each split tensor (each item must be used before the next is drawn)."""
    for file in tqdm(files, desc="Loading safetensors", unit="file"):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, CheckpointTensor(f, name) if lazy else f.get_tensor(name)


class CheckpointTensor:
    """A checkpoint tensor not read yet: its shape, narrow() reads only the part asked for (safetensors
    get_slice), read() the whole. What a tensor-parallel layer's rank_slice needs, so host memory and disk reads
    per rank do not grow with the model's share that other ranks hold."""

    def __init__(self, file, name: str) -> None:
        self.file, self.name = file, name
        self.view = file.get_slice(name)
        self.shape = torch.Size(self.view.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self.view[(slice(None),) * dim + (slice(start, start + length),)]

    def read(self) -> torch.Tensor:
        return self.file.get_tensor(self.name)


@torch.no_grad()
def load_params(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                param_for: Callable[[str], tuple[str, int | None] | None]) -> None:
    """Copy checkpoint tensors into the model's parameters; the models' load_weights share this.

    param_for maps a checkpoint name to (parameter name, shard index within a MergedLinear, or None for the
    whole parameter), or to None for tensors the model does not use. Unknown names, wrong shapes and
    parameters the checkpoint never filled are errors: a silently half-loaded model produces fluent garbage.
    A tensor-parallel layer (Sharded) keeps only this rank's slice of each tensor.
    """
    params = dict(model.named_parameters())
    pending = {(name, shard) for name in params for shard in _shards(model, name)}
    for ckpt_name, tensor in weights:
        target = param_for(ckpt_name)
        if target is None:
            continue
        name, shard = target
        if name not in params:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} matches no parameter of {type(model).__name__}: "
                             "config.json's architectures does not fit these weights")
        owner = _owner(model, name)
        dest = params[name] if shard is None else owner.shard(params[name], shard)
        if isinstance(owner, Sharded) and owner.tp.size > 1:  # size 1: the whole tensor, as without TP
            try:
                tensor = owner.rank_slice(name.rpartition(".")[2], tensor, shard)
            except ValueError as e:
                raise ValueError(f"checkpoint tensor {ckpt_name!r} {e}") from e
        if isinstance(tensor, CheckpointTensor):  # not split (norms, replicated biases): read it whole
            tensor = tensor.read()
        if dest.shape != tensor.shape:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} has shape {tuple(tensor.shape)}, but "
                             f"{type(model).__name__} expects {tuple(dest.shape)}: config.json does not match "
                             "the weights")
        dest.copy_(tensor)
        pending -= {(name, s) for s in _shards(model, name)} if shard is None else {(name, shard)}
    if pending:
        missing = sorted(name if shard is None else f"{name} (part {shard + 1})" for name, shard in pending)
        raise ValueError(f"the checkpoint lacks {len(missing)} parameter(s) of {type(model).__name__}, e.g. "
                         f"{', '.join(missing[:5])}: it is incomplete or of another architecture "
                         "(use load_format='dummy' for random weights)")


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    return model.get_submodule(param_name.rpartition(".")[0])


def _shards(model: nn.Module, param_name: str) -> list[int | None]:
    owner = _owner(model, param_name)
    return list(range(len(owner.output_sizes))) if isinstance(owner, MergedLinear) else [None]


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int, draw_on: torch.device | None = None) -> None:
    """Deterministic random weights generated on the device (seconds for 8B on a GPU), for benchmarks that
    need the shapes but not the values. Norm scales are 1 and shifts 0, so activations keep a sane size.
    draw_on: draw the values there and copy them in (a model built on the host for a GPU: the CPU draws ~0.3 GB/s,
    minutes for a 30B model; the GPU gives the values a resident build would have)."""
    generator = None
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, (RMSNorm, nn.LayerNorm)):
                param.fill_(1.0 if name == "weight" else 0.0)
                continue
            where = draw_on or param.device
            if generator is None:
                generator = torch.Generator(where).manual_seed(seed)
            if where == param.device:
                param.uniform_(-DUMMY_RANGE, DUMMY_RANGE, generator=generator)
            else:
                drawn = torch.empty(param.shape, dtype=param.dtype, device=where)
                param.copy_(drawn.uniform_(-DUMMY_RANGE, DUMMY_RANGE, generator=generator))


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
