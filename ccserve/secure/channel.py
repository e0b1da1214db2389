"""The encrypted host<->GPU channel: every byte that crosses is AES-256-GCM sealed, as H100 confidential computing does.

A recipe: callers move tensors and never see a key or an IV.

    ch = Channel("cuda", mode="pipelined", threads=8, predictor=CyclicPredictor())
    w = ch.to_device(host_tensor)    # CPU seals into a pinned bounce buffer; GPU verifies, then decrypts
    h = ch.to_host(gpu_tensor)       # GPU seals; CPU verifies and decrypts into ordinary (private) memory

Modes: "off" copies in the clear (the no-CC baseline); "naive" seals on demand on the critical path, as the CC driver
does; "pipelined" seals predicted transfers ahead on worker threads (pipeline.py) and falls back to naive.

Data path per direction: one session key (random per process, in memory only), lock-step IV counters per lane,
chunked GCM messages (ccserve.kernels.aes_gcm). H2D has two lanes: speculative (pre-sealed, IV order fixed when
planned) and direct (everything unpredicted), so an unpredicted transfer never invalidates the speculation queue.
A message that fails authentication raises IntegrityError, leaves zeros where plaintext would be, and fails the
channel closed. On a CUDA device, copies and kernels run on the channel's own stream, so they overlap compute on
the caller's stream; each call returns once its data is verified. Each direction has its own stream: an H2D
message never queues behind a D2H seal that waits for the compute producing its source (the engine seals a decode
window's tokens as soon as it is enqueued; one shared stream made the next step's inputs wait for that whole
window, and the host could no longer run ahead of the GPU). Both run at high priority: the host waits for an H2D
verdict before it enqueues the step, and for a window's D2H tokens while the next window computes; their short
kernels must not queue behind that window's.
"""
from __future__ import annotations

import contextlib
import time
import weakref
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from ccserve.kernels.aes_gcm import (
    DeviceKey,
    alloc_plain,
    alloc_wire,
    check_chunk_bytes,
    gcm_decrypt,
    gcm_encrypt,
    num_chunks,
    wire_bytes,
)
from ccserve.secure.cpu_crypto import CpuCipher, WorkerPool
from ccserve.secure.errors import ChannelClosed, IntegrityError
from ccserve.secure.iv import IVCursor, IVSequence, Lane
from ccserve.secure.keys import SessionKeys
from ccserve.secure.pipeline import Pipeline
from ccserve.secure.predictor import Forget, Hint, Predictor, SwapOut
from ccserve.secure.stamp import VALIDATIONS

MODES = ("off", "naive", "pipelined")
PREDICT_DEPTH = 64


@dataclass
class Sealed:
    """A message crossing the boundary. `wire` (ciphertext and tags) sits in shared memory: untrusted. The rest
    is the trusted request the receiver already knows (size, type, lane); the IV is never carried."""

    wire: torch.Tensor
    nbytes: int
    lane: Lane
    shape: torch.Size
    dtype: torch.dtype


@dataclass
class PendingHost:
    """A device->host message on its way (Channel.to_host_async): `result()` gives the verified plaintext."""

    channel: Channel
    sealed: Sealed | None
    event: torch.cuda.Event | None
    out: torch.Tensor | None = None

    def result(self) -> torch.Tensor:
        return self.channel._collect(self)

    @property
    def ready(self) -> bool:
        """Whether result() would not wait for the device (the message is on the host, or already opened)."""
        return self.out is not None or self.event is None or self.event.query()


@dataclass
class ChannelStats:
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    sealed_on_demand_bytes: int = 0
    seal_s: float = 0.0         # critical-path time sealing on demand (naive mode, and pipeline misses)
    open_s: float = 0.0         # host time waiting for device->host messages and verifying/decrypting them


class Channel:
    """One encrypted channel to one device, used from one thread.

    threads: CPU workers for sealing and opening. chunk_bytes: bytes per IV (a power of two). predictor, budget_bytes
    (bytes sealed ahead at most), validation ("version" or "hash") and relinquish ("skip" or "drain") matter in
    "pipelined" mode only. device_backend: "triton" or "ref" for the device side (default: Triton on CUDA, OpenSSL
    on CPU).
    """

    def __init__(self, device: torch.device | str = "cuda", mode: str = "naive", threads: int = 4,
                 chunk_bytes: int = 1 << 20, predictor: Predictor | None = None, budget_bytes: int = 1 << 30,
                 validation: str = "version", relinquish: str = "skip", device_backend: str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if validation not in VALIDATIONS:
            raise ValueError(f"validation must be one of {VALIDATIONS}, got {validation!r}")
        check_chunk_bytes(chunk_bytes)
        self.device = torch.device(device)
        self.mode, self.chunk_bytes = mode, chunk_bytes
        self.predictor = predictor or Predictor()
        self.stats = ChannelStats()
        self._cuda = self.device.type == "cuda"
        self._h2d_stream = torch.cuda.Stream(self.device, priority=-1) if self._cuda else None
        self._d2h_stream = torch.cuda.Stream(self.device, priority=-1) if self._cuda else None
        self._sources: dict[Hashable, weakref.ref] = {}
        self._closed = False
        self._failed = False
        self._unread: deque[PendingHost] = deque()
        self.pipeline: Pipeline | None = None
        if mode == "off":
            return
        keys = SessionKeys()
        self._pool = WorkerPool(threads)
        self._host_h2d, self._host_d2h = CpuCipher(keys.h2d, self._pool), CpuCipher(keys.d2h, self._pool)
        self._dev_h2d = DeviceKey(keys.h2d.material(), self.device, device_backend)
        self._dev_d2h = DeviceKey(keys.d2h.material(), self.device, device_backend)
        keys.zeroize()  # from here the keys live only inside the cipher contexts and the GPU tables
        self._send = {lane: IVSequence(lane) for lane in (Lane.H2D_DIRECT, Lane.H2D_SPECULATIVE, Lane.D2H)}
        self._recv = {lane: IVCursor(lane) for lane in (Lane.H2D_DIRECT, Lane.H2D_SPECULATIVE, Lane.D2H)}
        if mode == "pipelined":
            self.pipeline = Pipeline(self._host_h2d, self._send[Lane.H2D_SPECULATIVE], chunk_bytes, budget_bytes,
                                     validation, relinquish, self._cuda)

    # ---- the recipe -------------------------------------------------------------------------------------------

    def to_device(self, src: torch.Tensor, key: Hashable | None = None, out: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """Move a contiguous host tensor to the device; `key` names the transfer for prediction (default: the
        host pointer and size). `out` (cc modes): a contiguous uint8 device buffer of at least the size rounded up
        to 16 bytes to decrypt into, so a caller can keep fixed buffers (weight streaming's ring); the caller
        guarantees nothing on the device uses it until this returns."""
        self._check_open()
        if src.device.type != "cpu" or not src.is_contiguous():
            raise ValueError("to_device takes a contiguous CPU tensor")
        if src.nbytes == 0:
            return torch.empty(src.shape, dtype=src.dtype, device=self.device)
        self.stats.h2d_bytes += src.nbytes
        if self.mode == "off":
            return self._plain_copy(src)
        key = self.register(src, key)
        spec = self.pipeline.claim(key, src) if self.pipeline else None
        self.predictor.observe(key)
        self._plan()
        if spec is not None:
            self._drain(spec.counter)
            return self._open_h2d(Sealed(spec.wire, spec.nbytes, Lane.H2D_SPECULATIVE, src.shape, src.dtype),
                                  skip_to=spec.counter, out=out)
        return self._open_h2d(self.seal_h2d(src), out=out)

    def to_host(self, src: torch.Tensor, key: Hashable | None = None) -> torch.Tensor:
        """Move a device tensor to ordinary host memory. The result is remembered as a future to_device source
        (keyed by `key`, default its pointer and size) and hinted as swapped out, as PipeLLM treats swap-outs."""
        self._check_open()
        if src.nbytes == 0:
            return torch.empty(src.shape, dtype=src.dtype)
        self.stats.d2h_bytes += src.nbytes
        if self.mode == "off":
            return src.to("cpu")
        t0 = time.perf_counter()
        out = self.open_d2h(self.seal_d2h(src))
        self.stats.open_s += time.perf_counter() - t0
        self.hint(SwapOut(self.register(out, key)))
        return out

    def register(self, src: torch.Tensor, key: Hashable | None = None) -> Hashable:
        """Declare a host tensor as the source of future transfers named `key` (default: pointer and size), so
        predictions about it can be sealed before its first transfer. Held weakly. Returns the key."""
        if src.device.type != "cpu" or not src.is_contiguous():
            raise ValueError("register takes a contiguous CPU tensor (the host source of future to_device calls)")
        key = (src.data_ptr(), src.nbytes) if key is None else key
        self._sources[key] = weakref.ref(src)
        return key

    def hint(self, hint: Hint) -> None:
        """Tell the predictor what the engine knows; the pipeline acts on it at once."""
        self.predictor.hint(hint)
        if isinstance(hint, Forget):
            self._sources.pop(hint.key, None)
            if self.pipeline:
                self.pipeline.discard(hint.key)
        self._plan()

    # ---- the two halves of each direction (public so tests and tools can play the attacker in between) --------

    def seal_h2d(self, src: torch.Tensor) -> Sealed:
        """Host half of to_device on the direct lane: seal into a pinned bounce buffer now."""
        self._check_open()
        nbytes = src.nbytes
        t0 = time.perf_counter()
        wire = alloc_wire(nbytes, self.chunk_bytes, "cpu", self._cuda)
        counter = self._send[Lane.H2D_DIRECT].take(num_chunks(nbytes, self.chunk_bytes))
        plain = src.detach().reshape(-1).view(torch.uint8).numpy()
        self._host_h2d.seal(plain, wire.numpy(), nbytes, self.chunk_bytes, Lane.H2D_DIRECT, counter)
        self.stats.seal_s += time.perf_counter() - t0
        self.stats.sealed_on_demand_bytes += nbytes
        return Sealed(wire, nbytes, Lane.H2D_DIRECT, src.shape, src.dtype)

    def open_h2d(self, sealed: Sealed) -> torch.Tensor:
        """Device half of to_device: verify, then decrypt, with the receiver's own next IVs."""
        return self._open_h2d(sealed)

    def to_host_async(self, src: torch.Tensor) -> PendingHost:
        """Start moving a device tensor to ordinary host memory without waiting for the device: it is sealed on
        the channel's stream after the work that produces it; `result()` waits for that message only, then
        verifies and decrypts it. Messages are opened in the order they were started (lock-step IVs), so reading
        a later one first opens, and drops, any earlier one nobody read."""
        self._check_open()
        if self.mode == "off":
            return PendingHost(self, None, None, src.to("cpu"))
        self.stats.d2h_bytes += src.nbytes
        sealed, event = self._seal_d2h(src, wait=False)
        pending = PendingHost(self, sealed, event)
        self._unread.append(pending)
        return pending

    def _collect(self, pending: PendingHost) -> torch.Tensor:
        t0 = time.perf_counter()
        while pending.out is None:
            first = self._unread.popleft()
            if first.event is not None:
                first.event.synchronize()
            first.out = self.open_d2h(first.sealed)
            first.sealed = None
        self.stats.open_s += time.perf_counter() - t0
        return pending.out

    def seal_d2h(self, src: torch.Tensor) -> Sealed:
        """Device half of to_host: seal on the device, copy the wire to a pinned host buffer."""
        return self._seal_d2h(src, wait=True)[0]

    def _seal_d2h(self, src: torch.Tensor, wait: bool) -> tuple[Sealed, torch.cuda.Event | None]:
        self._check_open()
        nbytes = src.nbytes
        counter = self._send[Lane.D2H].take(num_chunks(nbytes, self.chunk_bytes))
        event = None
        if self._cuda:
            self._d2h_stream.wait_stream(torch.cuda.current_stream(self.device))  # src is produced there
            src.record_stream(self._d2h_stream)  # the caller may free src before this stream has read it
        with self._on_stream(self._d2h_stream):
            plain = src.detach().contiguous().reshape(-1).view(torch.uint8)
            if plain.numel() % 16 or plain.data_ptr() % 16:    # whole, aligned blocks for the kernels
                padded = alloc_plain(nbytes, plain.device)
                padded[:nbytes].copy_(plain)
                plain = padded
            wire = alloc_wire(nbytes, self.chunk_bytes, self.device)
            gcm_encrypt(self._dev_d2h, plain, wire, nbytes, self.chunk_bytes, Lane.D2H, counter)
            if self._cuda:
                host = alloc_wire(nbytes, self.chunk_bytes, "cpu", pin=True)
                host.copy_(wire, non_blocking=True)
                if wait:
                    self._d2h_stream.synchronize()
                else:
                    event = torch.cuda.Event()
                    event.record(self._d2h_stream)
                wire = host
        return Sealed(wire, nbytes, Lane.D2H, src.shape, src.dtype), event

    def open_d2h(self, sealed: Sealed) -> torch.Tensor:
        """Host half of to_host: verify and decrypt on the worker threads into ordinary memory."""
        self._check_open()
        start = self._accept(sealed)
        out = torch.empty(sealed.nbytes, dtype=torch.uint8)
        if not self._host_d2h.open(sealed.wire.numpy(), out.numpy(), sealed.nbytes, self.chunk_bytes, Lane.D2H,
                                   start):
            out.zero_()
            self._fail("D2H message failed authentication (tampered, replayed, reordered or truncated)")
        return out.view(sealed.dtype).view(sealed.shape)

    # ---- internals --------------------------------------------------------------------------------------------

    def _open_h2d(self, sealed: Sealed, skip_to: int | None = None, out: torch.Tensor | None = None
                  ) -> torch.Tensor:
        self._check_open()
        if skip_to is not None:
            self._recv[sealed.lane].skip_to(skip_to)
        start = self._accept(sealed)
        nbytes = sealed.nbytes
        with self._on_stream(self._h2d_stream):
            wire = sealed.wire
            if self._cuda:
                wire = alloc_wire(nbytes, self.chunk_bytes, self.device)
                size = wire_bytes(nbytes, self.chunk_bytes)
                wire[:size].copy_(sealed.wire[:size], non_blocking=True)
            if out is None:
                out = alloc_plain(nbytes, self.device)
            ok = gcm_decrypt(self._dev_h2d, wire, out, nbytes, self.chunk_bytes, sealed.lane, start)
            verified = bool(ok.all())  # waits for this stream only, not for compute on the caller's stream
        if not verified:
            out.zero_()
            self._fail("H2D message failed authentication (tampered, replayed, reordered or truncated)")
        if self._cuda:
            out.record_stream(torch.cuda.current_stream(self.device))
        return out[:nbytes].view(sealed.dtype).view(sealed.shape)

    def _accept(self, sealed: Sealed) -> int:
        """Consume the receiver's next IVs for this message after checking the wire is whole."""
        need = wire_bytes(sealed.nbytes, self.chunk_bytes)
        start = self._recv[sealed.lane].accept(num_chunks(sealed.nbytes, self.chunk_bytes))
        wire = sealed.wire
        if wire.dtype != torch.uint8 or not wire.is_contiguous() or wire.numel() < need:
            self._fail(f"{sealed.lane.name} message truncated or malformed: {wire.numel()} of {need} wire bytes")
        return start

    def _plain_copy(self, src: torch.Tensor) -> torch.Tensor:
        with self._on_stream(self._h2d_stream):
            out = src.to(self.device, non_blocking=True)
            if self._cuda:
                self._h2d_stream.synchronize()
                out.record_stream(torch.cuda.current_stream(self.device))
        return out

    def _plan(self) -> None:
        if self.pipeline is None:
            return
        wanted = []
        for key in self.predictor.predict(PREDICT_DEPTH):
            ref = self._sources.get(key)
            src = ref() if ref is not None else None
            if src is not None:
                wanted.append((key, src))
        self.pipeline.plan(wanted)

    def _drain(self, before: int) -> None:
        """relinquish="drain": deliver burned speculations to a sink so the receiver consumes their IVs in order."""
        for spec in self.pipeline.take_burned(before):
            spec.wait()
            self._open_h2d(Sealed(spec.wire, spec.nbytes, Lane.H2D_SPECULATIVE, torch.Size([spec.nbytes]),
                                  torch.uint8), skip_to=spec.counter)

    def _on_stream(self, stream: torch.cuda.Stream | None):
        return torch.cuda.stream(stream) if self._cuda else contextlib.nullcontext()

    @property
    def failed(self) -> bool:
        """True once a message failed authentication: the channel is closed for good; open a new one."""
        return self._failed

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosed("channel is closed: its keys were zeroized")
        if self._failed:
            raise ChannelClosed("channel failed an integrity check earlier and stays closed")

    def _fail(self, msg: str) -> None:
        self._failed = True
        raise IntegrityError(msg)

    def close(self) -> None:
        """Zeroize every key copy this channel holds (OpenSSL contexts dropped, GPU tables overwritten)."""
        if self._closed:
            return
        self._closed = True
        if self.mode == "off":
            return
        if self.pipeline:
            self.pipeline.close()
        self._pool.close()
        if self._cuda:      # kernels still queued on the channel's streams read the key tables
            self._h2d_stream.synchronize()
            self._d2h_stream.synchronize()
        for k in (self._host_h2d, self._host_d2h, self._dev_h2d, self._dev_d2h):
            k.zeroize()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
