"""Weight streaming for models larger than the GPU (--gpu-weight-budget): decoder layers that do not fit live in
host memory and cross into a small ring of GPU buffers in layer order, every forward pass.

Why views into a ring: each streamed layer's parameters are views into one flat slot (slot = its order among the
streamed layers modulo the ring size), set once at start. A transfer is then one copy of one flat buffer per
layer, no parameter is ever re-pointed, and the model code does not know it streams.

When a layer crosses (forward pre-hook on each streamed layer, `before`; forward hook, `after`):
- cc off: layers rest as plaintext in pinned memory. `after(k)` records an event when layer k's compute is done
  and copies the next layer of k's slot (k+ring, or one of the next pass: the cyclic pattern) into it on a side
  CUDA stream (non_blocking, from pinned memory) behind that event; `before(k)` makes the compute stream wait for
  the copy's event. The host never waits, and the bus stays busy while the GPU computes.
- cc naive / pipelined: layers rest as ciphertext in a HostStore under one process key. `before(k)` waits (on the
  host) until the slot's previous layer has computed, opens layer k from the store into private staging memory
  and sends it through its own Channel, which verifies and decrypts it straight into the slot. The host waits
  for that, while the GPU runs the layers already enqueued. Pipelined keeps the next two layers moving on the
  CPU meanwhile (one sealed by the channel's workers, its CyclicPredictor hinted with the layer order; one opened
  from rest on a background thread); naive does both crypto passes on demand.
On a CPU device the same code runs with plain copies instead of streams and events (tests).

CUDA graphs are not used while streaming (the runner runs eagerly): the cc path needs host work between layers,
and at the batch sizes that make streaming worthwhile, launch overhead is noise beside a layer's transfer.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from ccserve.engine.weight_plan import StreamPlan, plan_stream
from ccserve.secure import Channel, Cycle, CyclicPredictor, Forget, HostStore, WorkerPool

OWNER = "weights"   # the host store's one owner: its key is the process's weight key
ALIGN = 64          # bytes: each parameter's view into a slot starts aligned for any dtype and vector loads
ARENA_MAX = 16 << 30    # bytes: the largest pinned allocation host_buffers makes (more than one layer if larger)


def decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList holding num_hidden_layers blocks."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"weight streaming found no list of {num_layers} decoder layers in {type(model).__name__}")


def param_bytes(module: nn.Module) -> int:
    return sum(p.nbytes for p in module.parameters())


def packed_bytes(layer: nn.Module) -> int:
    """Size of the layer's parameters laid out flat, each starting at a multiple of ALIGN bytes."""
    return sum(_aligned(p.nbytes) for p in layer.parameters())


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def resident_bytes(model: nn.Module, layers: nn.ModuleList) -> int:
    """Bytes that stay on the GPU whatever the budget: parameters outside the decoder layers and all buffers."""
    in_layers = {id(p) for p in layers.parameters()}
    params = sum(p.nbytes for p in model.parameters() if id(p) not in in_layers)
    return params + sum(b.nbytes for b in model.buffers())


def attach_weight_stream(model: nn.Module, num_layers: int, budget_gib: float, cc: str, threads: int,
                         device: torch.device) -> WeightStream | None:
    """Place a model built on the host: stream what the budget does not hold, move the rest to `device`.
    Returns None when everything fits (the model is then simply moved)."""
    layers = decoder_layers(model, num_layers)
    plan = plan_stream([packed_bytes(layer) for layer in layers], resident_bytes(model, layers), budget_gib,
                       cc != "off")
    stream = WeightStream(layers, plan, cc, threads, device) if plan.streaming else None
    model.to(device)        # streamed parameters already live in the ring, on the device
    return stream


class WeightStream:
    """The ring of GPU slots, the host copies of the streamed layers, and the hooks that move them."""

    def __init__(self, layers: nn.ModuleList, plan: StreamPlan, cc: str, threads: int,
                 device: torch.device) -> None:
        self.plan, self.device = plan, device
        self.cuda = device.type == "cuda"
        self.layers = [layers[i] for i in plan.streamed]
        self.slots = [torch.zeros(plan.slot_bytes, dtype=torch.uint8, device=device) for _ in range(plan.ring)]
        self.holds: list[int | None] = [None] * plan.ring        # streamed order index each slot holds or receives
        self.free = [torch.cuda.Event() if self.cuda else None for _ in range(plan.ring)]
        self.ready = [torch.cuda.Event() if self.cuda else None for _ in range(plan.ring)]
        self.loader = PinnedLoader(device) if cc == "off" else SealedLoader(cc, threads, device, plan.slot_bytes)
        sizes = [packed_bytes(layer) for layer in self.layers]
        if cc == "off":     # the plaintext stays: lay it out once in pinned memory
            flats = host_buffers(sizes, pin=self.cuda)
        else:               # only ciphertext stays: pack each layer into one scratch buffer, then seal it
            scratch = torch.empty(max(sizes), dtype=torch.uint8)
            flats = [scratch[:n] for n in sizes]
        for k, layer in enumerate(self.layers):
            self.loader.keep(k, pack(layer, self.slots[k % plan.ring], flats[k]))
        self.loader.cycle(len(self.layers))
        self._hooks = []
        for k, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_pre_hook(lambda mod, args, k=k: self.before(k)))
            self._hooks.append(layer.register_forward_hook(lambda mod, args, out, k=k: self.after(k)))
        if cc == "off":
            for k in range(plan.ring):
                self._load(k)

    @property
    def num_streamed(self) -> int:
        return len(self.layers)

    @property
    def streamed_bytes(self) -> int:
        """Bytes that cross the bus per forward pass."""
        return sum(param_bytes(layer) for layer in self.layers)

    def before(self, k: int) -> None:
        """Layer k (in streamed order) is about to run: make sure its slot holds it, and order compute after it."""
        slot = k % self.plan.ring
        if self.holds[slot] != k:
            self._load(k)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])

    def after(self, k: int) -> None:
        """Layer k's compute is enqueued: its slot is free once that compute is done. With plain copies, start
        the next layer of the same slot (`ring` places ahead, or in the next forward pass) into it now."""
        ring = self.plan.ring
        slot = k % ring
        if self.cuda:
            self.free[slot].record(torch.cuda.current_stream(self.device))
        if isinstance(self.loader, PinnedLoader):
            self._load(k + ring if k + ring < self.num_streamed else slot)

    def _load(self, k: int) -> None:
        slot = k % self.plan.ring
        self.holds[slot] = None             # if the load raises, the slot holds nothing usable
        self.loader.load(k, self.slots[slot], self.free[slot], self.ready[slot], self.num_streamed)
        self.holds[slot] = k

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self.loader.close()


def host_buffers(sizes: list[int], pin: bool) -> list[torch.Tensor]:
    """One flat host buffer per size, carved from a few large allocations. Why: torch's pinned allocator rounds
    every allocation up to a power of two, so a 1.23 GB layer alone would pin 2 GiB (48 GiB for OPT-30B's 24
    streamed layers); arenas of a power of two bytes (at most ARENA_MAX) filled with layers waste far less."""
    out: list[torch.Tensor] = []
    i = 0
    while i < len(sizes):
        want = 1 << (sum(sizes[i:]) - 1).bit_length()      # all the rest, rounded up as the allocator would
        cap = max(ARENA_MAX, 1 << (sizes[i] - 1).bit_length())
        arena = torch.empty(min(want, cap), dtype=torch.uint8, pin_memory=pin)
        offset = 0
        while i < len(sizes) and offset + sizes[i] <= arena.numel():
            out.append(arena[offset:offset + sizes[i]])
            offset += sizes[i]
            i += 1
    return out


def pack(layer: nn.Module, slot: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Copy the layer's parameters into the flat host buffer and re-point them, once, at views of `slot` with the
    same layout (their host storage is then freed). Returns `flat` (the caller keeps or seals it)."""
    flat.zero_()        # the alignment gaps too: no stale host bytes travel with the layer
    offset = 0
    for p in layer.parameters():
        n = p.nbytes
        flat[offset:offset + n].copy_(p.detach().reshape(-1).view(torch.uint8))
        p.data = slot[offset:offset + n].view(p.dtype).view(p.shape)
        offset += _aligned(n)
    return flat


class PinnedLoader:
    """cc off: plaintext layers in pinned host memory, copied on a side stream at the bus rate."""

    channel = None      # no encrypted channel (SealedLoader has one): nothing for the crypto counters

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.host: list[torch.Tensor] = []

    def keep(self, k: int, flat: torch.Tensor) -> None:
        self.host.append(flat)

    def cycle(self, n: int) -> None:
        """The copies need no prediction: after() issues them in order."""

    def load(self, k: int, slot: torch.Tensor, free, ready, n: int) -> None:
        src = self.host[k]
        if not self.cuda:
            slot[:src.numel()].copy_(src)
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(free)        # the slot's previous layer has finished computing
            slot[:src.numel()].copy_(src, non_blocking=True)
            ready.record(self.stream)

    def close(self) -> None:
        self.host.clear()


class SealedLoader:
    """cc naive / pipelined: layers rest as ciphertext under the process's weight key; each crossing opens one into
    private staging memory and sends it through a Channel of its own (weights are their own traffic class, with
    their own keys and predictor), which decrypts it into the ring slot.

    Pipelined keeps three layers in motion on the CPU while layer k crosses: k+1 opened and registered, so the
    channel seals it on its workers; k+2 being opened from rest on a background thread (the store's own workers).
    Naive does everything for layer k when it is needed.
    """

    def __init__(self, mode: str, threads: int, device: torch.device, slot_bytes: int) -> None:
        self.store = HostStore(WorkerPool(threads))
        self.store.open(OWNER)
        self.pipelined = mode == "pipelined"
        stages = 3 if self.pipelined else 1
        # One layer sealed ahead: a larger budget would also re-seal the layer just sent (the cycle predicts it
        # again, one pass later, while its plaintext is still registered).
        self.channel = Channel(device, mode=mode, threads=threads, predictor=CyclicPredictor(),
                               budget_bytes=slot_bytes)
        self.staging = [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(stages)]
        self.staged: dict[int, tuple[int, torch.Tensor]] = {}   # streamed index -> (staging buffer, plaintext)
        self.opening: dict[int, tuple[int, Future]] = {}        # streamed index -> (staging buffer, its opening)
        self.opener = ThreadPoolExecutor(1, thread_name_prefix="ccserve-weights") if self.pipelined else None

    def keep(self, k: int, flat: torch.Tensor) -> None:
        self.store.put(OWNER, k, flat)
        flat.zero_()        # the packed plaintext is dropped; only the ciphertext stays

    def cycle(self, n: int) -> None:
        """Layers 0..n-1 cross in this order, every pass: the channel's predictor knows what to seal next."""
        self.channel.hint(Cycle(tuple((OWNER, k) for k in range(n))))

    def load(self, k: int, slot: torch.Tensor, free, ready, n: int) -> None:
        if free is not None:
            free.synchronize()      # the channel writes the slot on its own stream: its last reader must be done
        src = self._stage(k, keep=(k,))
        if self.pipelined and n > 1:
            self._stage((k + 1) % n, keep=(k, (k + 1) % n))   # registered now: sealed while this one crosses
            self._open_ahead((k + 2) % n)
        self.channel.to_device(src, key=(OWNER, k), out=slot)
        self._unstage(k)

    def _open_ahead(self, k: int) -> None:
        """Start opening layer k from rest on the background thread, if a staging buffer is free."""
        if k in self.staged or k in self.opening:
            return
        busy = {i for i, _ in self.staged.values()} | {i for i, _ in self.opening.values()}
        free = [i for i in range(len(self.staging)) if i not in busy]
        if free:
            self.opening[k] = (free[0], self.opener.submit(self._open, k, free[0]))

    def _open(self, k: int, i: int) -> torch.Tensor:
        """Verify and decrypt layer k into staging buffer i; raises IntegrityError if it was altered at rest."""
        with torch.inference_mode(False):   # a normal view keeps torch's version counter, the channel's stamp
            return self.store.get(OWNER, k, out=self.staging[i])

    def _stage(self, k: int, keep: tuple[int, ...]) -> torch.Tensor:
        """Layer k's plaintext in a staging buffer, registered with the channel: from its opening ahead, else
        opened now (evicting a staged layer not in `keep` when no buffer is free)."""
        if k in self.staged:
            return self.staged[k][1]
        if k in self.opening:
            i, future = self.opening.pop(k)
            plain = future.result()
        else:
            i = self._free_buffer(keep)
            plain = self._open(k, i)
        self.channel.register(plain, key=(OWNER, k))
        self.staged[k] = (i, plain)
        return plain

    def _free_buffer(self, keep: tuple[int, ...]) -> int:
        for j, (_, future) in list(self.opening.items()):   # settle openings in flight: their buffers are busy
            future.exception()
        busy = {i for i, _ in self.staged.values()} | {i for i, _ in self.opening.values()}
        free = [i for i in range(len(self.staging)) if i not in busy]
        if free:
            return free[0]
        victim = next((j for j in self.opening if j not in keep), None)
        if victim is not None:
            return self.opening.pop(victim)[0]
        victim = next(j for j in self.staged if j not in keep)
        i = self.staged[victim][0]
        self._unstage(victim)
        return i

    def _unstage(self, k: int) -> None:
        """Layer k's plaintext is used (or evicted): the channel forgets it, so no speculation outlives it."""
        del self.staged[k]
        self.channel.hint(Forget((OWNER, k)))

    def ciphertext(self, k: int) -> torch.Tensor:
        """Layer k as it rests in host memory (what a dump of host memory shows)."""
        return self.store.ciphertext(OWNER, k)

    def close(self) -> None:
        if self.opener is not None:
            self.opener.shutdown(wait=True)
        self.channel.close()
        self.store.end(OWNER)
        self.store.pool.close()
