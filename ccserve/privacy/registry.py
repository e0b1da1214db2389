"""The privacy registry: every setting of the engine and the server, and every optimization the PCC deck
tables, with the rules it threatens, when it is on, what is in force against it and whether `pcc` allows it.

Why one table: the policy, `ccserve audit` and the tests all read it, so a feature is classified once, here,
and a setting nobody classified fails a test instead of slipping past the policy. The rules are Apple's
Private Cloud Compute requirements, lettered as in the seed deck. Features ccserve does not have are listed
too (present=False): the audit shows them as absent, and the issue that builds one flips it here and says
what must then be in force (its `mitigation` reads "when built: ...").
"""
from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, fields

from ccserve.config import EngineConfig, ServerOptions

RULES = {
    "S": "stateless computation",
    "E": "enforceable guarantees",
    "T": "non-targetability",
    "P": "no privileged runtime access",
    "V": "verifiable transparency",
}
# The only `extra` key the engine reads (engine/llm_engine.py); any other key is a setting nobody classified.
KNOWN_EXTRA_KEYS = frozenset({"served_model_name"})
SERVER_SETTINGS = frozenset(f.name for f in fields(ServerOptions))


@dataclass(frozen=True)
class Settings:
    """What the policy judges: the engine's config and the server in front of it (None when no server runs:
    `generate`, `bench`, the library)."""

    config: EngineConfig
    server: ServerOptions | None = None

    def get(self, name: str) -> object:
        """A setting by name; a server option reads None when no server runs."""
        if name in SERVER_SETTINGS:
            return getattr(self.server, name) if self.server is not None else None
        return getattr(self.config, name)


def _never(settings: Settings) -> bool:
    return False


def _always(settings: Settings) -> bool:
    return True


@dataclass(frozen=True)
class Feature:
    """One thing that touches the rules. `threat` says how it breaks `threatens` when on; `mitigation` is what
    is in force while it is on ("none" when nothing is); `alternative` is the safe choice where pcc refuses it."""

    name: str
    threatens: str
    threat: str
    mitigation: str
    fields: tuple[str, ...] = ()
    enabled: Callable[[Settings], bool] = _never
    pcc: bool = True
    alternative: str = ""
    present: bool = True


def _cuda_graphs(s: Settings) -> bool:
    return not s.config.enforce_eager and s.config.torch_device.type == "cuda"


def _unknown_extra(s: Settings) -> bool:
    return bool(set(s.config.extra) - KNOWN_EXTRA_KEYS)


def _debug_logging(s: Settings) -> bool:
    return s.server is not None and s.server.log_level == "debug"


def _sealed_only(s: Settings) -> bool:
    """An attested node under pcc refuses plaintext requests on the generation endpoints (attest/http.py)."""
    return s.server is not None and s.server.attest and s.config.privacy == "pcc"


def _off_loopback(s: Settings) -> bool:
    if s.server is None or s.server.host == "localhost" or _sealed_only(s):
        return False
    try:
        return not ipaddress.ip_address(s.server.host).is_loopback
    except ValueError:  # a host name or a wildcard other than an address: assume it is reachable
        return True


FEATURES: tuple[Feature, ...] = (
    # ---- in ccserve today ----------------------------------------------------------------------------
    Feature("paged KV cache", "S",
            "a finished request's keys and values stay in GPU memory, and a reused block could show them to "
            "its next owner",
            "every freed block (finished, aborted, failed, preempted) is zeroed in one batched operation before "
            "the next forward pass, quantized codes with their scales and zero points; no block reaches a new "
            "owner unscrubbed",
            fields=("block_size", "num_gpu_blocks", "gpu_memory_utilization", "kv_format"), enabled=_always),
    Feature("per-head KV sparsity", "S",
            "each token's importance (attention mass per KV head) and keep mask are derived from the request's "
            "content and stay in GPU memory beside its keys and values",
            "scores and masks are paged with the KV blocks (same block ids), per request, never shared across "
            "requests, logged or exported, and zeroed with the block when it is freed",
            fields=("kv_sparsity", "kv_recent_window", "kv_sink_tokens", "kv_importance"),
            enabled=lambda s: s.config.kv_sparsity is not None),
    Feature("continuous batching scheduler", "T",
            "a scheduler that orders, admits or preempts by user, content or predicted length lets an attacker "
            "steer a target's requests",
            "first come, first served: admission in arrival order, the newest preempted first, no priorities "
            "and no length prediction; every limit is global, none per request",
            fields=("max_num_seqs", "max_num_batched_tokens", "num_decode_steps"), enabled=_always),
    Feature("CUDA graphs for decode", "S",
            "the graphs' static input buffers hold the last decode batch's token ids and positions between steps",
            "the buffers are GPU memory only, never copied out, and overwritten by the next decode step",
            fields=("enforce_eager", "cuda_graph_max_batch"), enabled=_cuda_graphs),
    Feature("OpenAI HTTP API with /metrics", "SP",
            "whatever the server logs or exposes leaves the node and could carry request content",
            "metrics are an allowlist of aggregates with fixed label values; logs pass a record allowlist "
            "(no third-party text, no tracebacks); no debug, docs or admin routes",
            fields=("port", "max_queue", "served_model_name"), enabled=lambda s: s.server is not None),
    Feature("dummy weights", "EV",
            "the node would serve random weights instead of the model it claims, so no measurement binds the "
            "model that answers",
            "none",
            fields=("load_format",), enabled=lambda s: s.config.load_format == "dummy", pcc=False,
            alternative="load the real weights (load_format 'auto' or 'safetensors')"),
    Feature("unclassified extra settings", "E",
            "a key in `extra` that no registry entry classifies escapes the policy",
            "none",
            fields=("extra",), enabled=_unknown_extra, pcc=False,
            alternative=f"keep extra to {', '.join(sorted(KNOWN_EXTRA_KEYS))}, or classify the new key in "
                        "ccserve/privacy/registry.py"),
    Feature("debug logging", "P",
            "at debug level libraries emit per-request records; their text is withheld, but their count and "
            "timing still trace single requests for whoever reads the logs",
            "the log record allowlist (third-party text withheld, no tracebacks, our loggers log aggregates)",
            fields=("log_level",), enabled=_debug_logging, pcc=False,
            alternative="--log-level info (lifecycle lines and aggregate statistics only)"),
    Feature("plaintext HTTP beyond loopback", "E",
            "prompts and outputs cross the network in cleartext, readable by whatever terminates the "
            "connection outside the node (the deck's external TLS-terminating load balancer)",
            "none (with --attest under pcc the node accepts only requests sealed to its attested key, and this "
            "feature is off)",
            fields=("host",), enabled=_off_loopback, pcc=False,
            alternative="--host 127.0.0.1 (the default), or --attest (then only requests sealed to the node's "
                        "attested key are accepted)"),
    Feature("serving without attestation", "VE",
            "a client cannot check what the node runs before sending it a prompt: no evidence binds a key to a "
            "release in the transparency log, and requests arrive in plaintext",
            "under pcc the listener stays on loopback, so only processes on this machine reach it",
            fields=("attest",), enabled=lambda s: s.server is not None and not s.server.attest,
            alternative="--attest (evidence at /attestation, sealed requests; docs/attest.md)"),
    Feature("host<->GPU transfers in the clear", "S",
            "with --cc off each step's token ids, positions, block tables and sampled tokens cross the bus in "
            "plaintext, readable by the host where the GPU is not in confidential-computing mode",
            "none (with --cc naive or pipelined every transfer is one AES-GCM message each way per step, "
            "authenticated under per-process keys; docs/cc.md)",
            fields=("cc", "cc_threads"), enabled=lambda s: s.config.cc == "off"),
    Feature("KV swap to host", "S", "a preempted request's KV leaves the GPU for host memory",
            "it crosses only through the encrypted channel and rests as ciphertext under the request's own key, "
            "destroyed (crypto-shredded) when the request ends; its GPU blocks are scrubbed; swap needs --cc",
            fields=("preemption_mode", "swap_threshold_tokens"), enabled=lambda s: s.config.swap_enabled),
    Feature("weight streaming", "E",
            "decoder layers beyond --gpu-weight-budget rest in host memory and cross the GPU boundary every forward "
            "pass, where the host could read or swap them",
            "with --cc naive or pipelined they rest as ciphertext under the process's weight key and cross through "
            "the authenticated channel, so an altered layer fails its pass (IntegrityError) and only the loaded "
            "weights run; with --cc off they rest and cross in the clear, as every transfer does then; weights "
            "carry no request data (docs/cc.md)",
            fields=("gpu_weight_budget_gb",), enabled=lambda s: s.config.gpu_weight_budget_gb is not None),
    Feature("tensor parallelism", "S",
            "every step's activations cross between the GPUs of the node (all-reduce, all-gather) and each step's "
            "token ids, positions and block tables go from the main process to every worker process",
            "with --cc naive or pipelined every collective carries only AES-GCM sealed payloads between the GPUs "
            "(a key per directed link from an X25519 exchange at start, lock-step IV counters, a tampered or "
            "replayed message fails the step and ends the group; docs/tp.md); with --cc off they cross in the "
            "clear, as every transfer does then; the worker processes live and die with the main process and "
            "scrub their slice of every freed KV block",
            fields=("tensor_parallel_size", "tp_all_reduce"), enabled=lambda s: s.config.tensor_parallel_size > 1),
    Feature("LoRA adapters", "TV",
            "a per-user adapter is an identity to schedule or route by, and an adapter outside the measurement is "
            "code nobody verified",
            "adapters are declared at start (--lora) and measured with the release (each directory's Merkle root); "
            "a request names one in its model field, and the scheduler admits first come first served (the "
            "per-batch adapter limit --max-loras makes the head of the queue wait, never overtakes it); adapters "
            "cross through their own encrypted channel under --cc; metrics count loads and hits in aggregate "
            "(docs/lora.md)",
            fields=("lora_adapters", "max_lora_rank", "max_loras"), enabled=lambda s: bool(s.config.lora_adapters)),
    Feature("public prefix cache", "SE",
            "KV blocks outlive the requests that read them, and a request that reuses them runs faster, so its "
            "timing tells whether its prompt starts with a cached prefix",
            "only operator-declared prefixes are cached, computed at start from the configuration alone (never from a "
            "request) and measured with the release, so every client can see them; requests share their whole blocks "
            "read-only (exact token ids from the prompt's start) and compute everything after them, partial last "
            "block included, into blocks of their own (docs/privacy.md)",
            fields=("public_prefixes",), enabled=lambda s: bool(s.config.public_prefixes)),
    Feature("prefix caching", "SE", "one request's KV outlives it and can be inferred by others sharing the cache",
            "none (not built yet: the engine refuses it under every policy)",
            fields=("enable_prefix_caching",), enabled=lambda s: s.config.enable_prefix_caching, pcc=False,
            alternative="declare the shared system prompts as public prefixes (--public-prefix-file FILE)"),
    # ---- not in ccserve: what a future implementation must put in force --------------------------------
    Feature("disk offload", "SE", "a request's KV lands on storage that outlives the request",
            "when built: ciphertext under a per-request key that is destroyed at the end (crypto-shredding)",
            present=False),
    Feature("speculative decoding", "S", "context- or database-based drafts keep tokens of past requests",
            "when built: draft state per request only, no cross-request database", present=False),
    Feature("KV duplication", "ST", "copies of a request's KV outlive it on other nodes and let an attacker "
            "place a target's state", "when built: refused under pcc", present=False),
    Feature("KV pulling and request migration", "T", "moving requests or KV between nodes lets a compromised "
            "node pull in its targets", "when built: refused under pcc", present=False),
    Feature("priority scheduling", "T", "raising a target's priority steers it onto a compromised path",
            "first come, first served is the only order", present=False),
    Feature("request-level length prediction", "T", "a per-request prediction is a per-content decision",
            "the scheduler sees only token counts already known, never a prediction", present=False),
    Feature("per-request tracing or metrics", "SP", "a per-request record outlives the request and leaves "
            "the node", "metrics are aggregates only (server/metrics.py raises on other labels)", present=False),
    Feature("global profiling", "P", "a profiler reads request data at run time", "when built: refused under pcc",
            present=False),
    Feature("debug or admin endpoints", "P", "an endpoint that inspects state is privileged runtime access",
            "the server routes only the OpenAI endpoints, /health and /metrics", present=False),
    Feature("machine-level scheduler", "ET", "a scheduler outside the attested node decides where data goes, "
            "and a node that advertises more capacity draws more requests",
            "the router (`ccserve router`) routes only to nodes whose evidence it verified against the transparency "
            "log, draws a node per request at random in proportion to capacity (capped by --max-node-capacity) "
            "and sees only bodies sealed to the nodes and blind tokens; capacity is advertised, not attested",
            fields=("router", "capacity"), enabled=lambda s: s.server is not None and s.server.router is not None),
    Feature("instance flip", "T", "turning a chosen node into a prefill node steers targets to it",
            "when built: refused under pcc", present=False),
    Feature("closed-source components", "V", "code that nobody outside can read cannot be verified",
            "ccserve is open source, kernels included", present=False),
)

# Settings that touch no rule, and why: the test of completeness counts them as classified.
NEUTRAL: dict[str, str] = {
    "model": "the weights directory, loaded once at start, never per request",
    "tokenizer": "the tokenizer directory, loaded once at start",
    "dtype": "numeric precision of the same computation",
    "device": "which processor of this node computes; data stays on the node",
    "max_model_len": "a global length limit, the same for every request",
    "seed": "seeds dummy weights and the default sampler; carries no request data",
    "privacy": "selects the policy itself",
    "advertise_url": "where the router reaches this node; carries no request data",
}


def classified() -> set[str]:
    """Every setting name the registry accounts for, through a feature or as neutral."""
    return set(NEUTRAL).union(*(f.fields for f in FEATURES))
