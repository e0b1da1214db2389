"""The Prometheus metrics allowlist: aggregate counters, gauges and histograms, nothing per request.

Every metric and every label value is declared here, in a registry of our own (not the process-global
one), so /metrics can only ever show what this file lists. Label values come from the fixed tuples below,
never from a request; anything else raises, so a mistake fails a test instead of leaking.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ccserve.engine.outputs import EngineStats

ENDPOINTS = ("completions", "chat_completions")
# stop/length: finished normally; abort: the client went away; error: the engine failed it;
# rejected: refused before generating (bad input, unknown model, queue full, shutting down).
OUTCOMES = ("stop", "length", "abort", "error", "rejected")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _EngineCollector(Collector):
    """Engine counters and gauges, read from the stats snapshot the engine thread publishes each step."""

    def __init__(self, stats: Callable[[], EngineStats], num_unfinished: Callable[[], int]) -> None:
        self._stats = stats
        self._num_unfinished = num_unfinished

    def collect(self) -> Iterator:
        s = self._stats()
        yield CounterMetricFamily("ccserve_prompt_tokens", "Prompt tokens admitted", value=s.prompt_tokens_total)
        yield CounterMetricFamily("ccserve_generation_tokens", "Tokens generated",
                                  value=s.generation_tokens_total)
        yield CounterMetricFamily("ccserve_preemptions", "Requests preempted for KV blocks",
                                  value=s.num_preemptions)
        yield GaugeMetricFamily("ccserve_requests_running", "Requests in the running batch", value=s.num_running)
        yield GaugeMetricFamily("ccserve_requests_waiting", "Requests waiting in the engine", value=s.num_waiting)
        yield GaugeMetricFamily("ccserve_requests_unfinished", "Requests admitted and not finished",
                                value=self._num_unfinished())
        yield GaugeMetricFamily("ccserve_kv_blocks_free", "Free KV-cache blocks", value=s.num_free_blocks)
        yield GaugeMetricFamily("ccserve_kv_blocks_total", "KV-cache blocks", value=s.num_total_blocks)
        yield GaugeMetricFamily("ccserve_kv_capacity_tokens", "Tokens the KV cache holds in its format (--kv-format)",
                                value=s.kv_capacity_tokens)
        yield GaugeMetricFamily("ccserve_kv_format_compression", "Model-dtype KV bytes per token over the "
                                "--kv-format's, scales included", value=s.kv_format_compression)
        yield GaugeMetricFamily("ccserve_kv_kept_share", "Share of the running requests' cached token entries "
                                "per KV head still kept (--kv-sparsity; 1 without)", value=s.kv_kept_share)
        yield CounterMetricFamily("ccserve_lora_adapter_loads", "LoRA adapters moved into the GPU adapter cache",
                                  value=s.lora_loads)
        yield CounterMetricFamily("ccserve_lora_cache_hits", "Batch adapters found resident in the GPU adapter cache",
                                  value=s.lora_hits)
        yield GaugeMetricFamily("ccserve_public_prefix_blocks", "KV blocks held by the declared public prefixes",
                                value=s.num_public_prefix_blocks)
        yield CounterMetricFamily("ccserve_prefix_cache_hits", "Admissions that started from public prefix blocks",
                                  value=s.prefix_cache_hits)
        yield CounterMetricFamily("ccserve_prefix_cache_saved_tokens", "Prompt tokens not computed thanks to public "
                                  "prefix blocks", value=s.prefix_cache_tokens_saved)
        c = s.crypto
        yield CounterMetricFamily("ccserve_cc_h2d_bytes", "Bytes sent host to GPU through the encrypted channels",
                                  value=c.h2d_bytes)
        yield CounterMetricFamily("ccserve_cc_d2h_bytes", "Bytes sent GPU to host through the encrypted channels",
                                  value=c.d2h_bytes)
        yield CounterMetricFamily("ccserve_cc_speculations", "Transfers sealed ahead on a prediction",
                                  value=c.speculated)
        yield CounterMetricFamily("ccserve_cc_speculation_hits", "Transfers that used their sealed-ahead copy",
                                  value=c.speculation_hits)
        yield CounterMetricFamily("ccserve_cc_relinquished", "Sealed-ahead copies given up (no IV reused)",
                                  value=c.relinquished)
        yield CounterMetricFamily("ccserve_cc_unpredicted", "Transfers sealed on demand (no prediction)",
                                  value=c.unpredicted)
        yield CounterMetricFamily("ccserve_cc_wait_seconds", "Host time on the critical path waiting on crypto",
                                  value=c.wait_s)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats], num_unfinished: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter("ccserve_requests", "Requests by endpoint and outcome",
                                 ["endpoint", "outcome"], registry=self.registry)
        for endpoint in ENDPOINTS:
            for outcome in OUTCOMES:
                self._requests.labels(endpoint, outcome)
        self._ttft = Histogram("ccserve_time_to_first_token_seconds", "Admission to first generated token",
                               buckets=LATENCY_BUCKETS, registry=self.registry)
        self._e2e = Histogram("ccserve_e2e_request_latency_seconds", "Admission to last generated token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(stats, num_unfinished))

    def count(self, endpoint: str, outcome: str) -> None:
        if endpoint not in ENDPOINTS or outcome not in OUTCOMES:
            raise ValueError("metric label outside the allowlist")
        self._requests.labels(endpoint, outcome).inc()

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def observe_e2e(self, seconds: float) -> None:
        self._e2e.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
