"""Host-side AES-GCM on worker threads: bit-exact with OpenSSL one-shot calls, urgent jobs first, cancellable."""
import os
import threading

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ccserve.kernels.aes_gcm import nonce, num_chunks, wire_bytes
from ccserve.secure.cpu_crypto import CpuCipher, WorkerPool
from ccserve.secure.keys import SecretKey


def test_seal_open_matches_openssl_per_chunk():
    pool = WorkerPool(3)
    key = SecretKey()
    cipher = CpuCipher(key, pool)
    chunk = 4096
    for nbytes in (5, 4096, 700_000):  # inline, one chunk, many chunks over the pool
        data = np.frombuffer(os.urandom(nbytes), dtype=np.uint8)
        wire = np.zeros(wire_bytes(nbytes, chunk), dtype=np.uint8)
        cipher.seal(data, wire, nbytes, chunk, 9, 100)
        aead = AESGCM(key.material())
        for i in range(num_chunks(nbytes, chunk)):
            lo, w = i * chunk, i * (chunk + 16)
            n = min(chunk, nbytes - lo)
            assert wire[w:w + n + 16].tobytes() == aead.encrypt(nonce(9, 100 + i), data[lo:lo + n].tobytes(), None)
        out = np.zeros(nbytes, dtype=np.uint8)
        assert cipher.open(wire, out, nbytes, chunk, 9, 100) and np.array_equal(out, data)
        wire[-1] ^= 1
        assert not cipher.open(wire, out, nbytes, chunk, 9, 100)
        assert not out[(num_chunks(nbytes, chunk) - 1) * chunk:].any()
    pool.close()


def test_urgent_jobs_run_before_speculative_ones():
    pool = WorkerPool(1)
    gate, order = threading.Event(), []
    pool.submit(gate.wait, urgent=False)              # occupies the only worker
    later = pool.submit(lambda: order.append("speculative"), urgent=False)
    first = pool.submit(lambda: order.append("urgent"), urgent=True)
    gate.set()
    first.result(), later.result()
    assert order == ["urgent", "speculative"]
    pool.close()


def test_cancelled_seal_jobs_do_nothing():
    pool = WorkerPool(1)
    cipher = CpuCipher(SecretKey(), pool)
    gate, cancel = threading.Event(), threading.Event()
    pool.submit(gate.wait, urgent=False)
    data = np.ones(3 << 20, dtype=np.uint8)
    wire = np.zeros(wire_bytes(data.size, 1 << 20), dtype=np.uint8)
    futs = cipher.seal_async(data, wire, data.size, 1 << 20, 1, 0, urgent=False, cancel=cancel)
    cancel.set()
    gate.set()
    assert [f.result() for f in futs] == [False] * len(futs) and not wire.any()
    pool.close()
