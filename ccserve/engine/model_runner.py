"""Runs the model for one scheduled batch: builds the step's tensors, replays CUDA graphs for decodes,
samples, and owns the KV cache memory (sizing, allocation, scrubbing)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from ccserve.config import EngineConfig
from ccserve.distributed.env import device_for_rank
from ccserve.distributed.group import SINGLE, TensorParallelGroup
from ccserve.distributed.sealed import LinksCheck
from ccserve.engine.boundary import Boundary
from ccserve.engine.scheduler import ScheduledBatch
from ccserve.engine.sequence import Sequence
from ccserve.engine.swapper import KVSwapper
from ccserve.engine.weight_stream import WeightStream, attach_weight_stream
from ccserve.kv.cache import KVCache
from ccserve.kv.formats import kv_format
from ccserve.kv.sparsity import STATE_BYTES, SparsityPolicy, kept_share, prune
from ccserve.layers.attention import Attention, AttentionMetadata
from ccserve.layers.sampler import Sampler, SamplerOutput, SamplingBatch
from ccserve.lora import AdapterCache, LoraIndex, build_lora
from ccserve.models.loader import load_model
from ccserve.sampling_params import SamplingParams
from ccserve.privacy.free_memory import zero_cached_free_memory
from ccserve.secure import IntegrityError, PendingHost

if TYPE_CHECKING:
    from ccserve.engine.tp_workers import WorkerGroup

CPU_KV_CACHE_BYTES = 2 << 30
log = logging.getLogger(__name__)
GPU_MEMORY_MARGIN_BYTES = 512 << 20


@dataclass
class DecodeWindow:
    """A multi-step decode window that has been enqueued: its rows, what it sampled (still on the device),
    the device state a following window continues from, and its tokens on their way to the host.

    The tokens travel by a non-blocking copy into pinned memory, recorded by an event, so that reading them
    waits for this window only, not for a window enqueued after it.
    """

    seqs: list[Sequence]
    outputs: list[SamplerOutput]
    last_ids: torch.Tensor          # [B] the last step's sampled tokens: the next window's inputs
    last_positions: torch.Tensor    # [B] the positions of the last step's inputs
    host_tokens: torch.Tensor | None    # [B, steps] int64, filled by the copy
    copied: torch.cuda.Event | None
    sealed: PendingHost | None = None   # cc mode: the tokens as one sealed message instead
    links_check: LinksCheck | None = None   # sealed TP collectives: their failed flag as of this window's end

    @classmethod
    def start(cls, seqs: list[Sequence], outputs: list[SamplerOutput], last_positions: torch.Tensor,
              boundary: Boundary) -> DecodeWindow:
        tokens = torch.stack([o.token_ids for o in outputs], dim=1)
        if boundary.cc:
            return cls(seqs, outputs, outputs[-1].token_ids, last_positions, None, None,
                       boundary.to_host_async(tokens))
        if not tokens.is_cuda:
            return cls(seqs, outputs, outputs[-1].token_ids, last_positions, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(seqs, outputs, outputs[-1].token_ids, last_positions, host, copied)

    @property
    def steps(self) -> int:
        return len(self.outputs)

    @property
    def wants_logprobs(self) -> bool:
        return self.outputs[0].logprobs is not None

    def token_rows(self) -> list[list[int]]:
        """Each row's sampled tokens, one per step (waits for this window's copy to land; under cc, verifies
        and decrypts them: raises IntegrityError if the message was altered)."""
        if self.sealed is not None:
            return self.sealed.result().tolist()
        if self.copied is not None:
            self.copied.synchronize()
        rows = self.host_tokens.tolist()
        with torch.inference_mode():    # (an inference tensor) pinned blocks are cached and reused: zero it
            self.host_tokens.zero_()
        return rows


@dataclass
class StepInputs:
    """Host-built tensors of one step, already on the device."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_indices: torch.Tensor
    sampling: SamplingBatch | None = None   # cc or tensor parallelism: came over with the step's arrays


@dataclass
class HostStep:
    """One step's inputs as host arrays and plain numbers: what rank 0 builds from its sequences and, under
    tensor parallelism, sends to the other ranks (arrays cross the process boundary, Sequence objects never).

    arrays: slot mapping, decode lengths and tables, prefill cu_seqlens, lengths and tables, token ids,
    positions, sample indices, then the sampling tensors when `sampling` was built on the host (under cc, or
    under tensor parallelism, where rank 0 draws the seeds so that every rank samples the same tokens)."""

    arrays: list[np.ndarray]
    num_decodes: int
    max_prefill_query_len: int
    num_samples: int
    sampling: SamplingBatch | None

    @property
    def decode_only(self) -> bool:
        return self.max_prefill_query_len == 0


@dataclass
class HostContinuation:
    """The host part of a decode window that continues the previous window on the device: arrays are the rows
    that go on (indices into the previous window's rows), their block tables (grown by the host), then the
    sampling tensors as in HostStep."""

    arrays: list[np.ndarray]
    sampling: SamplingBatch | None


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TensorParallelGroup = SINGLE,
                 peers: WorkerGroup | None = None) -> None:
        """tp: this process's rank of the tensor-parallel group (SINGLE: no group). peers: on rank 0 of a group,
        the other ranks, which run every step this runner runs (ranks 1..N-1 build their runner without)."""
        self.config, self.tp, self.peers = config, tp, peers
        self.device = config.torch_device
        if tp.size > 1:
            self.device = device_for_rank(tp.rank, tp.size, self.device.type)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        torch.manual_seed(config.seed)
        streaming = config.gpu_weight_budget_gb is not None     # built on the host, then placed (docs/cc.md)
        self.model, self.hf_config = load_model(config, tp, torch.device("cpu") if streaming else self.device)
        self.weights: WeightStream | None = None
        if streaming:
            self.weights = attach_weight_stream(self.model, self.hf_config.num_hidden_layers,
                                                config.gpu_weight_budget_gb, config.cc, config.cc_threads, self.device)
        self.dtype = next(self.model.parameters()).dtype
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        # Multi-LoRA (docs/lora.md): only with adapters configured; without, the model has no LoRA code at all.
        self.lora: AdapterCache | None = None
        self.lora_index: LoraIndex | None = None
        if config.lora_adapters:
            max_tokens = max(config.max_num_batched_tokens, config.max_num_seqs, config.cuda_graph_max_batch)
            self.lora, self.lora_index = build_lora(config, self.model, max_tokens, self.device, self.dtype)
        self.block_size = config.block_size
        self.max_model_len = resolve_max_model_len(config, self.hf_config)
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.sampler = Sampler()
        self.boundary = Boundary(config, self.device)
        layer = self.attn_layers[0]
        self.kv_shape = (len(self.attn_layers), layer.num_kv_heads, self.block_size, layer.head_dim)
        self.kv_format = kv_format(config.kv_format).resolve(layer.head_dim, self.block_size)
        self.sparsity = _sparsity_policy(config)
        num_blocks = config.num_gpu_blocks or self._plan_num_blocks()
        num_blocks = tp.min_over_ranks(num_blocks, self.device)  # every rank holds a slice of the same blocks
        self.kv_cache = self._new_cache(num_blocks)
        self.kv_cache.bind(self.attn_layers)
        # Encrypted KV swap (docs/cc.md): every rank swaps its slice of the blocks, as rank 0 says.
        self.swapper = (KVSwapper(self.kv_cache, config.cc, config.cc_threads, self.device)
                        if config.swap_enabled else None)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graphs_replayed: set[int] = set()     # batch sizes whose graphs hold a request's data (see scrub_idle)
        self.ran_since_scrub = False
        # Streamed weights need host work between layers: they run eagerly.
        if self.device.type == "cuda" and not config.enforce_eager and self.weights is None:
            self._capture_decode_graphs()

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    def _new_cache(self, num_blocks: int) -> KVCache:
        return KVCache(*self.kv_shape, num_blocks=num_blocks, dtype=self.dtype, device=self.device,
                       kv_format=self.kv_format, sparse=self.sparsity is not None)

    # ---- one step -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], SamplerOutput | None]:
        """Run one batch; returns the sequences that sampled a token and what the sampler gave them."""
        step, seqs = self._host_step(batch)
        self._send(("execute", step))
        return seqs, self.run_step(step, [s.params for s in seqs])

    @torch.inference_mode()
    def run_step(self, step: HostStep, params: list[SamplingParams] | None = None) -> SamplerOutput | None:
        """Forward and sample one step on this rank (every rank of a group runs it, so the collectives pair up).
        Rank 0 passes the sampling rows' params (for when the step's sampling settings are built on the device);
        a worker has the host arrays alone."""
        self.ran_since_scrub = True
        inputs = self._device_step(step)
        hidden = self._forward(inputs, step.decode_only)
        self.apply_sparsity(inputs.meta)
        if not step.num_samples:
            return None
        logits = self.model.compute_logits(hidden[inputs.sample_indices])
        batch_params = inputs.sampling or SamplingBatch.build(params, self.device)
        positions = inputs.positions[inputs.sample_indices]
        return self.sampler(logits, batch_params, positions)

    @torch.inference_mode()
    def execute_decodes(self, seqs: list[Sequence], steps: int, after: DecodeWindow | None = None) -> DecodeWindow:
        """Enqueue `steps` decode steps of `seqs` without returning to the host in between: each step's
        sampled tokens are the next step's inputs, positions and slots advance on the device. With `after`,
        the window continues that earlier window on the device (its last tokens are this window's first
        inputs) before the host has read it, so the host's work on one window overlaps the GPU's next one.
        The caller has reserved blocks for all steps; tokens after a stop are discarded by the caller."""
        if after is None:
            step, _ = self._host_step(ScheduledBatch(decodes=seqs))
        else:
            step = self._host_continuation(seqs, after)
        self._send(("decodes", step, steps))
        tail = None if after is None else (after.last_ids, after.last_positions)
        outputs, positions = self.run_decodes(step, steps, tail, [s.params for s in seqs])
        window = DecodeWindow.start(seqs, outputs, positions, self.boundary)
        window.links_check = self.tp.checkpoint()
        return window

    @torch.inference_mode()
    def run_decodes(self, step: HostStep | HostContinuation, steps: int,
                    tail: tuple[torch.Tensor, torch.Tensor] | None = None,
                    params: list[SamplingParams] | None = None) -> tuple[list[SamplerOutput], torch.Tensor]:
        """The steps of a decode window on this rank: every step's sampler output and the last step's positions.
        A HostContinuation continues from `tail`, the previous window's last tokens and positions on the device
        (every rank sampled the same tokens, so each continues from its own copy)."""
        self.ran_since_scrub = True
        if isinstance(step, HostStep):
            inputs = self._device_step(step)
        else:
            inputs = self._device_continuation(step, *tail)
        meta = inputs.meta
        sampling = inputs.sampling or SamplingBatch.build(params, self.device)
        outputs: list[SamplerOutput] = []
        for i in range(steps):
            if i:
                positions = inputs.positions + 1
                meta = replace(meta, slot_mapping=self._slots(meta.decode_block_tables, positions),
                               decode_seq_lens=meta.decode_seq_lens + 1)
                inputs = replace(inputs, input_ids=outputs[-1].token_ids, positions=positions, meta=meta)
            hidden = self._forward(inputs, decode_only=True)
            self.apply_sparsity(meta)
            outputs.append(self.sampler(self.model.compute_logits(hidden), sampling, inputs.positions))
        return outputs, inputs.positions

    def _host_continuation(self, seqs: list[Sequence], after: DecodeWindow) -> HostContinuation:
        """The host part of a window that follows `after` on the device, for the rows of `seqs` (a subset of
        after.seqs, in order); block tables come from the host, which has grown them."""
        row_of = {id(s): i for i, s in enumerate(after.seqs)}
        arrays = [np.asarray([row_of[id(s)] for s in seqs], dtype=np.int64), _pad_tables([s.block_ids for s in seqs])]
        host_sampling = self._host_sampling(seqs, arrays)
        self._host_adapter_slots(seqs, [], arrays)
        return HostContinuation(arrays, host_sampling)

    def _device_continuation(self, step: HostContinuation, last_ids: torch.Tensor, last_positions: torch.Tensor
                             ) -> StepInputs:
        """The first step's inputs of a continuing window, from the previous window's device state."""
        rows, tables, *rest = self._to_device(step.arrays)
        positions = last_positions[rows] + 1
        meta = _decode_only(self._slots(tables, positions), (positions + 1).to(torch.int32), tables)
        return StepInputs(last_ids[rows], positions, meta, torch.arange(rows.shape[0], device=self.device),
                          _device_sampling(step.sampling, rest))

    def apply_sparsity(self, meta: AttentionMetadata) -> None:
        """Under --kv-sparsity, after the step's attention has scored its tokens: each sequence of the step drops
        what its budget no longer covers (kv/sparsity.py)."""
        if self.sparsity is None:
            return
        nd = meta.num_decode_tokens
        prune(self.kv_cache.sparse, meta.decode_block_tables[:nd], meta.decode_seq_lens[:nd], self.sparsity, self.tp)
        prune(self.kv_cache.sparse, meta.prefill_block_tables, meta.prefill_seq_lens, self.sparsity, self.tp)

    # ---- encrypted KV swap, on every rank (owners: the engine's numbers for swapped requests) --------------
    # Rank 0's engine ends a request whose swap failed. A worker cannot: it marks its sealed links failed, which
    # reaches rank 0 with the step's next collective and fails the step there (the group ends). Exiting instead
    # would leave rank 0 waiting inside a collective. (Swap needs --cc, so a group that swaps is sealed.)

    def swap_out(self, owner: int, block_ids: list[int]) -> None:
        self._send(("swap_out", owner, block_ids))
        self.swapper.swap_out(owner, block_ids)
        self._settle_on_worker()

    def settle_swaps(self, until: int | None = None) -> list[tuple[int, IntegrityError]]:
        """Rank 0: store the swap-outs that arrived (KVSwapper.settle); returns the owners whose KV did not arrive
        intact. The workers settle after each swap command instead, so nothing is sent."""
        failed = self.swapper.settle(until)
        self.swapper.reset_if_failed()
        return failed

    def swap_in(self, owner: int, block_ids: list[int]) -> None:
        """Rank 0 has settled up to this owner already (LLMEngine._settle_swaps); a worker settles here."""
        self._send(("swap_in", owner, block_ids))
        if self.tp.rank == 0:
            self.swapper.swap_in(owner, block_ids)
            return
        try:
            for _, exc in self.swapper.settle(until=owner):
                raise exc
            self.swapper.swap_in(owner, block_ids)
        except IntegrityError:
            self._worker_swap_failed()

    def prefetch_swaps(self, owners: list[int]) -> None:
        self._send(("prefetch_swaps", owners))
        self.swapper.prefetch(owners)
        self._settle_on_worker()

    def end_swap(self, owner: int) -> None:
        """Also when the group is lost (requests end then): the workers ended with their memory."""
        if self.peers is not None and self.peers.alive:
            self.peers.send(("end_swap", owner))
        self.swapper.end(owner)
        self._settle_on_worker()    # end() may have opened earlier swap-outs: store them now, not later

    def _settle_on_worker(self) -> None:
        if self.tp.rank > 0 and self.swapper.settle():
            self._worker_swap_failed()

    def _worker_swap_failed(self) -> None:
        self.tp.mark_failed()
        self.swapper.reset_if_failed()

    def load_adapters(self, names: set[str], upcoming: list[str]) -> None:
        """Make the next batch's adapters resident on every rank (each holds its slice of them; the same calls in
        the same order give every rank the same slots), then hint the adapters the waiting queue needs next."""
        self._send(("adapters", names, upcoming))
        try:
            self.lora.activate(names)
        except IntegrityError:
            if self.tp.rank == 0:
                raise
            # A worker marks its sealed links failed (adapter loads are sealed only under --cc, which seals the
            # group): the step fails on rank 0 with the next collective instead of this worker exiting mid-step.
            self.tp.mark_failed()
            self.lora.reset_if_failed()
        self.lora.prefetch(upcoming)

    def _send(self, command: tuple) -> None:
        """Under tensor parallelism, hand the step to the other ranks before running it here."""
        if self.peers is not None:
            self.peers.send(command)

    def _slots(self, tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cache slot of each row's token at `positions`, looked up on the device."""
        blocks = tables.gather(1, (positions // self.block_size).unsqueeze(1)).squeeze(1)
        return blocks.long() * self.block_size + positions % self.block_size

    def scrub(self, block_ids: list[int]) -> None:
        """Zero freed blocks in one batched operation (stateless computation), on every rank: each holds its
        slice of every block. The workers of a lost group ended with their memory; rank 0 still scrubs its own."""
        if block_ids:
            if self.peers is not None and self.peers.alive:
                self.peers.send(("scrub", block_ids))
            self.kv_cache.scrub(block_ids)

    def _forward(self, inputs: StepInputs, decode_only: bool) -> torch.Tensor:
        num_tokens = inputs.input_ids.shape[0]
        if decode_only and self.graphs:
            graph_bs = next((b for b in sorted(self.graphs) if b >= num_tokens), None)
            if graph_bs is not None:
                return self._replay(inputs, graph_bs)[:num_tokens]
        return self.model(inputs.input_ids, inputs.positions, inputs.meta)

    def _host_step(self, batch: ScheduledBatch) -> tuple[HostStep, list[Sequence]]:
        """Flatten the batch into token, position and slot arrays (decodes first); also the sequences that
        sample a token this step."""
        bs = self.block_size
        decodes = batch.decodes
        pos = [s.num_computed_tokens for s in decodes]
        ids = [s.token_ids[p] for s, p in zip(decodes, pos)]
        slots = [s.block_ids[p // bs] * bs + p % bs for s, p in zip(decodes, pos)]
        seq_lens = [p + 1 for p in pos]
        sample_idx = [i for i, s in enumerate(decodes) if s.num_computed_tokens + 1 == s.num_tokens]
        sampling = [decodes[i] for i in sample_idx]
        pos_arrays = [np.asarray(pos, dtype=np.int64)]
        slot_arrays = [np.asarray(slots, dtype=np.int64)]
        offset = len(decodes)
        for seq, n in batch.prefills:
            start = seq.num_computed_tokens
            p = np.arange(start, start + n)
            blocks = np.asarray(seq.block_ids, dtype=np.int64)
            ids.extend(seq.token_ids[start:start + n])
            pos_arrays.append(p)
            slot_arrays.append(blocks[p // bs] * bs + p % bs)
            seq_lens.append(start + n)
            offset += n
            if start + n == seq.num_tokens:
                sample_idx.append(offset - 1)
                sampling.append(seq)
        nd = len(decodes)
        tables = [s.block_ids for s in decodes] + [s.block_ids for s, _ in batch.prefills]
        cu_q = np.zeros(len(batch.prefills) + 1, dtype=np.int32)
        np.cumsum([n for _, n in batch.prefills], out=cu_q[1:])
        arrays = [np.concatenate(slot_arrays), np.asarray(seq_lens[:nd], dtype=np.int32), _pad_tables(tables[:nd]),
                  cu_q, np.asarray(seq_lens[nd:], dtype=np.int32), _pad_tables(tables[nd:]),
                  np.asarray(ids, dtype=np.int64), np.concatenate(pos_arrays), np.asarray(sample_idx, dtype=np.int64)]
        host_sampling = self._host_sampling(sampling, arrays)
        self._host_adapter_slots(decodes, batch.prefills, arrays)
        max_query_len = max((n for _, n in batch.prefills), default=0)
        return HostStep(arrays, nd, max_query_len, len(sampling), host_sampling), sampling

    def _device_step(self, step: HostStep) -> StepInputs:
        """Copy the step's arrays over and describe them to attention."""
        tensors = self._to_device(step.arrays)
        slots, d_lens, d_tables, cu, p_lens, p_tables, ids_t, pos_t, idx_t, *rest = tensors
        meta = AttentionMetadata(
            slot_mapping=slots, num_decode_tokens=step.num_decodes, decode_seq_lens=d_lens,
            decode_block_tables=d_tables, prefill_cu_seqlens_q=cu, prefill_seq_lens=p_lens,
            prefill_block_tables=p_tables, max_prefill_query_len=step.max_prefill_query_len,
        )
        return StepInputs(ids_t, pos_t, meta, idx_t, _device_sampling(step.sampling, rest))

    def _host_adapter_slots(self, decodes: list[Sequence], prefills: list[tuple[Sequence, int]],
                            arrays: list[np.ndarray]) -> None:
        """With adapters, append each token's adapter slot (decodes, then prefill tokens) to the step's arrays:
        it travels last, in the same message, to every rank."""
        if self.lora is not None:
            slot = self.lora.slot
            per_token = [slot(s.lora) for s in decodes] + [slot(s.lora) for s, n in prefills for _ in range(n)]
            arrays.append(np.asarray(per_token, dtype=np.int32))

    def _to_device(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """The step's arrays on the device (one message under cc); with adapters the last one, each token's
        adapter slot, becomes the LoRA index of the step."""
        tensors = self.boundary.to_device(arrays)
        if self.lora is not None:
            self.lora_index.set(tensors.pop())
        return tensors

    def _host_sampling(self, seqs: list[Sequence], arrays: list[np.ndarray]) -> SamplingBatch | None:
        """Under cc, the step's sampling settings travel in its one message: build them on the host and append
        their arrays to `arrays`. Under tensor parallelism likewise, so that rank 0's seeds reach every rank.
        Otherwise they are built on the device later, as always (None)."""
        if not (self.boundary.cc or self.tp.size > 1) or not seqs:
            return None
        host = SamplingBatch.build([s.params for s in seqs], "cpu")
        arrays.extend(getattr(host, f).numpy() for f in SAMPLING_TENSORS)
        return host

    # ---- CUDA graphs for decode batches ----------------------------------------------------------------

    def _graph_batch_sizes(self) -> list[int]:
        top = min(self.config.max_num_seqs, self.config.cuda_graph_max_batch)
        sizes = [b for b in (1, 2, 4, 8) if b < top] + list(range(16, top + 1, 16))
        return sorted(set(sizes + [top]))

    def _capture_decode_graphs(self) -> None:
        """Capture one graph per decode batch size, largest first so smaller ones reuse its memory pool."""
        max_bs = self._graph_batch_sizes()[-1]
        dev = self.device
        self.g_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.g_pos = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.g_slots = torch.full((max_bs,), -1, dtype=torch.int64, device=dev)
        self.g_seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.g_tables = torch.zeros(max_bs, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
        pool = None
        for bs in reversed(self._graph_batch_sizes()):
            meta = _decode_only(self.g_slots[:bs], self.g_seq_lens[:bs], self.g_tables[:bs])
            if self.lora_index is not None:
                self.lora_index.none(bs)    # the graph reads the index buffer's first bs slots
            self.model(self.g_ids[:bs], self.g_pos[:bs], meta)  # warm-up (Triton compile) outside capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(self.g_ids[:bs], self.g_pos[:bs], meta)
            pool = graph.pool()
            self.graphs[bs] = (graph, out)
            torch.cuda.synchronize()

    def drop_graphs(self) -> None:
        """Destroy the decode graphs (the runner then decodes eagerly). Needed before leaving a tensor-parallel
        group: NCCL keeps a communicator that graphs captured collectives on alive until those graphs are gone,
        so destroying the process group first waits forever."""
        self.graphs.clear()
        self.graphs_replayed.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _replay(self, inputs: StepInputs, graph_bs: int) -> torch.Tensor:
        n = inputs.input_ids.shape[0]
        meta = inputs.meta
        self.g_ids[:n] = inputs.input_ids
        self.g_pos[:n] = inputs.positions
        self.g_slots[:n] = meta.slot_mapping
        self.g_slots[n:graph_bs] = -1
        self.g_seq_lens[:n] = meta.decode_seq_lens
        self.g_seq_lens[n:graph_bs] = 0
        width = meta.decode_block_tables.shape[1]
        self.g_tables[:n, :width] = meta.decode_block_tables
        if self.lora_index is not None:
            self.lora_index.pad(n, graph_bs)
        graph, out = self.graphs[graph_bs]
        graph.replay()
        self.graphs_replayed.add(graph_bs)
        return out

    @torch.inference_mode()
    def scrub_idle(self) -> None:
        """Called when no request is left (rule S: nothing of a request survives it), on every rank. The decode
        graphs' static inputs still hold the last batch's token ids and positions, and their memory pool its
        activations and output: the inputs are zeroed (slots -1: no KV write; lengths 0: no KV read) and each
        graph replayed since the last call runs once on them, writing token 0's activations over the request's.
        Eager activations freed into the CUDA caching allocator are zeroed (privacy/free_memory.py). Cached pinned
        host blocks (step arrays, sampled tokens) go back to the driver. Nothing to do if no step ran since."""
        if not self.ran_since_scrub:
            return
        self.ran_since_scrub = False
        if self.peers is not None and self.peers.alive:
            self.peers.send(("scrub_idle",))
        if self.graphs_replayed:
            self.g_ids.zero_()
            self.g_pos.zero_()
            self.g_slots.fill_(-1)
            self.g_seq_lens.zero_()
            self.g_tables.zero_()
            for bs in sorted(self.graphs_replayed):
                if self.lora_index is not None:
                    self.lora_index.none(bs)
                self.graphs[bs][0].replay()
            self.graphs_replayed.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            zero_cached_free_memory(self.device)
            release_pinned = getattr(torch.accelerator, "empty_host_cache", None)   # not in every torch 2.x
            if release_pinned is not None:
                release_pinned()

    # ---- sizing the KV cache ---------------------------------------------------------------------------

    @property
    def kv_format_compression(self) -> float:
        """Model-dtype K and V bytes per token over the cache format's (scales and zero points included)."""
        dim = self.kv_shape[3]
        return 2 * dim * self.dtype.itemsize / self.kv_format.bytes_per_token(dim, self.block_size, self.dtype.itemsize)

    def kept_share(self, seqs: list[Sequence]) -> float:
        """--kv-sparsity: the share of these requests' cached (token, layer, head) entries still kept (1.0 without
        sparsity or requests), over all of them together (this rank's KV heads): an aggregate, for /metrics."""
        seqs = [s for s in seqs if s.num_computed_tokens and s.block_ids]
        if self.sparsity is None or not seqs:
            return 1.0
        tables = torch.as_tensor(_pad_tables([s.block_ids for s in seqs]), device=self.device)
        lens = torch.tensor([s.num_computed_tokens for s in seqs], device=self.device)
        shares = kept_share(self.kv_cache.sparse, tables, lens)
        return float((shares * lens).sum() / lens.sum())

    def _bytes_per_block(self) -> int:
        """K and V of one block in all layers, in the cache's format (scales and zero points included)."""
        layers, heads, bs, dim = self.kv_shape
        per_token = self.kv_format.bytes_per_token(dim, bs, self.dtype.itemsize)
        if self.sparsity is not None:
            per_token += STATE_BYTES
        return int(layers * heads * bs * per_token)

    def _plan_num_blocks(self) -> int:
        if self.device.type != "cuda":
            useful = self.config.max_num_seqs * self.max_blocks_per_seq
            return max(self.max_blocks_per_seq, min(useful, CPU_KV_CACHE_BYTES // self._bytes_per_block()))
        return self._fit_free(*self._profile_gpu())

    @torch.inference_mode()
    def _profile_gpu(self) -> tuple[int, int]:
        """Run the largest step with a temporary cache, then give the KV cache what memory is left; returns the
        planned blocks and the step's activation peak in bytes (which must stay free beside the cache)."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        non_torch = total - free - torch.cuda.memory_reserved()
        tokens = min(self.config.max_num_batched_tokens, self.max_model_len * self.config.max_num_seqs)
        seq_len = min(self.max_model_len, tokens)
        num_seqs = -(-tokens // seq_len)
        temp_blocks = num_seqs * -(-seq_len // self.block_size)
        temp = self._new_cache(temp_blocks)
        temp.bind(self.attn_layers)
        torch.cuda.reset_peak_memory_stats()
        meta, ids, pos = self._dummy_prefill(tokens, seq_len)
        if self.lora_index is not None:
            self.lora_index.none(tokens)
        hidden = self.model(ids, pos, meta)
        rows = min(self.config.max_num_seqs, tokens)
        self.model.compute_logits(hidden[:rows])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - temp.nbytes
        KVCache.unbind(self.attn_layers)    # the layers' views would keep the temporary cache alive
        del temp, hidden
        torch.cuda.empty_cache()
        budget = total * self.config.gpu_memory_utilization - non_torch - peak - GPU_MEMORY_MARGIN_BYTES
        # A safety net on what is physically free now: memory taken outside PyTorch during the profile (libraries'
        # workspaces, loaded kernels) is not in the formula above. An OPT-30B engine with streamed weights on an
        # H200 planned 18 GiB more KV than was free and failed allocating it.
        activations = peak - torch.cuda.memory_allocated()
        budget = min(budget, torch.cuda.mem_get_info()[0] - activations - GPU_MEMORY_MARGIN_BYTES)
        num_blocks = int(budget // self._bytes_per_block())
        self._require_one_sequence(num_blocks)
        return num_blocks, activations

    def _fit_free(self, num_blocks: int, activations: int) -> int:
        """At most the blocks that fit in what the device has free right now, less the largest step's activations
        and the margin: the profile's plan is checked against the memory actually there when the cache is allocated
        (an OPT-30B engine with streamed weights on an H200 planned 4.7 GiB more than was free even after the
        profile's own check)."""
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(self.device)[0]
        fits = int((free - activations - GPU_MEMORY_MARGIN_BYTES) // self._bytes_per_block())
        self._require_one_sequence(fits)
        if fits < num_blocks:
            log.warning("KV cache: %d blocks planned, %d fit in the memory free now; using %d", num_blocks, fits,
                        fits)
        return min(num_blocks, fits)

    def _require_one_sequence(self, num_blocks: int) -> None:
        if num_blocks < self.max_blocks_per_seq:
            raise RuntimeError(
                f"only {max(num_blocks, 0)} KV blocks fit in GPU memory but one sequence of max_model_len "
                f"{self.max_model_len} needs {self.max_blocks_per_seq}: raise gpu_memory_utilization or lower "
                "max_model_len / max_num_batched_tokens")

    def _dummy_prefill(self, tokens: int, seq_len: int):
        dev = self.device
        lens = [min(seq_len, tokens - i) for i in range(0, tokens, seq_len)]
        per_seq = -(-seq_len // self.block_size)
        tables = torch.arange(len(lens) * per_seq, dtype=torch.int32, device=dev).view(len(lens), per_seq)
        pos = torch.cat([torch.arange(n, device=dev) for n in lens])
        seq_idx = torch.cat([torch.full((n,), i, device=dev) for i, n in enumerate(lens)])
        slots = (tables[seq_idx, pos // self.block_size].long() * self.block_size + pos % self.block_size)
        lens_t = torch.tensor(lens, dtype=torch.int32, device=dev)
        meta = AttentionMetadata(
            slot_mapping=slots, num_decode_tokens=0, decode_seq_lens=lens_t[:0], decode_block_tables=tables[:0],
            prefill_cu_seqlens_q=torch.cat([lens_t.new_zeros(1), lens_t.cumsum(0).int()]),
            prefill_seq_lens=lens_t, prefill_block_tables=tables, max_prefill_query_len=max(lens))
        vocab = self.hf_config.vocab_size
        ids = torch.randint(0, vocab, (tokens,), device=dev)
        return meta, ids, pos.long()


def resolve_max_model_len(config: EngineConfig, hf_config) -> int:
    """The longest sequence (prompt + output) the engine accepts: the config's, capped by the model's."""
    model_max = getattr(hf_config, "max_position_embeddings", None) or 2048
    if config.max_model_len is None:
        return model_max
    if config.max_model_len > model_max:
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's max_position_embeddings "
                         f"{model_max}; pass max_model_len <= {model_max}")
    return config.max_model_len


def _sparsity_policy(config: EngineConfig) -> SparsityPolicy | None:
    """--kv-sparsity's policy, or None when off. The attention scores the tokens as it runs: the reference on the
    CPU, the Triton kernels plus a second pass over the keys on a GPU (kernels/attention_importance.py)."""
    if config.kv_sparsity is None:
        return None
    return SparsityPolicy(config.kv_sparsity, config.kv_sink_tokens, config.kv_recent_window, config.kv_importance)


def _decode_only(slots: torch.Tensor, seq_lens: torch.Tensor, tables: torch.Tensor) -> AttentionMetadata:
    """Metadata of a batch of decodes only (captured graphs, continued windows): empty prefill fields."""
    dev = slots.device
    return AttentionMetadata(
        slot_mapping=slots, num_decode_tokens=slots.shape[0], decode_seq_lens=seq_lens, decode_block_tables=tables,
        prefill_cu_seqlens_q=torch.zeros(1, dtype=torch.int32, device=dev),
        prefill_seq_lens=torch.zeros(0, dtype=torch.int32, device=dev),
        prefill_block_tables=torch.zeros(0, 1, dtype=torch.int32, device=dev))


SAMPLING_TENSORS = ("temperatures", "top_k", "top_p", "min_p", "greedy", "seeds")


def _device_sampling(host: SamplingBatch | None, tensors: list[torch.Tensor]) -> SamplingBatch | None:
    """The host-built SamplingBatch with its tensors replaced by their device copies from the step message."""
    if host is None:
        return None
    return replace(host, **dict(zip(SAMPLING_TENSORS, tensors)))


def _pad_tables(tables: list[list[int]]) -> np.ndarray:
    width = max((len(t) for t in tables), default=1)
    out = np.zeros((len(tables), max(width, 1)), dtype=np.int32)
    for row, t in zip(out, tables):
        row[:len(t)] = t
    return out

