"""Speculative pipelined encryption: hits, validation at use, relinquishing without IV reuse, budget."""
import pytest
import torch

from ccserve.secure import Channel, Cycle, CyclicPredictor, FifoPredictor, Forget, cpu_crypto
from ccserve.secure.iv import Lane
from ccserve.secure.stamp import checksum, stamp

CHUNK = 4096


@pytest.fixture
def nonces(monkeypatch):
    """Every (lane, counter) any sealing used, in order: the IV-reuse audit."""
    used = []
    real = cpu_crypto.seal_chunks

    def spy(aead, plain, wire, nbytes, chunk_bytes, lane, counter, chunks):
        used.extend((int(lane), counter + i) for i in chunks)
        return real(aead, plain, wire, nbytes, chunk_bytes, lane, counter, chunks)

    monkeypatch.setattr(cpu_crypto, "seal_chunks", spy)
    return used


def _layers(n, size=3000):
    return [torch.randn(size, generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _pipelined(predictor, **kw):
    return Channel("cpu", mode="pipelined", threads=2, chunk_bytes=CHUNK, predictor=predictor, **kw)


def test_cycle_hint_gives_hits_from_the_first_round():
    layers = _layers(4)
    with _pipelined(CyclicPredictor()) as ch:
        ch.hint(Cycle(tuple(ch.register(t) for t in layers)))   # sources known before their first transfer
        for _ in range(3):
            for t in layers:
                assert torch.equal(ch.to_device(t), t)
        assert ch.pipeline.stats.hits == 12 and ch.pipeline.stats.misses == 0
        assert ch.stats.sealed_on_demand_bytes == 0


@pytest.mark.parametrize("relinquish", ["skip", "drain"])
def test_mispredictions_never_reuse_an_iv(nonces, relinquish):
    layers = _layers(5)
    with _pipelined(CyclicPredictor(), relinquish=relinquish) as ch:
        keys = tuple(ch.register(t) for t in layers)
        ch.hint(Cycle(keys))
        order = [0, 3, 1, 2, 4, 4, 0, 2, 1, 3]   # bypasses, repeats, out of turn
        for i in order:
            if i == 2:
                layers[2].add_(1)  # changed after it may have been pre-sealed
            assert torch.equal(ch.to_device(layers[i]), layers[i])
        ch.hint(Forget(keys[3]))
        assert torch.equal(ch.to_device(layers[4]), layers[4])
        stats = ch.pipeline.stats
        assert stats.relinquished > 0 and stats.hits > 0
    assert len(nonces) == len(set(nonces))
    lanes = {lane for lane, _ in nonces}
    assert lanes <= {Lane.H2D_DIRECT, Lane.H2D_SPECULATIVE}


def test_receiver_cursor_only_moves_forward_over_burned_ivs():
    layers = _layers(4)
    with _pipelined(CyclicPredictor()) as ch:
        ch.hint(Cycle(tuple(ch.register(t) for t in layers)))
        ch.to_device(layers[0])
        cursor = ch._recv[Lane.H2D_SPECULATIVE]
        before = cursor.expected
        ch.to_device(layers[3])  # bypasses 1 and 2: their IVs are skipped, not reused
        assert cursor.expected > before and ch.pipeline.stats.relinquished == 2
        assert cursor.expected == ch._send[Lane.H2D_SPECULATIVE].next or ch.pipeline.pending


@pytest.mark.parametrize("validation", ["version", "hash"])
def test_validation_catches_a_buffer_changed_after_pre_encryption(validation):
    a, b = _layers(2)
    with _pipelined(CyclicPredictor(), validation=validation) as ch:
        ch.hint(Cycle((ch.register(a), ch.register(b))))
        ch.to_device(a)
        ch.pipeline.pending[(b.data_ptr(), b.nbytes)].wait()   # b is sealed ahead...
        if validation == "version":
            b.mul_(2)                                            # ...then written through torch
        else:
            b.numpy()[7] = 1234.5                                # ...or behind torch's back
        assert torch.equal(ch.to_device(b), b)
        assert ch.pipeline.stats.stale == 1 and ch.pipeline.stats.hits == 1  # a hit, b re-sealed


def test_inference_tensors_need_hash_validation():
    with torch.inference_mode():
        t = torch.ones(10)
    with pytest.raises(ValueError, match="inference"):
        stamp(t, "version")
    assert stamp(t, "hash").mark == checksum(t)


def test_checksum_sees_every_byte():
    t = torch.zeros(1003, dtype=torch.uint8)
    base = checksum(t)
    for i in (0, 500, 1000, 1002):  # words and the tail
        t[i] = 1
        assert checksum(t) != base
        t[i] = 0


def test_fifo_swap_in_order_and_out_of_order():
    blocks = [torch.full((2048,), float(i)) for i in range(4)]
    with _pipelined(FifoPredictor()) as ch:
        host = [ch.to_host(b) for b in blocks]                 # swap-outs are hinted and pre-sealed
        assert len(ch.pipeline.pending) == 4
        for i in (0, 2, 1, 3):  # 2 bypasses 1 (relinquished, re-sealed behind 3), then 1 bypasses 3: same again
            assert torch.equal(ch.to_device(host[i]), blocks[i])
        stats = ch.pipeline.stats
        assert (stats.hits, stats.misses, stats.relinquished) == (4, 0, 2)


def test_budget_bounds_bytes_in_flight():
    layers = _layers(6, size=4096)  # 16 KiB each
    with _pipelined(CyclicPredictor(), budget_bytes=40_000) as ch:
        ch.hint(Cycle(tuple(ch.register(t) for t in layers)))
        for t in layers * 2:
            ch.to_device(t)
            assert ch.pipeline.inflight_bytes <= 40_000
        assert ch.pipeline.stats.hits > 0


def test_parameters_and_views_as_sources():
    """Host weights are often nn.Parameters (requires_grad) and views of one big buffer."""
    flat = torch.randn(3 * 2000)
    params = [torch.nn.Parameter(flat[i * 2000:(i + 1) * 2000]) for i in range(3)]
    with _pipelined(CyclicPredictor()) as ch:
        ch.hint(Cycle(tuple(ch.register(p) for p in params)))
        for _ in range(2):
            for p in params:
                assert torch.equal(ch.to_device(p), p.detach())
        with torch.no_grad():
            flat[2000:2100] = 0.0        # written through the base tensor: the views see a new version
        assert torch.equal(ch.to_device(params[0]), params[0].detach())
        assert torch.equal(ch.to_device(params[1]), params[1].detach())
        assert ch.pipeline.stats.stale >= 1
