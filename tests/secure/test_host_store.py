"""Host storage under per-owner keys: round trips, tamper detection, and crypto-shredding at owner end."""
import pytest
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ccserve.kernels.aes_gcm import TAG_BYTES, nonce
from ccserve.secure import HostStore, IntegrityError, OwnerEnded, WorkerPool
from ccserve.secure.iv import Lane


@pytest.fixture
def store():
    pool = WorkerPool(2)
    yield HostStore(pool, chunk_bytes=4096)
    pool.close()


def test_round_trip_many_items(store):
    store.open("r1")
    items = {"k": torch.randn(3, 5000), "v": torch.arange(7, dtype=torch.int8), "e": torch.empty(0)}
    for name, t in items.items():
        store.put("r1", name, t)
    for name, t in items.items():
        assert torch.equal(store.get("r1", name), t)
    assert torch.equal(store.pop("r1", "v"), items["v"])
    with pytest.raises(KeyError):
        store.get("r1", "v")


def test_stored_bytes_are_ciphertext_and_tamper_is_detected(store):
    store.open("r1")
    t = torch.arange(4096, dtype=torch.int32)
    store.put("r1", "blk", t)
    raw = store.ciphertext("r1", "blk")
    assert raw.numel() >= t.nbytes and not torch.equal(raw[:t.nbytes], t.view(torch.uint8))
    raw[123] ^= 1
    with pytest.raises(IntegrityError):
        store.get("r1", "blk")


def test_swapped_or_replayed_items_fail(store):
    store.open("r1")
    store.put("r1", "a", torch.zeros(100))
    old = store.ciphertext("r1", "a").clone()
    store.put("r1", "a", torch.ones(100))              # new version of the item
    store.put("r1", "b", torch.full((100,), 2.0))
    store._owners["r1"].items["a"].wire.copy_(old)     # host replays the old version
    with pytest.raises(IntegrityError):
        store.get("r1", "a")
    store._owners["r1"].items["a"].wire.copy_(store.ciphertext("r1", "b"))  # or another item's bytes
    with pytest.raises(IntegrityError):
        store.get("r1", "a")


def test_ended_owner_data_cannot_be_decrypted(store):
    store.open("r1")
    store.open("r2")
    secret = torch.arange(2000, dtype=torch.float32)
    store.put("r1", "kv", secret)
    store.put("r2", "kv", secret)
    dump = store.ciphertext("r1", "kv").clone()        # what an attacker copied from host memory
    counter = store._owners["r1"].items["kv"].counter
    key = store.keys.get("r1")
    store.end("r1")
    assert not key.alive                                # the only key copy left is all zeros
    with pytest.raises(OwnerEnded):
        store.get("r1", "kv")
    with pytest.raises(InvalidTag):                     # even with the dump and the (zeroed) key material
        AESGCM(bytes(32)).decrypt(nonce(Lane.HOST_STORE, counter), dump[:4096 + TAG_BYTES].numpy().tobytes(), None)
    assert torch.equal(store.get("r2", "kv"), secret)   # other owners are unaffected
    store.end("r1")                                     # idempotent
    with pytest.raises(OwnerEnded):
        store.put("r1", "kv", secret)


def test_owner_keys_are_distinct(store):
    store.open("a")
    store.open("b")
    t = torch.zeros(4096, dtype=torch.uint8)
    store.put("a", "x", t)
    store.put("b", "x", t)
    assert not torch.equal(store.ciphertext("a", "x"), store.ciphertext("b", "x"))


def test_get_into_a_reused_buffer(store):
    store.open("w")
    a, b = torch.arange(3000, dtype=torch.int32), torch.arange(10, dtype=torch.int32) * 5
    store.put("w", "a", a)
    store.put("w", "b", b)
    buf = torch.empty(a.nbytes, dtype=torch.uint8)
    got = store.get("w", "a", out=buf)
    assert torch.equal(got, a) and got.data_ptr() == buf.data_ptr()
    assert torch.equal(store.get("w", "b", out=buf), b)
    store.end("w")
