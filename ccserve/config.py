"""One place for engine settings, validated before anything is allocated."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ccserve.kv.formats import kv_format as _kv_format
from ccserve.kv.sparsity import IMPORTANCE_MODES

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PRIVACY_POLICIES = ("pcc", "open")
LOG_LEVELS = ("debug", "info", "warning", "error")
CC_MODES = ("off", "naive", "pipelined")
PREEMPTION_MODES = ("recompute", "swap", "auto")
TP_ALL_REDUCES = ("nccl", "peer")


@dataclass
class EngineConfig:
    """Settings of one engine instance (one model on one device).

    max_model_len None takes the model's max_position_embeddings. num_decode_steps > 1 lets a batch of pure
    decodes run that many steps on the device per host round trip (the sampled token feeds the next step on
    the GPU), when no waiting request could be admitted; it amortizes the host's per-step work. num_gpu_blocks fixes the KV cache size
    instead of profiling (tests use it to force preemption). dtype "auto" is the checkpoint's dtype on a GPU
    and float32 on the CPU, where bf16 matmuls are slow and tests compare against float32 references.
    privacy names the policy the settings are judged by (ccserve/privacy/): "pcc" refuses settings that
    break a Private Cloud Compute rule, "open" allows them and `ccserve audit` reports the threat.
    kv_format names how keys and values are stored (ccserve/kv/formats.py): "bf16" is the model's dtype.
    kv_sparsity R (docs/kv.md) keeps about R of each request's cached tokens per layer, shared unequally by its KV
    heads by importance; the first kv_sink_tokens and the last kv_recent_window tokens are always kept;
    kv_importance picks the score: "accumulated" (LeanKV/H2O: mean attention over every query so far) or "window"
    (SnapKV-style: the latest step's queries only). None (the default) keeps every token.
    cc (docs/cc.md) sends every host<->device transfer of the engine through the encrypted channel
    (ccserve/secure/): "off" copies in the clear, "naive" seals on demand, "pipelined" seals predicted transfers
    ahead on cc_threads workers. preemption_mode picks what happens to a preempted request's KV: "recompute"
    drops it, "swap" moves it through the channel to host memory as ciphertext under the request's own key
    (needs cc), "auto" swaps when cc is on and the request has at least swap_threshold_tokens computed tokens
    (re-running a long prefill costs more than moving its blocks twice), else recomputes.
    gpu_weight_budget_gb (GiB) caps the GPU memory of the weights: decoder layers beyond it live in host memory
    (ciphertext under cc) and stream through a ring of GPU buffers every forward pass (docs/cc.md); None keeps
    all resident.
    tensor_parallel_size N > 1 runs the model as a group of N processes, one per visible GPU (docs/tp.md): this
    process is rank 0 and drives the others; with --cc the collectives between them carry only AES-GCM sealed
    payloads (per-link keys), and each rank swaps its slice of a preempted request's KV.
    tp_all_reduce "peer" sends the small all-reduces of decode steps through a one-shot all-reduce over peer GPU
    memory (PyTorch symmetric memory; 2 GPUs, --cc off) instead of NCCL's (distributed/peer_reduce.py).
    lora_adapters maps adapter names (what a request's `model` field selects) to PEFT LoRA directories, read at
    start (docs/lora.md); max_lora_rank is the largest rank accepted, max_loras the GPU adapter cache's slots and
    so the most distinct adapters one batch holds.
    public_prefixes are operator-declared public prompt prefixes (texts, {"system": text} chat system messages or
    token id lists, tokenized as the requests they serve are: engine/public_prefixes.py): their whole KV blocks are
    computed at start, held for the process lifetime and shared read-only by every request whose prompt starts with
    them (kv/prefix_cache.py); they are part of the measured configuration (attest/measure.py).
    enable_prefix_caching asks for prefix caching of request content (per tenant, with expiry): the pcc policy
    refuses it, and it is not built yet (the engine refuses it too).
    """

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    load_format: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks: int | None = None
    enforce_eager: bool = False
    seed: int = 0
    cuda_graph_max_batch: int = 512
    num_decode_steps: int = 8
    kv_format: str = "bf16"
    kv_sparsity: float | None = None
    kv_recent_window: int = 32
    kv_sink_tokens: int = 4
    kv_importance: str = "accumulated"
    privacy: str = "pcc"
    cc: str = "off"
    cc_threads: int = 4
    preemption_mode: str = "auto"
    swap_threshold_tokens: int = 256
    gpu_weight_budget_gb: float | None = None
    tensor_parallel_size: int = 1
    tp_all_reduce: str = "nccl"
    lora_adapters: dict[str, str] = field(default_factory=dict)
    max_lora_rank: int = 64
    max_loras: int = 4
    public_prefixes: list[str | dict[str, str] | list[int]] = field(default_factory=list)
    enable_prefix_caching: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"load_format must be 'auto', 'safetensors' or 'dummy', got {self.load_format!r}")
        if self.load_format != "dummy" and not Path(self.model).is_dir():
            raise ValueError(
                f"model directory {self.model!r} does not exist: pass an HF-format directory "
                "(config.json, *.safetensors, tokenizer files), or load_format='dummy' with a config directory")
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"model directory {self.model!r} has no config.json")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.block_size not in (8, 16, 32, 64):
            raise ValueError(f"block_size must be 8, 16, 32 or 64, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if not 1 <= self.num_decode_steps <= 64:
            raise ValueError(f"num_decode_steps must be in [1, 64], got {self.num_decode_steps}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise ValueError(f"num_gpu_blocks must be >= 1, got {self.num_gpu_blocks}")
        _kv_format(self.kv_format)      # raises naming --kv-format and the choices
        self._validate_sparsity()
        if self.privacy not in PRIVACY_POLICIES:
            raise ValueError(f"privacy must be 'pcc' (the default) or 'open', got {self.privacy!r}")
        if self.cc not in CC_MODES:
            raise ValueError(f"cc must be one of {', '.join(CC_MODES)} (--cc), got {self.cc!r}")
        if not 1 <= self.cc_threads <= 256:
            raise ValueError(f"cc_threads must be in [1, 256], got {self.cc_threads}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, "
                             f"got {self.preemption_mode!r}")
        if self.preemption_mode == "swap" and self.cc == "off":
            raise ValueError("preemption_mode 'swap' moves KV to host memory, which needs the encrypted channel: "
                             "add --cc naive or --cc pipelined, or use --preemption-mode recompute")
        if self.swap_threshold_tokens < 1:
            raise ValueError(f"swap_threshold_tokens must be >= 1, got {self.swap_threshold_tokens}")
        if self.gpu_weight_budget_gb is not None and not self.gpu_weight_budget_gb > 0:
            raise ValueError(f"--gpu-weight-budget must be a positive number of GiB, got {self.gpu_weight_budget_gb}")
        self._validate_tensor_parallel()
        self._validate_lora()
        self._validate_public_prefixes()

    def _validate_sparsity(self) -> None:
        r = self.kv_sparsity
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1):
            raise ValueError(f"--kv-sparsity must be a ratio in (0, 1] (the share of each request's cached tokens "
                             f"kept; leave it out for no sparsity), got {r!r}")
        if not isinstance(self.kv_recent_window, int) or self.kv_recent_window < 1:
            raise ValueError(f"--kv-recent-window must be an integer >= 1 (the newest tokens every head keeps), "
                             f"got {self.kv_recent_window!r}")
        if not isinstance(self.kv_sink_tokens, int) or self.kv_sink_tokens < 0:
            raise ValueError(f"--kv-sink-tokens must be an integer >= 0 (the first tokens every head keeps), "
                             f"got {self.kv_sink_tokens!r}")
        if self.kv_importance not in IMPORTANCE_MODES:
            raise ValueError(f"--kv-importance must be one of {', '.join(IMPORTANCE_MODES)}, "
                             f"got {self.kv_importance!r}")
        if r is not None and (self.public_prefixes or self.enable_prefix_caching):
            raise ValueError("--kv-sparsity prunes tokens per request, but prefix blocks are shared by many requests: "
                             "drop --kv-sparsity, or the public prefixes / prefix caching")

    def _validate_public_prefixes(self) -> None:
        for prefix in self.public_prefixes:
            text = prefix.get("system") if isinstance(prefix, dict) and set(prefix) == {"system"} else prefix
            if isinstance(text, str) and text:
                continue
            if not isinstance(prefix, list) or not prefix or any(
                    isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in prefix):
                raise ValueError("public_prefixes must be a list of non-empty texts, {\"system\": text} chat system "
                                 "messages or token id lists (--public-prefix-file FILE: a JSON list of them, or a "
                                 "text file)")
        if self.public_prefixes and self.kv_sparsity is not None:
            raise ValueError("public prefixes (--public-prefix-file) and --kv-sparsity do not run together yet: a "
                             "request's importance scores would land in the shared prefix blocks; drop one of them")

    def _validate_lora(self) -> None:
        if not isinstance(self.lora_adapters, dict) or any(
                not isinstance(k, str) or not k or not isinstance(v, str) for k, v in self.lora_adapters.items()):
            raise ValueError("lora_adapters must map adapter names to directories (--lora NAME=DIR ...)")
        if not 1 <= self.max_lora_rank <= 512:
            raise ValueError(f"max_lora_rank must be in [1, 512] (--max-lora-rank), got {self.max_lora_rank}")
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1 (--max-loras: GPU adapter cache slots), got {self.max_loras}")

    def _validate_tensor_parallel(self) -> None:
        size = self.tensor_parallel_size
        if size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1 (--tensor-parallel-size), got {size}")
        if self.tp_all_reduce not in TP_ALL_REDUCES:
            raise ValueError(f"tp_all_reduce must be one of {', '.join(TP_ALL_REDUCES)} (--tp-all-reduce), got "
                             f"{self.tp_all_reduce!r}")
        if self.tp_all_reduce == "peer" and (size != 2 or self.cc != "off" or self.torch_device.type != "cuda"):
            raise ValueError("--tp-all-reduce peer runs on 2 GPUs (--tensor-parallel-size 2) with --cc off (under "
                             "--cc every collective is sealed): use --tp-all-reduce nccl")
        if size == 1:
            return
        if self.device.startswith("cuda:"):
            raise ValueError(f"device {self.device!r} names one GPU, but tensor_parallel_size {size} uses the first "
                             f"{size} visible GPUs: pass device 'cuda' and choose GPUs with CUDA_VISIBLE_DEVICES")

    @property
    def swap_enabled(self) -> bool:
        """Whether preemption may swap KV out (else it always recomputes)."""
        return self.cc != "off" and self.preemption_mode in ("swap", "auto")

    @property
    def swap_threshold(self) -> int | None:
        """Computed tokens from which a preempted request swaps instead of recomputing; None: it never swaps."""
        if not self.swap_enabled:
            return None
        return 1 if self.preemption_mode == "swap" else self.swap_threshold_tokens

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        """The compute dtype: explicit, else the checkpoint's on GPU, else float32 on CPU."""
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if self.torch_device.type == "cpu":
            return torch.float32
        return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


@dataclass
class ServerOptions:
    """Settings of the HTTP server in front of an engine (`ccserve serve`). They live here, beside
    EngineConfig, because the privacy policy judges both: where the server listens and how much it logs
    matter as much as what the engine keeps.

    attest makes the node prove what it runs (GET /attestation, docs/attest.md) and open requests sealed to its
    in-memory key; under the pcc policy it then accepts only sealed requests on the generation endpoints. router
    (with attest) registers the node with a `ccserve router` at that URL, advertising `capacity` (default: the
    engine's max_num_seqs) and reachable at advertise_url (default: http://HOST:PORT as bound).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    max_queue: int = 1024
    log_level: str = "info"
    attest: bool = False
    router: str | None = None
    capacity: int | None = None
    advertise_url: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.router is not None and not self.attest:
            raise ValueError("router needs attest: a router admits only nodes that prove what they run "
                             "(add --attest)")
        if (self.capacity is not None or self.advertise_url is not None) and self.router is None:
            raise ValueError("capacity and advertise_url are what the node tells its router: give router too")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        for name in ("router", "advertise_url"):
            url = getattr(self, name)
            if url is not None and not url.startswith(("http://", "https://")):
                raise ValueError(f"{name} must be an http(s) URL, got {url!r}")
