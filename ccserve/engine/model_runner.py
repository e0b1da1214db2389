"""Runs the model for one scheduled batch: builds the step's tensors, replays CUDA graphs for decodes,
samples, and owns the KV cache memory (sizing, allocation, scrubbing)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ccserve.config import EngineConfig
from ccserve.engine.boundary import Boundary
from ccserve.engine.scheduler import ScheduledBatch
from ccserve.engine.sequence import Sequence
from ccserve.kv.cache import KVCache
from ccserve.kv.formats import kv_format
from ccserve.layers.attention import Attention, AttentionMetadata
from ccserve.layers.sampler import Sampler, SamplerOutput, SamplingBatch
from ccserve.models.loader import load_model
from ccserve.secure import PendingHost

CPU_KV_CACHE_BYTES = 2 << 30
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
        return self.host_tokens.tolist()


@dataclass
class StepInputs:
    """Host-built tensors of one step, already on the device."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_indices: torch.Tensor
    sampling_seqs: list[Sequence]
    sampling: SamplingBatch | None = None   # cc mode: came over in the step's message


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.torch_device
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        torch.manual_seed(config.seed)
        self.model, self.hf_config = load_model(config)
        self.dtype = next(self.model.parameters()).dtype
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.block_size = config.block_size
        self.max_model_len = resolve_max_model_len(config, self.hf_config)
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.sampler = Sampler()
        self.boundary = Boundary(config, self.device)
        layer = self.attn_layers[0]
        self.kv_shape = (len(self.attn_layers), layer.num_kv_heads, self.block_size, layer.head_dim)
        self.kv_format = kv_format(config.kv_format).resolve(layer.head_dim, self.block_size)
        num_blocks = config.num_gpu_blocks or self._profile_num_blocks()
        self.kv_cache = self._new_cache(num_blocks)
        self.kv_cache.bind(self.attn_layers)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if self.device.type == "cuda" and not config.enforce_eager:
            self._capture_decode_graphs()

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    def _new_cache(self, num_blocks: int) -> KVCache:
        return KVCache(*self.kv_shape, num_blocks=num_blocks, dtype=self.dtype, device=self.device,
                       kv_format=self.kv_format)

    # ---- one step -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], SamplerOutput | None]:
        """Run one batch; returns the sequences that sampled a token and what the sampler gave them."""
        inputs = self._prepare(batch)
        hidden = self._forward(inputs, batch)
        if not inputs.sampling_seqs:
            return [], None
        logits = self.model.compute_logits(hidden[inputs.sample_indices])
        batch_params = inputs.sampling or SamplingBatch.build([s.params for s in inputs.sampling_seqs], self.device)
        positions = inputs.positions[inputs.sample_indices]
        return inputs.sampling_seqs, self.sampler(logits, batch_params, positions)

    @torch.inference_mode()
    def execute_decodes(self, seqs: list[Sequence], steps: int, after: DecodeWindow | None = None) -> DecodeWindow:
        """Enqueue `steps` decode steps of `seqs` without returning to the host in between: each step's
        sampled tokens are the next step's inputs, positions and slots advance on the device. With `after`,
        the window continues that earlier window on the device (its last tokens are this window's first
        inputs) before the host has read it, so the host's work on one window overlaps the GPU's next one.
        The caller has reserved blocks for all steps; tokens after a stop are discarded by the caller."""
        batch = ScheduledBatch(decodes=seqs)
        inputs = self._prepare(batch) if after is None else self._continue(seqs, after)
        meta = inputs.meta
        sampling = inputs.sampling or SamplingBatch.build([s.params for s in seqs], self.device)
        outputs: list[SamplerOutput] = []
        for step in range(steps):
            if step:
                positions = inputs.positions + 1
                meta = replace(meta, slot_mapping=self._slots(meta.decode_block_tables, positions),
                               decode_seq_lens=meta.decode_seq_lens + 1)
                inputs = replace(inputs, input_ids=outputs[-1].token_ids, positions=positions, meta=meta)
            hidden = self._forward(inputs, batch)
            outputs.append(self.sampler(self.model.compute_logits(hidden), sampling, inputs.positions))
        return DecodeWindow.start(seqs, outputs, inputs.positions, self.boundary)

    def _continue(self, seqs: list[Sequence], after: DecodeWindow) -> StepInputs:
        """The first step's inputs of a window that follows `after` on the device, for the rows of `seqs`
        (a subset of after.seqs, in order); block tables come from the host, which has grown them."""
        row_of = {id(s): i for i, s in enumerate(after.seqs)}
        arrays = [np.asarray([row_of[id(s)] for s in seqs], dtype=np.int64), _pad_tables([s.block_ids for s in seqs])]
        sampling = self._host_sampling(seqs, arrays)
        rows, tables, *rest = self.boundary.to_device(arrays)
        positions = after.last_positions[rows] + 1
        meta = _decode_only(self._slots(tables, positions), (positions + 1).to(torch.int32), tables)
        return StepInputs(after.last_ids[rows], positions, meta, torch.arange(len(seqs), device=self.device),
                          list(seqs), _device_sampling(sampling, rest))

    def _slots(self, tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cache slot of each row's token at `positions`, looked up on the device."""
        blocks = tables.gather(1, (positions // self.block_size).unsqueeze(1)).squeeze(1)
        return blocks.long() * self.block_size + positions % self.block_size

    def scrub(self, block_ids: list[int]) -> None:
        """Zero freed blocks in one batched operation (stateless computation)."""
        if block_ids:
            self.kv_cache.scrub(block_ids)

    def _forward(self, inputs: StepInputs, batch: ScheduledBatch) -> torch.Tensor:
        num_tokens = inputs.input_ids.shape[0]
        if not batch.prefills and self.graphs:
            graph_bs = next((b for b in sorted(self.graphs) if b >= num_tokens), None)
            if graph_bs is not None:
                return self._replay(inputs, graph_bs)[:num_tokens]
        return self.model(inputs.input_ids, inputs.positions, inputs.meta)

    def _prepare(self, batch: ScheduledBatch) -> StepInputs:
        """Flatten the batch into token, position and slot arrays (decodes first) and copy them over."""
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
        slots, d_lens, d_tables, cu, p_lens, p_tables, ids_t, pos_t, idx_t, *rest = self.boundary.to_device(arrays)
        meta = AttentionMetadata(
            slot_mapping=slots, num_decode_tokens=nd, decode_seq_lens=d_lens, decode_block_tables=d_tables,
            prefill_cu_seqlens_q=cu, prefill_seq_lens=p_lens, prefill_block_tables=p_tables,
            max_prefill_query_len=max((n for _, n in batch.prefills), default=0),
        )
        return StepInputs(ids_t, pos_t, meta, idx_t, sampling, _device_sampling(host_sampling, rest))

    def _host_sampling(self, seqs: list[Sequence], arrays: list[np.ndarray]) -> SamplingBatch | None:
        """Under cc, the step's sampling settings travel in its one message: build them on the host and append
        their arrays to `arrays`. With cc off they are built on the device later, as always (None)."""
        if not self.boundary.cc or not seqs:
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
            self.model(self.g_ids[:bs], self.g_pos[:bs], meta)  # warm-up (Triton compile) outside capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(self.g_ids[:bs], self.g_pos[:bs], meta)
            pool = graph.pool()
            self.graphs[bs] = (graph, out)
            torch.cuda.synchronize()

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
        graph, out = self.graphs[graph_bs]
        graph.replay()
        return out

    # ---- sizing the KV cache ---------------------------------------------------------------------------

    def _bytes_per_block(self) -> int:
        """K and V of one block in all layers, in the cache's format (scales and zero points included)."""
        layers, heads, bs, dim = self.kv_shape
        return int(layers * heads * bs * self.kv_format.bytes_per_token(dim, bs, self.dtype.itemsize))

    def _profile_num_blocks(self) -> int:
        if self.device.type != "cuda":
            useful = self.config.max_num_seqs * self.max_blocks_per_seq
            return max(self.max_blocks_per_seq, min(useful, CPU_KV_CACHE_BYTES // self._bytes_per_block()))
        return self._profile_gpu()

    @torch.inference_mode()
    def _profile_gpu(self) -> int:
        """Run the largest step with a temporary cache, then give the KV cache what memory is left."""
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
        hidden = self.model(ids, pos, meta)
        rows = min(self.config.max_num_seqs, tokens)
        self.model.compute_logits(hidden[:rows])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - temp.nbytes
        del temp, hidden
        torch.cuda.empty_cache()
        budget = total * self.config.gpu_memory_utilization - non_torch - peak - GPU_MEMORY_MARGIN_BYTES
        num_blocks = int(budget // self._bytes_per_block())
        if num_blocks < self.max_blocks_per_seq:
            raise RuntimeError(
                f"only {max(num_blocks, 0)} KV blocks fit in GPU memory but one sequence of max_model_len "
                f"{self.max_model_len} needs {self.max_blocks_per_seq}: raise gpu_memory_utilization or lower "
                "max_model_len / max_num_batched_tokens")
        return num_blocks

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

