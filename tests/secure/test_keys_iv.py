"""Session/owner keys live only in memory and can be zeroized; IV counters never repeat and move in lock-step."""
import pickle
import threading

import pytest

from ccserve.secure.errors import OwnerEnded
from ccserve.secure.iv import IVCursor, IVSequence, Lane
from ccserve.secure.keys import OwnerKeys, SecretKey, SessionKeys


def test_secret_key_zeroize_and_no_leaks():
    a, b = SecretKey(), SecretKey()
    assert a.alive and a.material() != b.material() and len(a.material()) == 32
    assert a.material().hex() not in repr(a)
    with pytest.raises(TypeError):
        pickle.dumps(a)
    a.zeroize()
    assert not a.alive
    with pytest.raises(ValueError):
        a.material()


def test_session_keys_differ_per_direction():
    keys = SessionKeys()
    assert keys.h2d.material() != keys.d2h.material()
    keys.zeroize()
    assert not keys.h2d.alive and not keys.d2h.alive


def test_owner_keys_destroy_zeroizes():
    keys = OwnerKeys()
    k = keys.create("req-1")
    assert keys.get("req-1") is k and "req-1" in keys
    with pytest.raises(ValueError):
        keys.create("req-1")
    keys.destroy("req-1")
    assert not k.alive and "req-1" not in keys
    with pytest.raises(OwnerEnded):
        keys.get("req-1")


def test_iv_sequence_is_monotonic_and_unique_across_threads():
    seq = IVSequence(Lane.H2D_DIRECT)
    got: list[range] = []
    lock = threading.Lock()

    def take():
        for n in (1, 3, 2) * 200:
            start = seq.take(n)
            with lock:
                got.append(range(start, start + n))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    used = [i for r in got for i in r]
    assert len(used) == len(set(used)) == seq.next
    with pytest.raises(ValueError):
        seq.take(0)


def test_iv_sequence_refuses_to_wrap():
    seq = IVSequence(Lane.D2H)
    seq._next = (1 << 64) - 1
    assert seq.take(1) == (1 << 64) - 1
    with pytest.raises(RuntimeError, match="exhausted"):
        seq.take(1)


def test_cursor_moves_only_forward():
    cur = IVCursor(Lane.H2D_SPECULATIVE)
    assert cur.accept(3) == 0 and cur.accept(1) == 3
    cur.skip_to(10)
    assert cur.accept(2) == 10
    with pytest.raises(ValueError, match="forward"):
        cur.skip_to(5)
