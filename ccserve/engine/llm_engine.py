"""The engine step loop: admit requests, schedule, run the model, apply sampled tokens, report outputs.

Single-threaded by design: the server drives it from one thread. Nothing here logs request content.
"""
from __future__ import annotations

import itertools
from pathlib import Path

from ccserve.config import EngineConfig
from ccserve.engine.detokenizer import IncrementalDetokenizer
from ccserve.engine.model_runner import DecodeWindow, ModelRunner
from ccserve.engine.outputs import EngineStats, RequestOutput, TokenLogprob
from ccserve.engine.public_prefixes import build_prefix_cache
from ccserve.engine.scheduler import ScheduledBatch, Scheduler
from ccserve.engine.sequence import Sequence, SequenceStatus
from ccserve.engine.tp_checks import check_tensor_parallel_setup
from ccserve.engine.tp_workers import WorkerExited, WorkerGroup
from ccserve.kv.block_pool import BlockPool
from ccserve.layers.sampler import SamplerOutput
from ccserve.sampling_params import SamplingParams
from ccserve.secure import IntegrityError
from ccserve.secure.totals import CryptoTotals

SWAP_PREFETCH_DEPTH = 2    # swapped requests sealed ahead (pipelined mode)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config)
        self.runner = start_runner(config)
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.hf_config.vocab_size
        self.model_name = config.extra.get("served_model_name") or Path(config.model).name
        capacity = self.runner.num_blocks * config.block_size
        if capacity < self.max_model_len:
            raise ValueError(f"the KV cache holds {capacity} tokens, less than max_model_len {self.max_model_len}: "
                             "lower max_model_len or give the cache more memory")
        self.pool = BlockPool(self.runner.num_blocks)
        if config.enable_prefix_caching:
            raise ValueError("per-tenant prefix caching (enable_prefix_caching) is not built yet: declare public "
                             "prefixes instead (--public-prefix-file, docs/privacy.md)")
        self.prefix_cache = build_prefix_cache(config.public_prefixes, self.tokenizer, self.runner, self.pool,
                                               config.block_size, config.max_num_batched_tokens)
        # Sealed collectives ran already (profile, graph warm-up, public prefixes): a message tampered with at start
        # fails the start, not the first request.
        self.runner.tp.verify()
        if self.pool.num_free * config.block_size < self.max_model_len:
            raise ValueError(f"after the public prefixes' {self.prefix_cache.num_blocks} KV blocks the cache holds "
                             f"{self.pool.num_free * config.block_size} tokens, less than max_model_len "
                             f"{self.max_model_len}: declare fewer prefixes, lower max_model_len or give the cache "
                             "more memory")
        self._swapped: dict[int, Sequence] = {}     # swap owner number -> request, for requests swapped once
        self._swap_numbers = itertools.count()
        self.scheduler = Scheduler(self.pool, config.block_size, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.swap_threshold, config.max_loras if config.lora_adapters else None)
        self.lora_names: list[str] = list(config.lora_adapters)
        self.eos_token_ids = eos_ids(self.runner.hf_config, self.tokenizer)
        self.requests: dict[str, Sequence] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._window: DecodeWindow | None = None     # a decode window enqueued but not yet applied

    # ---- requests --------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    lora: str | None = None) -> None:
        """Validate and queue a request (with `lora`, through that configured LoRA adapter); raises ValueError
        naming what is wrong."""
        if request_id in self.requests:
            raise ValueError("request_id is already in use by an unfinished request")
        if lora is not None and lora not in self.lora_names:
            known = ", ".join(repr(n) for n in self.lora_names) or "none (start with --lora NAME=DIR)"
            raise ValueError(f"unknown LoRA adapter {lora!r}: this engine serves {known}")
        token_ids = self._tokenize(prompt)
        if not token_ids:
            raise ValueError("prompt is empty: send at least one token")
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens but max_model_len is {self.max_model_len}: "
                             "shorten the prompt (it must leave room for at least one output token)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine runs without one (use stop_token_ids)")
        seq = Sequence(request_id, token_ids, params)
        seq.lora = lora
        if lora is None:    # an adapter changes every layer's keys and values, the prefix's too
            seq.shared_block_ids = self.prefix_cache.match(token_ids)
        seq.stop_token_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        if self.tokenizer is not None and params.detokenize:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        self.prompt_tokens_total += len(token_ids)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its KV blocks are freed and scrubbed at once. Unknown ids are ignored."""
        seq = self.requests.pop(request_id, None)
        if seq is None or seq.finished:
            return
        self._finish(seq, "abort")
        self.runner.scrub(self.pool.take_blocks_to_scrub())
        self._drop_finished_window()
        self._scrub_if_idle()

    def _scrub_if_idle(self) -> None:
        """Once the last request is gone and no decode window is in flight, clear what the runner still holds
        of it (graph inputs and activations, cached pinned host blocks): ModelRunner.scrub_idle."""
        if self._window is None and not self.scheduler.has_unfinished():
            self.runner.scrub_idle()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_free_blocks=self.pool.num_free, num_total_blocks=self.pool.num_blocks,
            num_preemptions=self.scheduler.num_preemptions, prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            kv_capacity_tokens=self.pool.num_blocks * self.config.block_size,
            kv_format_compression=self.runner.kv_format_compression,
            kv_kept_share=self.runner.kept_share(self.scheduler.running),
            lora_loads=self.runner.lora.loads if self.runner.lora else 0,
            lora_hits=self.runner.lora.hits if self.runner.lora else 0,
            num_public_prefix_blocks=self.prefix_cache.num_blocks,
            prefix_cache_hits=self.scheduler.num_prefix_hits,
            prefix_cache_tokens_saved=self.scheduler.num_prefix_tokens_saved,
            crypto=self._crypto_totals())

    def _crypto_totals(self) -> CryptoTotals:
        """Every channel the engine moves data through: steps and tokens (the boundary), KV swap, LoRA adapter
        loads, streamed weights."""
        totals = self.runner.boundary.totals()
        if self.runner.swapper is not None:
            totals.add(self.runner.swapper.totals())
        if self.runner.lora is not None:
            totals.add(self.runner.lora.totals())
        if self.runner.weights is not None:
            totals.add_channel(self.runner.weights.loader.channel)
        return totals

    # ---- the step --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release what the engine holds besides memory: the tensor-parallel workers, and every channel's keys
        and crypto worker threads (steps and KV swap, LoRA adapter loads, streamed weights). Idempotent; the
        engine is not used afterwards."""
        if self.runner.peers is not None:
            self.runner.drop_graphs()
            self.runner.peers.close()
        self.runner.boundary.close()
        if self.runner.swapper is not None:
            self.runner.swapper.close()
        if self.runner.weights is not None:
            self.runner.weights.close()
        if self.runner.lora is not None:
            self.runner.lora.close()

    def step(self) -> list[RequestOutput]:
        """Schedule and run one batch (several decode steps when that is safe). Outputs cover every request
        that sampled a token or finished. Under tensor parallelism, a failed step leaves the ranks out of step
        (or one of them is gone): the group is ended and every request fails with the reason."""
        if self.runner.peers is None:
            outputs = self._step()
            self._scrub_if_idle()
            return outputs
        try:
            if self.runner.peers.failure is not None:
                raise WorkerExited(self.runner.peers.failure)
            outputs = self._step()
            # A worker that died during the step had its NCCL communicators aborted by the monitor, which records
            # the failure first: the aborted collectives returned partial sums, so this step's tokens are void.
            if self.runner.peers.failure is not None:
                raise WorkerExited(self.runner.peers.failure)
            self._scrub_if_idle()
            return outputs
        except Exception as exc:
            reason = self.runner.peers.lost_reason() or f"tensor-parallel rank 0 failed ({type(exc).__name__})"
            self.runner.drop_graphs()   # before the group goes (NCCL waits for graphs on its communicator)
            self.runner.peers.lose(reason)
            self._fail(list(self.requests.values()))
            raise WorkerExited(reason) from exc

    def _step(self) -> list[RequestOutput]:
        if self._window is not None:
            return self._finish_window(self._window)
        if self.runner.swapper is not None:
            self._settle_swaps()
        batch = self.scheduler.schedule()
        if batch.swap_out:
            self._swap_out(batch)
        # Blocks freed by preemption inside schedule() may already belong to a new owner: zero them now,
        # before this step writes the new owner's keys and values into them.
        self.runner.scrub(self.pool.take_blocks_to_scrub())
        if batch.swap_in:
            self._swap_in(batch)
        if self.runner.swapper is not None:
            self._prefetch_swap_ins()
        if batch.empty:
            return []
        if self.runner.lora is not None:
            self._load_adapters(batch)
        steps = self._decode_steps(batch)
        if steps > 1:
            try:
                window = self.runner.execute_decodes(batch.decodes, steps)
            except Exception as exc:
                self._fail(batch.decodes, exc)
                raise
            return self._finish_window(window)
        try:
            seqs, sampled = self.runner.execute(batch)
            if sampled is not None:
                fetch = self.runner.boundary.to_host
                tokens = fetch(sampled.token_ids).tolist()
                self.runner.tp.verify()     # sealed collectives: no message of this step failed (docs/tp.md)
                logprobs = [_logprob_rows(sampled, len(seqs), fetch)] if sampled.logprobs is not None else None
        except Exception as exc:
            self._fail([seq for seq, _ in batch.items()], exc)
            raise
        for seq, n in batch.items():
            seq.num_computed_tokens += n
        if sampled is not None:
            self._apply(seqs, [[t] for t in tokens], logprobs)
        return self._outputs(seqs)

    # ---- encrypted KV swap -----------------------------------------------------------------------------

    def _swap_out(self, batch: ScheduledBatch) -> None:
        """Move preempted requests' KV to the host store; a request whose KV cannot leave intact ends."""
        for seq, block_ids in batch.swap_out:
            if seq.swap_owner is None:
                seq.swap_owner = next(self._swap_numbers)
                self._swapped[seq.swap_owner] = seq
            try:
                self.runner.swap_out(seq.swap_owner, block_ids)
            except IntegrityError as exc:
                self._fail([seq], exc)

    def _settle_swaps(self, until: Sequence | None = None) -> bool:
        """Store the swap-outs that reached the host (all up to `until`'s, waiting for them, when given); end the
        requests whose KV did not arrive intact. Returns whether any request ended."""
        failed = self.runner.settle_swaps(None if until is None else until.swap_owner)
        for owner, exc in failed:
            self._fail([self._swapped[owner]], exc)
        return bool(failed)

    def _swap_in(self, batch: ScheduledBatch) -> None:
        """Bring swapped requests' KV back; a request whose stored or transferred KV fails authentication ends
        (reason "error") and leaves the batch, the others run."""
        ended = False
        for seq, block_ids in batch.swap_in:
            ended |= self._settle_swaps(until=seq)
            if seq.finished:
                continue
            try:
                self.runner.swap_in(seq.swap_owner, block_ids)
            except IntegrityError as exc:
                ended = True
                self._fail([seq], exc)
                self.runner.swapper.reset_if_failed()
        if ended:
            batch.decodes = [s for s in batch.decodes if not s.finished]
            batch.prefills = [(s, n) for s, n in batch.prefills if not s.finished]

    def _prefetch_swap_ins(self) -> None:
        """Tell the swapper which swapped requests the scheduler brings back next (the front of the waiting
        queue, where preempted requests wait), so pipelined mode seals them ahead."""
        upcoming = []
        for seq in self.scheduler.waiting:
            if seq.num_computed_tokens == 0:
                break
            upcoming.append(seq)
            if len(upcoming) == SWAP_PREFETCH_DEPTH:
                break
        if upcoming:
            self.runner.prefetch_swaps([s.swap_owner for s in upcoming])

    # ---- LoRA adapters --------------------------------------------------------------------------------

    def _load_adapters(self, batch: ScheduledBatch) -> None:
        """Make the batch's adapters resident in the GPU adapter cache, then tell the cache which adapters the
        waiting queue needs next (in admission order), so pipelined mode seals them ahead. An adapter message that
        fails authentication fails the step's requests, as a step message does, and re-keys the adapter channel."""
        cache = self.runner.lora
        upcoming: list[str] = []
        for seq in self.scheduler.waiting:
            if seq.lora is not None and seq.lora not in upcoming:
                upcoming.append(seq.lora)
                if len(upcoming) == cache.num_slots:
                    break
        try:
            self.runner.load_adapters({s.lora for s, _ in batch.items() if s.lora is not None}, upcoming)
        except IntegrityError as exc:
            self._fail([s for s, _ in batch.items()], exc)
            cache.reset_if_failed()
            raise

    def _finish_window(self, window: DecodeWindow) -> list[RequestOutput]:
        """Enqueue the window that continues this one (when that is safe) before reading this one, so the
        GPU computes the next window while the host applies this one's tokens."""
        self._window = None
        try:
            self._window = self._continuation(window)
            rows = window.token_rows()
            self.runner.tp.verify(window.links_check)   # sealed collectives: none of this window's failed
        except Exception as exc:
            self._fail(window.seqs, exc)
            raise
        live = [i for i, s in enumerate(window.seqs) if not s.finished]
        seqs = [window.seqs[i] for i in live]
        for seq in seqs:
            seq.num_computed_tokens += 1          # the window's first input token
        logprobs = None
        if window.wants_logprobs:
            logprobs = [[step[i] for i in live] for step in
                        (_logprob_rows(out, len(window.seqs), self.runner.boundary.to_host)
                         for out in window.outputs)]
        self._apply(seqs, [rows[i] for i in live], logprobs)
        self._drop_finished_window()
        return self._outputs(seqs)

    def _drop_finished_window(self) -> None:
        """Forget an enqueued window all of whose rows have finished: nobody will step it, and it must not keep
        their sequences (and so their tokens) alive in host memory. Its GPU work completes unread."""
        if self._window is not None and all(s.finished for s in self._window.seqs):
            self._window = None

    def _continuation(self, window: DecodeWindow) -> DecodeWindow | None:
        """The next window of the same sequences, enqueued before this one's tokens are known, or None.

        Only when nothing else could be scheduled instead: no logprobs to read back, every running
        sequence is in the window (none would starve), and no waiting request could be admitted once this
        window ends. Rows that stop inside this window compute a few wasted tokens in the next one (never
        shown); rows certain to reach their length limit inside it are left out. Blocks for both windows
        are reserved now; without enough free blocks there is no continuation (never a preemption).
        """
        steps, scheduler = window.steps, self.scheduler
        alive = [s for s in window.seqs if not s.finished]
        if window.wants_logprobs or not alive or len(alive) != len(scheduler.running):
            return None
        seqs = [s for s in alive if self._room(s) > steps]     # the rest end inside this window
        if scheduler.waiting and (len(seqs) < len(alive) or len(scheduler.running) < self.config.max_num_seqs):
            return None
        # num_computed_tokens is the position of this window's first input until the window is applied.
        if not seqs or any(s.num_computed_tokens + 2 * steps > self.max_model_len for s in seqs):
            return None
        if not scheduler.reserve_decode_steps(seqs, 2 * steps):
            return None
        return self.runner.execute_decodes(seqs, steps, after=window)

    def _room(self, seq: Sequence) -> int:
        """How many more tokens seq may generate (max_tokens, max_model_len)."""
        return min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens)

    def _outputs(self, seqs: list[Sequence]) -> list[RequestOutput]:
        outputs = [self._output(seq) for seq in seqs if seq.num_sent_tokens < seq.num_output_tokens or seq.finished]
        self.runner.scrub(self.pool.take_blocks_to_scrub())
        return outputs

    def _decode_steps(self, batch: ScheduledBatch) -> int:
        """How many decode steps to run on the device before the host looks at the tokens."""
        steps = self.config.num_decode_steps
        if steps == 1 or batch.prefills or any(s.num_uncomputed_tokens != 1 for s in batch.decodes):
            return 1
        # A sequence that stops inside the window wastes a few rows of a bandwidth-bound step; capping the
        # window at the nearest max_tokens would instead cost every sequence a host round trip.
        steps = min([steps] + [self.max_model_len - s.num_tokens + 1 for s in batch.decodes])
        if steps < 2 or not self.scheduler.reserve_decode_steps(batch.decodes, steps):
            return 1
        return steps

    def _apply(self, seqs: list[Sequence], rows: list[list[int]],
               logprobs: list[list[tuple[float, list[tuple[int, float]]] | None]] | None) -> None:
        """Append each sequence's sampled tokens (rows[i]: one per step) up to its first stop; finish those
        that stop. logprobs, when asked: per step, per row.

        Of the m tokens a sequence accepts from a multi-step window, the first m - 1 were fed back and
        computed on the device, so they count as computed."""
        for b, (seq, row) in enumerate(zip(seqs, rows)):
            if seq.finished:
                continue
            tokens, reason = self._accept(seq, row)
            seq.append_tokens(tokens)
            seq.num_computed_tokens += len(tokens) - 1
            self.generation_tokens_total += len(tokens)
            if seq.logprobs is not None and logprobs is not None:
                for token, step in zip(tokens, logprobs):
                    lp, top = step[b]
                    seq.logprobs.append(TokenLogprob(token, lp, dict(top[:seq.params.logprobs])))
            if reason is not None:
                self._finish(seq, reason)
                self.requests.pop(seq.request_id, None)

    def _accept(self, seq: Sequence, row: list[int]) -> tuple[list[int], str | None]:
        """The prefix of a sequence's new tokens it keeps, and why it stops ("stop" wins over "length")."""
        params = seq.params
        room = min(params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens)
        take, reason = (room, "length") if room <= len(row) else (len(row), None)
        for i in range(take):
            if row[i] in seq.stop_token_ids:
                take, reason = i + 1, "stop"
                break
        tokens = row[:take]
        detok = seq.detokenizer
        if detok is None:
            return tokens, reason
        if not params.stop:
            detok.append(tokens)
            return tokens, reason
        for i, token in enumerate(tokens):
            detok.append([token])
            if detok.stopped:
                return tokens[:i + 1], "stop"
        return tokens, reason

    def _output(self, seq: Sequence) -> RequestOutput:
        if seq.finished and seq.detokenizer is not None:
            seq.detokenizer.flush()
        text = seq.detokenizer.text if seq.detokenizer is not None else ""
        out_ids = seq.output_token_ids
        new_ids = out_ids[seq.num_sent_tokens:]
        new_text = text[seq.num_sent_chars:]
        new_lps = seq.logprobs[seq.num_sent_tokens:] if seq.logprobs is not None else None
        seq.num_sent_tokens, seq.num_sent_chars = len(out_ids), len(text)
        return RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids, token_ids=out_ids, text=text,
            new_token_ids=new_ids, new_text=new_text, finished=seq.finished, finish_reason=seq.finish_reason,
            logprobs=seq.logprobs, new_logprobs=new_lps)

    def _finish(self, seq: Sequence, reason: str) -> None:
        """End a request: free (and later scrub) its blocks, and shred whatever of it rests on the host."""
        self.scheduler.finish(seq, reason)
        if seq.swap_owner is not None:
            self.runner.end_swap(seq.swap_owner)
            self._swapped.pop(seq.swap_owner, None)
            seq.swap_owner = None

    def _fail(self, seqs: list[Sequence], exc: BaseException | None = None) -> None:
        """A failed step ends the requests it carried (and frees their blocks); others keep going. After an
        integrity failure (a message altered on the wire) nothing of the message was released and the channel
        is re-keyed, so the next step runs on fresh keys."""
        reason = "error" if isinstance(exc, IntegrityError) else "abort"
        for seq in seqs:
            if seq.status is not SequenceStatus.FINISHED:
                self._finish(seq, reason)
                self.requests.pop(seq.request_id, None)
        self.runner.boundary.reset_if_failed()
        self._drop_finished_window()
        self.runner.scrub(self.pool.take_blocks_to_scrub())

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: send prompt token ids instead of text")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if not isinstance(prompt, (list, tuple)):
            raise ValueError("prompt must be a string or a list of token ids")
        return list(prompt)


def start_runner(config: EngineConfig) -> ModelRunner:
    """Size 1: the runner, as always. Size N: check that the group can work before anything starts (shapes,
    GPUs, memory), start ranks 1..N-1, then build rank 0's runner here; a failure ends the workers."""
    if config.tensor_parallel_size == 1:
        return ModelRunner(config)
    check_tensor_parallel_setup(config)
    workers = WorkerGroup(config)
    try:
        return ModelRunner(config, workers.tp, workers)
    except BaseException as exc:
        reason = workers.lost_reason()  # a worker that died while loading is why rank 0's collective failed
        workers.close()
        if reason is not None:
            raise WorkerExited(reason) from exc
        raise


def load_tokenizer(config: EngineConfig):
    """The HF tokenizer of the model directory; None for dummy benchmark configs that ship none."""
    from transformers import AutoTokenizer

    path = Path(config.tokenizer or config.model)
    has_files = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    if not has_files:
        if config.load_format == "dummy":
            return None
        raise ValueError(f"no tokenizer files in {str(path)!r}: pass tokenizer=DIR")
    return AutoTokenizer.from_pretrained(path)


def eos_ids(hf_config, tokenizer) -> frozenset[int]:
    ids = getattr(hf_config, "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _logprob_rows(sampled: SamplerOutput, n: int, fetch) -> list[tuple[float, list[tuple[int, float]]] | None]:
    """Per-row (sampled logprob, [(top id, top logprob), ...]) in one device->host transfer each (`fetch`: the
    runner's boundary, a sealed message under cc)."""
    if sampled.logprobs is None:
        return [None] * n
    lps = fetch(sampled.logprobs).tolist()
    if sampled.top_ids is None:
        return [(lp, []) for lp in lps]
    ids, vals = fetch(sampled.top_ids).tolist(), fetch(sampled.top_logprobs).tolist()
    return [(lp, list(zip(i, v))) for lp, i, v in zip(lps, ids, vals)]
