"""The channel on CPU: round trips in every mode, and every tamper case raises without releasing plaintext."""
import pytest
import torch

from ccserve.secure import Channel, ChannelClosed, IntegrityError

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int64, torch.bool, torch.uint8]
SHAPES = [(), (1,), (3,), (17, 5), (2, 3, 4096), (70_001,)]


def _tensor(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g, dtype=torch.int64).to(dtype)


@pytest.fixture
def channel(request):
    ch = Channel("cpu", mode=request.param, threads=2, chunk_bytes=4096)
    yield ch
    ch.close()


@pytest.mark.parametrize("channel", ["off", "naive", "pipelined"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_sizes_and_dtypes(channel, dtype):
    for i, shape in enumerate(SHAPES):
        t = _tensor(shape, dtype, seed=i)
        dev = channel.to_device(t)
        assert dev.dtype == dtype and dev.shape == t.shape and torch.equal(dev, t)
        back = channel.to_host(dev)
        assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)


def test_empty_tensors_cross_without_crypto():
    with Channel("cpu", mode="naive", threads=1) as ch:
        assert ch.to_device(torch.empty(0, 3)).shape == (0, 3)
        assert ch.to_host(torch.empty(0)).numel() == 0


def test_round_trip_through_triton_kernels():
    """The GPU side of the channel through the Triton kernels (interpreted), both directions."""
    with Channel("cpu", mode="naive", threads=2, chunk_bytes=4096, device_backend="triton") as ch:
        t = torch.randn(3000)  # 3 chunks, the last one short
        assert torch.equal(ch.to_device(t), t)
        assert torch.equal(ch.to_host(t), t)
        view = t[1:1001]    # off a 16-byte boundary: staged into an aligned buffer for the kernels
        assert view.data_ptr() % 16 and torch.equal(ch.to_host(view), view)


def _naive():
    return Channel("cpu", mode="naive", threads=2, chunk_bytes=4096)


def _flip_ciphertext(s):
    s.wire[5] ^= 0x01


def _flip_tag(s):
    s.wire[s.nbytes if s.nbytes < 4096 else 4096 + 3] ^= 0x80


def _truncate(s):
    s.wire = s.wire[:s.wire.numel() - 40]


@pytest.mark.parametrize("tamper", [_flip_ciphertext, _flip_tag, _truncate], ids=["ciphertext", "tag", "truncated"])
@pytest.mark.parametrize("direction", ["h2d", "d2h"])
def test_tampered_message_raises_and_fails_closed(tamper, direction):
    ch = _naive()
    t = torch.arange(3000, dtype=torch.float32)
    seal, open_ = (ch.seal_h2d, ch.open_h2d) if direction == "h2d" else (ch.seal_d2h, ch.open_d2h)
    s = seal(t)
    tamper(s)
    with pytest.raises(IntegrityError):
        open_(s)
    with pytest.raises(ChannelClosed):  # nothing more crosses a channel that saw an attack
        ch.to_device(t)
    ch.close()


@pytest.mark.parametrize("direction", ["h2d", "d2h"])
def test_replayed_message_raises(direction):
    ch = _naive()
    seal, open_ = (ch.seal_h2d, ch.open_h2d) if direction == "h2d" else (ch.seal_d2h, ch.open_d2h)
    s = seal(torch.ones(100))
    assert torch.equal(open_(s), torch.ones(100))
    with pytest.raises(IntegrityError):
        open_(s)
    ch.close()


@pytest.mark.parametrize("direction", ["h2d", "d2h"])
def test_reordered_messages_raise(direction):
    ch = _naive()
    seal, open_ = (ch.seal_h2d, ch.open_h2d) if direction == "h2d" else (ch.seal_d2h, ch.open_d2h)
    first, second = seal(torch.zeros(100)), seal(torch.ones(100))
    with pytest.raises(IntegrityError):
        open_(second)
    ch.close()
    del first


def test_dropped_message_breaks_the_next_one():
    ch = _naive()
    ch.seal_h2d(torch.zeros(10))          # sealed, never delivered
    with pytest.raises(IntegrityError):
        ch.open_h2d(ch.seal_h2d(torch.ones(10)))
    ch.close()


def test_failed_h2d_releases_no_plaintext(monkeypatch):
    """The buffer the device side decrypted into holds zeros after a failure, and nothing is returned."""
    import ccserve.secure.channel as channel_mod
    outs = []
    real = channel_mod.gcm_decrypt

    def spy(dk, wire, out, *args):
        outs.append(out)
        return real(dk, wire, out, *args)

    monkeypatch.setattr(channel_mod, "gcm_decrypt", spy)
    ch = _naive()
    s = ch.seal_h2d(torch.full((5000,), 7, dtype=torch.int32))
    s.wire[4096 + 16 + 10] ^= 1  # second chunk
    with pytest.raises(IntegrityError):
        ch.open_h2d(s)
    assert not outs[-1].any()
    ch.close()


def test_close_zeroizes_and_refuses():
    ch = _naive()
    dev_key = ch._dev_h2d
    ch.close()
    assert dev_key._aead is None
    with pytest.raises(ChannelClosed):
        ch.to_device(torch.ones(3))


def test_bad_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="mode"):
        Channel("cpu", mode="fast")
    with pytest.raises(ValueError, match="power of two"):
        Channel("cpu", chunk_bytes=1000)
    with Channel("cpu", mode="naive", threads=1) as ch, pytest.raises(ValueError, match="contiguous CPU"):
        ch.to_device(torch.ones(4, 4).t())


def test_async_d2h_messages_open_in_order_and_reading_a_later_one_opens_the_earlier():
    """to_host_async: results come back verified; reading the second message first opens the first one (the
    receiver's IVs are lock-step), and a tampered pending message raises when read."""
    with Channel("cpu", mode="naive", threads=2) as ch:
        a, b = torch.arange(10, dtype=torch.int64), torch.arange(7, dtype=torch.int64) * 3
        pa, pb = ch.to_host_async(a), ch.to_host_async(b)
        assert torch.equal(pb.result(), b) and torch.equal(pa.result(), a)
        pc = ch.to_host_async(a)
        pc.sealed.wire[0] ^= 1
        with pytest.raises(IntegrityError):
            pc.result()
        assert ch.failed


def test_async_d2h_off_mode_is_a_plain_copy():
    with Channel("cpu", mode="off") as ch:
        t = torch.arange(5)
        assert torch.equal(ch.to_host_async(t).result(), t)


@pytest.mark.parametrize("mode", ["naive", "pipelined"])
def test_to_device_decrypts_into_a_given_buffer(mode):
    """A caller's fixed device buffer (weight streaming's ring slot) receives the plaintext; nothing else is made."""
    t = _tensor((3, 1001), torch.float32, seed=4)
    out = torch.full((t.nbytes + 64,), 7, dtype=torch.uint8)
    with Channel("cpu", mode=mode, threads=2, chunk_bytes=4096) as ch:
        got = ch.to_device(t, out=out)
        assert torch.equal(got, t) and got.data_ptr() == out.data_ptr()
        assert torch.equal(out[:t.nbytes].view(torch.float32).view(t.shape), t)


def test_key_tables_built_in_inference_mode_zeroize():
    """An engine builds its channels, and so the GPU key tables, inside torch.inference_mode (the runner's
    methods); closing later, outside it, must still zero the tables (it raised on the H100: in-place update of
    an inference tensor). The triton backend builds the same tables on CPU tensors."""
    from ccserve.kernels.aes_gcm import DeviceKey
    with torch.inference_mode():
        key = DeviceKey(bytes(range(32)), "cpu", backend="triton")
    tables = list(key._tables.values())
    assert tables and any(t.any() for t in tables)
    key.zeroize()
    assert not any(t.any() for t in tables)
