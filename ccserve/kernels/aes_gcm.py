"""AES-256-GCM over chunked messages: Triton kernels for the GPU side of the channel, and a CPU reference.

A message of n bytes is cut into chunks of `chunk_bytes`; chunk i is one GCM message (no AAD) under the 96-bit IV
lane (4 bytes, big-endian) || counter + i (8 bytes, big-endian). On the wire, chunk i is its ciphertext followed by
its 16-byte tag, at offset i * (chunk_bytes + 16). Chunking gives the GPU parallelism and the CPU threads work items
(1 MiB per IV, as PipeLLM does). Callers pick lane and counter; only `ccserve.secure` may call these functions.

Why the GPU path looks the way it does:
- CTR is bitsliced AES-256. A lane holds 8 counter blocks as 32 words (4 state rows x 8 bit planes; bit 8c+b of a
  word is column c of block b). SubBytes is a 110-gate boolean circuit on words, ShiftRows a rotate per row and
  MixColumns XORs between rows: no table lookups, so no bank conflicts and no key-dependent memory access.
- GHASH multiplies by fixed powers of H, which is linear over GF(2). A tile of ciphertext bits times a 0/1 matrix on
  the int8 tensor cores gives the GHASH of 8 blocks per row (bit k of each byte is masked out and weighted 2^(7-k)
  so bit 7 of the int32 sum is the parity). Rows carry across tiles by a Horner step (another matmul) and fold
  pairwise at the end; a finalize kernel multiplies the few partials per segment by powers of H. The kernel is
  persistent, so its 128 KiB of bit matrices are loaded into shared memory once per SM.
- Short messages (up to SHORT_MESSAGE_BYTES: a step's inputs, sampled tokens, a decode step's all-reduce) are
  latency-bound, not throughput-bound: the tensor-core GHASH loads 144 KiB of bit matrices per program and runs
  three kernels of ~25 us each on an H200 however short the message. They take a short path instead: CTR with one
  lane per thread, then one kernel that multiplies each block by its power of H (one block per thread), XORs the
  products per chunk with atomics, and lets the chunk's last program write or check the tag.
- Decryption verifies before it decrypts (ghash -> finalize -> ctr, or short ghash -> ctr); ctr writes zeros for
  chunks whose tag failed, so unauthenticated plaintext never reaches GPU memory.
- Long messages run CTR, then GHASH and finalize, on the caller's stream. A pipeline of chunk groups over two
  streams (CTR of one group beside GHASH of another: different units) was tried and measured slower on an H200
  (112 GB/s at 1 GiB, against 144 in sequence on an H100): the persistent GHASH kernel holds every SM's shared
  memory, so the CTR programs could not run beside it and the two only contended.
- The IV counter is `counter` plus an int64 the kernels read from device memory (`counter_at`; a zero by default).
  A caller that keeps its counter on the device (sealed tensor-parallel links) can then capture the kernels in a
  CUDA graph: each replay reads, and the caller advances, the current value instead of the one captured.
Buffers handed to the kernels are uint8 tensors whose storage is padded to a multiple of 16 bytes (`alloc_*`).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ccserve.kernels.device import num_sms

TAG_BYTES = 16
LANE_BYTES = 128            # one bitsliced lane = 8 AES blocks
GH_ROWS = 128               # GHASH tile rows
GH_ROW_BLOCKS = 8           # AES blocks per GHASH tile row: the 8 bit matrices (128 KiB) stay in shared memory
GH_TILE_BLOCKS = GH_ROWS * GH_ROW_BLOCKS
GH_OUT_ROWS = 16            # rows left per segment after pairwise folding
GH_FOLDS = (64, 32, 16)     # rows after each pairwise fold
CTR_TILE = 256              # lanes per CTR program (2 per thread: 128 registers, no spills on sm_90)
CTR_TILE_SHORT = 128        # short messages: 1 lane per thread, twice the programs, half the latency of each
CTR_WARPS = 4
FIN_CHUNKS = 16             # chunks per finalize program at most
FIN_ELEMS = 1024            # (chunk, partial) pairs per finalize step
MIN_SEGMENTS = 4 * 132      # GHASH segments to keep an H100 busy before segments grow longer
GH_MAX_TILES = 32           # tiles per segment at most
GH_MAX_SEGMENTS = 16        # segments per chunk that keep the finalize (one GF multiply per partial) cheap
SHORT_MESSAGE_BYTES = 4 << 20       # messages up to this size take the short path: CTR + one GHASH-and-tag kernel
SHORT_BLOCKS = 128                  # AES blocks per program of the short GHASH (one per thread)


# ---------------------------------------------------------------------------------------------------------------
# Wire layout and allocation


def num_chunks(nbytes: int, chunk_bytes: int) -> int:
    return -(-nbytes // chunk_bytes)


def wire_bytes(nbytes: int, chunk_bytes: int) -> int:
    """Size of a message on the wire: ciphertext plus one tag per chunk."""
    return nbytes + TAG_BYTES * num_chunks(nbytes, chunk_bytes)


def _round16(n: int) -> int:
    return -(-n // 16) * 16


def alloc_plain(nbytes: int, device: torch.device | str, pin: bool = False) -> torch.Tensor:
    """A uint8 buffer for n plaintext bytes, padded so kernels may read and write whole 16-byte blocks."""
    return torch.empty(_round16(nbytes), dtype=torch.uint8, device=device, pin_memory=pin)


def alloc_wire(nbytes: int, chunk_bytes: int, device: torch.device | str, pin: bool = False) -> torch.Tensor:
    return torch.empty(_round16(wire_bytes(nbytes, chunk_bytes)), dtype=torch.uint8, device=device, pin_memory=pin)


def nonce(lane: int, counter: int) -> bytes:
    return lane.to_bytes(4, "big") + counter.to_bytes(8, "big")


def check_chunk_bytes(chunk_bytes: int) -> None:
    if chunk_bytes < LANE_BYTES or chunk_bytes & (chunk_bytes - 1):
        raise ValueError(f"chunk_bytes must be a power of two >= {LANE_BYTES}, got {chunk_bytes}")


# ---------------------------------------------------------------------------------------------------------------
# CPU reference (OpenSSL through `cryptography`); also the CPU side of the channel, one chunk range per thread


def seal_chunks(aead: AESGCM, plain: np.ndarray, wire: np.ndarray, nbytes: int, chunk_bytes: int, lane: int,
                counter: int, chunks: range) -> None:
    """Encrypt the given chunks of `plain` into `wire` (uint8 arrays); releases the GIL inside OpenSSL."""
    for i in chunks:
        lo, w = i * chunk_bytes, i * (chunk_bytes + TAG_BYTES)
        n = min(chunk_bytes, nbytes - lo)
        aead.encrypt_into(nonce(lane, counter + i), plain[lo:lo + n], None, wire[w:w + n + TAG_BYTES])


def open_chunks(aead: AESGCM, wire: np.ndarray, plain: np.ndarray, nbytes: int, chunk_bytes: int, lane: int,
                counter: int, chunks: range) -> list[bool]:
    """Decrypt and verify chunks into `plain`; a chunk whose tag fails is zeroed, never left as plaintext."""
    ok = []
    for i in chunks:
        lo, w = i * chunk_bytes, i * (chunk_bytes + TAG_BYTES)
        n = min(chunk_bytes, nbytes - lo)
        try:
            aead.decrypt_into(nonce(lane, counter + i), wire[w:w + n + TAG_BYTES], None, plain[lo:lo + n])
            ok.append(True)
        except InvalidTag:
            plain[lo:lo + n] = 0
            ok.append(False)
    return ok


# ---------------------------------------------------------------------------------------------------------------
# Host-side key material: AES key schedule, GF(2^128) arithmetic, GHASH matrices


def _gf8_mul(a: int, b: int) -> int:
    p = 0
    while b:
        if b & 1:
            p ^= a
        a = (a << 1) ^ (0x11B if a & 0x80 else 0)
        b >>= 1
    return p


def _make_sbox() -> list[int]:
    inv = [0] * 256
    for x in range(1, 256):
        inv[x] = next(y for y in range(1, 256) if _gf8_mul(x, y) == 1)
    box = []
    for x in range(256):
        b = inv[x]
        s = 0x63
        for i in range(8):
            s ^= (((b >> i) ^ (b >> ((i + 4) % 8)) ^ (b >> ((i + 5) % 8)) ^ (b >> ((i + 6) % 8))
                   ^ (b >> ((i + 7) % 8))) & 1) << i
        box.append(s)
    return box


SBOX = _make_sbox()


def expand_key(key: bytes) -> list[bytes]:
    """AES-256 key schedule: 15 round keys of 16 bytes."""
    if len(key) != 32:
        raise ValueError(f"AES-256 needs a 32-byte key, got {len(key)} bytes")
    words = [list(key[4 * i:4 * i + 4]) for i in range(8)]
    rcon = 1
    for i in range(8, 60):
        t = list(words[i - 1])
        if i % 8 == 0:
            t = [SBOX[b] for b in t[1:] + t[:1]]
            t[0] ^= rcon
            rcon = _gf8_mul(rcon, 2)
        elif i % 8 == 4:
            t = [SBOX[b] for b in t]
        words.append([a ^ b for a, b in zip(words[i - 8], t, strict=True)])
    return [bytes(b for word in words[4 * r:4 * r + 4] for b in word) for r in range(15)]


def _bitsliced_round_keys(round_keys: list[bytes]) -> np.ndarray:
    """Round key r, row, plane j as a word: byte c is 0xFF where bit j of key byte 4c+row is set (all 8 blocks)."""
    out = np.zeros((15, 4, 8), dtype=np.uint32)
    for r, rk in enumerate(round_keys):
        for row in range(4):
            for j in range(8):
                out[r, row, j] = sum(0xFF << (8 * c) for c in range(4) if (rk[4 * c + row] >> j) & 1)
    return out.reshape(-1)


def _te_tables() -> np.ndarray:
    """T-tables for little-endian column words (byte r of a word is row r)."""
    te0 = np.array([_gf8_mul(s, 2) | s << 8 | s << 16 | _gf8_mul(s, 3) << 24 for s in SBOX], dtype=np.uint64)
    rot = [((te0 << (8 * k)) | (te0 >> (32 - 8 * k))) & 0xFFFFFFFF for k in range(4)]
    return np.stack(rot).astype(np.uint32).reshape(-1)


_R = 0xE1 << 120  # GCM reduction constant in its reflected bit order


def gf_mul(x: int, y: int) -> int:
    """Multiply in GCM's GF(2^128); ints are blocks read big-endian (coefficient 0 is the top bit)."""
    z = 0
    for i in range(128):
        if (x >> (127 - i)) & 1:
            z ^= y
        y = (y >> 1) ^ (_R if y & 1 else 0)
    return z


def _times_t(y: int) -> list[int]:
    """y * t^q for q = 0..127: the columns of the multiply-by-y matrix."""
    cols = []
    for _ in range(128):
        cols.append(y)
        y = (y >> 1) ^ (_R if y & 1 else 0)
    return cols


def _gf_pow(h: int, e: int) -> int:
    acc, base = 1 << 127, h
    while e:
        if e & 1:
            acc = gf_mul(acc, base)
        base = gf_mul(base, base)
        e >>= 1
    return acc


def _bits(v: int) -> np.ndarray:
    """Coefficients 0..127 of a block as 0/1."""
    return np.array([(v >> (127 - o)) & 1 for o in range(128)], dtype=np.int64)


def _matrix(y: int) -> np.ndarray:
    """[in, out] 0/1 matrix of x -> x * y, scaled by 2^7 so that bit 7 of an int8 dot is the GF(2) sum."""
    m = np.stack([_bits(c) for c in _times_t(y)])                # row q: t^q * y
    return (m * -128).astype(np.int8)


def _ghash_row_matrices(h: int) -> np.ndarray:
    """[8, 16 * GH_ROW_BLOCKS, 128] int8: for bit k of each row byte, the contribution to the row's GHASH.

    Row block i carries weight H^(GH_ROW_BLOCKS - i); byte b of a block holds coefficients 8b..8b+7 with the most
    significant bit first, so bit k of byte b is coefficient 8b + 7 - k. The row byte is masked to (1 << k) before
    the dot, so the matrix entry is 2^(7-k) (2^7 written as -128) to land every product on 2^7.
    """
    out = np.zeros((8, 16 * GH_ROW_BLOCKS, 128), dtype=np.int64)
    for i in range(GH_ROW_BLOCKS):
        cols = _times_t(_gf_pow(h, GH_ROW_BLOCKS - i))
        for byte in range(16):
            for k in range(8):
                out[k, 16 * i + byte] = _bits(cols[8 * byte + 7 - k]) << (7 - k)
    return out.astype(np.uint8).view(np.int8)


def _powers(h: int, count: int) -> np.ndarray:
    """H^0 .. H^(count-1) as [count, 4] big-endian uint32 words, by doubling with vectorized multiplies."""
    hi = np.zeros(count, dtype=np.uint64)
    lo = np.zeros(count, dtype=np.uint64)
    hi[0] = 1 << 63
    n = 1
    while n < count:
        y = _gf_pow(h, n)
        cols = _times_t(y)
        m = min(n, count - n)
        xh, xl = hi[:m], lo[:m]
        zh = np.zeros(m, dtype=np.uint64)
        zl = np.zeros(m, dtype=np.uint64)
        for q in range(128):
            src = xh if q < 64 else xl
            bit = (src >> np.uint64(63 - q % 64)) & np.uint64(1)
            mask = np.uint64(0) - bit
            zh ^= mask & np.uint64(cols[q] >> 64)
            zl ^= mask & np.uint64(cols[q] & (2**64 - 1))
        hi[n:n + m], lo[n:n + m] = zh, zl
        n += m
    words = np.stack([hi >> np.uint64(32), hi & np.uint64(0xFFFFFFFF), lo >> np.uint64(32), lo & np.uint64(0xFFFFFFFF)],
                     axis=1)
    return words.astype(np.uint32)


def _upload(a: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Copy a key-derived host table to the device and overwrite the host copy."""
    t = torch.from_numpy(np.ascontiguousarray(a)).to(device, copy=True).view(dtype)
    a.fill(0)
    return t


class DeviceKey:
    """One AES-256 key as the GPU kernels need it: round keys, T-tables, GHASH matrices and powers of H.

    backend "triton" runs the kernels (on CUDA, or on CPU tensors under TRITON_INTERPRET=1); "ref" runs OpenSSL on
    the host and is what the channel uses for the device side when there is no GPU. `zeroize` overwrites every
    key-derived table; the key object is unusable afterwards.
    """

    def __init__(self, key: bytes | bytearray, device: torch.device | str, backend: str | None = None):
        self.device = torch.device(device)
        self.backend = backend or ("triton" if self.device.type == "cuda" else "ref")
        if self.backend not in ("triton", "ref"):
            raise ValueError(f"backend must be 'triton' or 'ref', got {self.backend!r}")
        self._aead: AESGCM | None = AESGCM(bytes(key)) if self.backend == "ref" else None
        self._tables: dict[str, torch.Tensor] = {}
        self._h = 0
        if self.backend == "triton":
            self._build_tables(bytes(key))
            self.zero_counter = torch.zeros(1, dtype=torch.int64, device=self.device)  # counter_at when none given

    def _build_tables(self, key: bytes) -> None:
        round_keys = expand_key(key)
        encrypt = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        self._h = int.from_bytes(encrypt.update(bytes(16)) + encrypt.finalize(), "big")
        self._tables = {
            "rk_bs": _upload(_bitsliced_round_keys(round_keys).view(np.int32), self.device, torch.uint32),
            "rk": _upload(np.frombuffer(b"".join(round_keys), dtype=np.uint32).copy().view(np.int32), self.device,
                          torch.uint32),
            "te": _upload(_te_tables().view(np.int32), self.device, torch.uint32),
            "sbox": _upload(np.array(SBOX, dtype=np.int32), self.device, torch.uint32),
            "w": _upload(_ghash_row_matrices(self._h), self.device, torch.int8),
            "mt": _upload(_matrix(_gf_pow(self._h, GH_TILE_BLOCKS)), self.device, torch.int8),
            "mh": _upload(np.stack([_matrix(_gf_pow(self._h, GH_ROW_BLOCKS * half)) for half in GH_FOLDS]),
                          self.device, torch.int8),
        }

    def reserve_powers(self, chunk_bytes: int) -> None:
        """Build the powers of H that any message of this chunk size needs, so that powers() never reallocates the
        table afterwards (a CUDA graph that captured the kernels keeps the old address). A GHASH segment spans at
        most twice a chunk's blocks rounded up to a tile (_ghash: segments of r tiles, r <= tiles per chunk / 2, or
        one tile)."""
        if self.backend == "triton":
            blocks = -(-chunk_bytes // 16)
            self.powers(2 * -(-blocks // GH_TILE_BLOCKS) * GH_TILE_BLOCKS + 1)

    def powers(self, count: int) -> torch.Tensor:
        """H^0 .. H^(count-1) on the device, grown on demand and kept for the key's lifetime."""
        have = self._tables.get("powers")
        if have is None or have.shape[0] < count:
            grow = max(count, 2 * (0 if have is None else have.shape[0]))
            self._tables["powers"] = _upload(_powers(self._h, grow).view(np.int32), self.device, torch.uint32)
        return self._tables["powers"]

    @property
    def aead(self) -> AESGCM:
        if self._aead is None:
            raise RuntimeError("this DeviceKey has no host cipher (triton backend) or was zeroized")
        return self._aead

    def table(self, name: str) -> torch.Tensor:
        if not self._tables:
            raise RuntimeError("this DeviceKey was zeroized")
        return self._tables[name]

    def zeroize(self) -> None:
        with torch.inference_mode():    # the tables may have been built inside inference mode (an engine's runner)
            for t in self._tables.values():
                t.zero_()
        self._tables = {}
        self._aead = None
        self._h = 0


# ---------------------------------------------------------------------------------------------------------------
# Triton: bitsliced AES-256 CTR


@triton.jit
def _sbox(x):
    """AES S-box on 8 bit planes (x[0] = least significant bit), 32 S-boxes per word.

    A 110-gate circuit (32 AND, 75 XOR, 3 XNOR) from the NIST Circuit Complexity project (public domain), whose
    inputs U0..U7 and outputs S0..S7 are most significant bit first.
    """
    u0 = x[7]
    u1 = x[6]
    u2 = x[5]
    u3 = x[4]
    u4 = x[3]
    u5 = x[2]
    u6 = x[1]
    u7 = x[0]
    t1 = u4 ^ u5
    t2 = u0 ^ u6
    t3 = u0 ^ u3
    t4 = u3 ^ u5
    t5 = u0 ^ u5
    t6 = u1 ^ u4
    t7 = t2 ^ t4
    t8 = u6 ^ t1
    t9 = u2 ^ t8
    t10 = u1 ^ t8
    t11 = t1 ^ t7
    t12 = t7 & t1
    t13 = u7 ^ t10
    t14 = u7 ^ t11
    t15 = t9 ^ t11
    t16 = t6 ^ t12
    t17 = t2 & t9
    t18 = t3 & t10
    t19 = t9 ^ t13
    t20 = t10 ^ t15
    t21 = t17 ^ t18
    t22 = t16 ^ t18
    t23 = t4 & t15
    t24 = u3 ^ t19
    t25 = u6 ^ t19
    t26 = u0 ^ t19
    t27 = t9 ^ t21
    t28 = t2 ^ t23
    t29 = t5 & t20
    t30 = t7 ^ t24
    t31 = u0 ^ t29
    t32 = t27 ^ t28
    t33 = t24 & u7
    t34 = t25 & t19
    t35 = t26 & t13
    t36 = t32 ^ t34
    t37 = u2 ^ t31
    t38 = t27 ^ t31
    t39 = t30 & t14
    t40 = t39 ^ t23
    t41 = t33 ^ t37
    t42 = t35 ^ t38
    t43 = t22 ^ t40
    t44 = t40 ^ t41
    t45 = t22 ^ t41
    t46 = t36 ^ t42
    t47 = t43 & t36
    t48 = t42 ^ t47
    t49 = t45 ^ t47
    t50 = t44 & t48
    t51 = t49 & t46
    t52 = t47 ^ t51
    t53 = t47 ^ t50
    t54 = t42 ^ t51
    t55 = t50 ^ t45
    t56 = t54 ^ t55
    t57 = t42 & t52
    t58 = t45 & t53
    t59 = t54 & u7
    t60 = t55 & t13
    t61 = t54 & t24
    t62 = t55 & t26
    t63 = t36 ^ t57
    t64 = t43 ^ t58
    t65 = t56 & t10
    t66 = t56 & t3
    t67 = t63 ^ t54
    t68 = t64 ^ t55
    t69 = t63 ^ t64
    t70 = t63 & t11
    t71 = t64 & t9
    t72 = t63 & t7
    t73 = t64 & t2
    t74 = t67 ^ t68
    t75 = t65 ^ t71
    t76 = t70 ^ t71
    t77 = t62 ^ t73
    t78 = t67 & t14
    t79 = t68 & t19
    t80 = t69 & t15
    t81 = t67 & t30
    t82 = t68 & t25
    t83 = t69 & t4
    t84 = t78 ^ t79
    t85 = t80 ^ t79
    t86 = t83 ^ t66
    t87 = t59 ^ t76
    t88 = t74 & t20
    t89 = t74 & t5
    t90 = t75 ^ t85
    t91 = t88 ^ t85
    t92 = t81 ^ t86
    t93 = t82 ^ t86
    t94 = t84 ^ t76
    t95 = t60 ^ t87
    t96 = t89 ^ t90
    t97 = t72 ^ t92
    t98 = t61 ^ t92
    t99 = t93 ^ t73
    t100 = t91 ^ t87
    t101 = t96 ^ t66
    s0 = t90 ^ t97
    s3 = t94 ^ t97
    s7 = ~(t99 ^ t95)
    t102 = t77 ^ t100
    s1 = ~(t90 ^ s3)
    s4 = s3 ^ t95
    s6 = s7 ^ t100
    s2 = ~(t101 ^ t102)
    s5 = t98 ^ t102
    return (s7, s6, s5, s4, s3, s2, s1, s0)


@triton.jit
def _rotr(x, n: tl.constexpr):
    # No early return for n = 0: Triton's compiler also builds the statement after a constexpr-if's return, and
    # x << 32 is undefined. Shifting left by (32 - n) % 32 makes n = 0 give x | x = x.
    return (x >> n) | (x << ((32 - n) % 32))


@triton.jit
def _sub_shift(row, r: tl.constexpr):
    """SubBytes and ShiftRows of state row r: row r moves left by r columns, i.e. its words rotate right 8r bits."""
    s = _sbox(row)
    return (_rotr(s[0], 8 * r), _rotr(s[1], 8 * r), _rotr(s[2], 8 * r), _rotr(s[3], 8 * r),
            _rotr(s[4], 8 * r), _rotr(s[5], 8 * r), _rotr(s[6], 8 * r), _rotr(s[7], 8 * r))


@triton.jit
def _xor8(x, y):
    return (x[0] ^ y[0], x[1] ^ y[1], x[2] ^ y[2], x[3] ^ y[3], x[4] ^ y[4], x[5] ^ y[5], x[6] ^ y[6], x[7] ^ y[7])


@triton.jit
def _add_key(row, k_ptr):
    return (row[0] ^ tl.load(k_ptr), row[1] ^ tl.load(k_ptr + 1), row[2] ^ tl.load(k_ptr + 2),
            row[3] ^ tl.load(k_ptr + 3), row[4] ^ tl.load(k_ptr + 4), row[5] ^ tl.load(k_ptr + 5),
            row[6] ^ tl.load(k_ptr + 6), row[7] ^ tl.load(k_ptr + 7))


@triton.jit
def _mix_row(x, nxt, rest, k_ptr):
    """One MixColumns output row plus its round key: 2 * (x ^ next) ^ (the other three rows) ^ key.

    2 * t in GF(2^8) on bit planes: plane j takes t[j-1], and planes 1, 3, 4 also take t[7] (0x1B).
    """
    t = _xor8(x, nxt)
    return _add_key((t[7] ^ rest[0], t[0] ^ t[7] ^ rest[1], t[1] ^ rest[2], t[2] ^ t[7] ^ rest[3],
                     t[3] ^ t[7] ^ rest[4], t[4] ^ rest[5], t[5] ^ rest[6], t[6] ^ rest[7]), k_ptr)


@triton.jit
def _round(s, k_ptr):
    a = _sub_shift(s[0], 0)
    b = _sub_shift(s[1], 1)
    c = _sub_shift(s[2], 2)
    d = _sub_shift(s[3], 3)
    u = _xor8(_xor8(a, b), _xor8(c, d))
    return (_mix_row(a, b, _xor8(u, a), k_ptr), _mix_row(b, c, _xor8(u, b), k_ptr + 8),
            _mix_row(c, d, _xor8(u, c), k_ptr + 16), _mix_row(d, a, _xor8(u, d), k_ptr + 24))


@triton.jit
def _swapmove(x, y, n: tl.constexpr, m: tl.constexpr):
    """Exchange the bits of x at mask m << n with the bits of y at mask m."""
    t = ((x >> n) ^ y) & m
    return x ^ (t << n), y ^ t


@triton.jit
def _ortho(q):
    """Transpose 8x8 bit blocks across 8 words: bit 8r+b of word j <-> bit 8r+j of word b (an involution)."""
    q0, q1 = _swapmove(q[0], q[1], 1, 0x55555555)
    q2, q3 = _swapmove(q[2], q[3], 1, 0x55555555)
    q4, q5 = _swapmove(q[4], q[5], 1, 0x55555555)
    q6, q7 = _swapmove(q[6], q[7], 1, 0x55555555)
    q0, q2 = _swapmove(q0, q2, 2, 0x33333333)
    q1, q3 = _swapmove(q1, q3, 2, 0x33333333)
    q4, q6 = _swapmove(q4, q6, 2, 0x33333333)
    q5, q7 = _swapmove(q5, q7, 2, 0x33333333)
    q0, q4 = _swapmove(q0, q4, 4, 0x0F0F0F0F)
    q1, q5 = _swapmove(q1, q5, 4, 0x0F0F0F0F)
    q2, q6 = _swapmove(q2, q6, 4, 0x0F0F0F0F)
    q3, q7 = _swapmove(q3, q7, 4, 0x0F0F0F0F)
    return (q0, q1, q2, q3, q4, q5, q6, q7)


@triton.jit
def _bytes4(a, b, c, d):
    """Transpose a 4x4 byte matrix held in 4 words: byte c of word r <-> byte r of word c."""
    a, b = _swapmove(a, b, 8, 0x00FF00FF)
    c, d = _swapmove(c, d, 8, 0x00FF00FF)
    a, c = _swapmove(a, c, 16, 0x0000FFFF)
    b, d = _swapmove(b, d, 16, 0x0000FFFF)
    return a, b, c, d


@triton.jit
def _bswap(x):
    return (x >> 24) | ((x >> 8) & 0xFF00) | ((x << 8) & 0xFF0000) | (x << 24)


@triton.jit
def _iv_row(iv0, iv1, iv2, ctr, r: tl.constexpr):
    """Planes of state row r for 8 counter blocks: IV bytes fill columns 0-2, the counters column 3."""
    return (_iv_plane(iv0, iv1, iv2, ctr[0], r, 0), _iv_plane(iv0, iv1, iv2, ctr[1], r, 1),
            _iv_plane(iv0, iv1, iv2, ctr[2], r, 2), _iv_plane(iv0, iv1, iv2, ctr[3], r, 3),
            _iv_plane(iv0, iv1, iv2, ctr[4], r, 4), _iv_plane(iv0, iv1, iv2, ctr[5], r, 5),
            _iv_plane(iv0, iv1, iv2, ctr[6], r, 6), _iv_plane(iv0, iv1, iv2, ctr[7], r, 7))


@triton.jit
def _iv_plane(iv0, iv1, iv2, ctr_t, r: tl.constexpr, j: tl.constexpr):
    # IV word c holds bytes 4c..4c+3 (row r at bits 8r); the counter is big-endian, so row r is its byte 3 - r.
    sh: tl.constexpr = 8 * r + j
    iv = (((iv0 >> sh) & 1) * 0xFF) | ((((iv1 >> sh) & 1) * 0xFF) << 8) | ((((iv2 >> sh) & 1) * 0xFF) << 16)
    return iv | (((ctr_t >> (24 - 8 * r)) & 0xFF) << 24)


@triton.jit
def _keystream(iv0, iv1, iv2, first_ctr, rk_ptr):
    """AES-256 of the 8 counter blocks first_ctr + b (b = 0..7) of each lane, as 32 little-endian column words."""
    ctr = _ortho((first_ctr, first_ctr + 1, first_ctr + 2, first_ctr + 3,
                  first_ctr + 4, first_ctr + 5, first_ctr + 6, first_ctr + 7))
    s = (_add_key(_iv_row(iv0, iv1, iv2, ctr, 0), rk_ptr), _add_key(_iv_row(iv0, iv1, iv2, ctr, 1), rk_ptr + 8),
         _add_key(_iv_row(iv0, iv1, iv2, ctr, 2), rk_ptr + 16), _add_key(_iv_row(iv0, iv1, iv2, ctr, 3), rk_ptr + 24))
    for rnd in range(1, 14):
        s = _round(s, rk_ptr + rnd * 32)
    k = rk_ptr + 14 * 32
    s = (_add_key(_sub_shift(s[0], 0), k), _add_key(_sub_shift(s[1], 1), k + 8),
         _add_key(_sub_shift(s[2], 2), k + 16), _add_key(_sub_shift(s[3], 3), k + 24))
    return _unslice(s)


@triton.jit
def _unslice(s):
    """Bit planes back to words: returns cols[c][b], column c of block b (byte r = row r)."""
    p0 = _bytes4(s[0][0], s[1][0], s[2][0], s[3][0])
    p1 = _bytes4(s[0][1], s[1][1], s[2][1], s[3][1])
    p2 = _bytes4(s[0][2], s[1][2], s[2][2], s[3][2])
    p3 = _bytes4(s[0][3], s[1][3], s[2][3], s[3][3])
    p4 = _bytes4(s[0][4], s[1][4], s[2][4], s[3][4])
    p5 = _bytes4(s[0][5], s[1][5], s[2][5], s[3][5])
    p6 = _bytes4(s[0][6], s[1][6], s[2][6], s[3][6])
    p7 = _bytes4(s[0][7], s[1][7], s[2][7], s[3][7])
    return (_ortho((p0[0], p1[0], p2[0], p3[0], p4[0], p5[0], p6[0], p7[0])),
            _ortho((p0[1], p1[1], p2[1], p3[1], p4[1], p5[1], p6[1], p7[1])),
            _ortho((p0[2], p1[2], p2[2], p3[2], p4[2], p5[2], p6[2], p7[2])),
            _ortho((p0[3], p1[3], p2[3], p3[3], p4[3], p5[3], p6[3], p7[3])))


@triton.jit
def _xor_column(src, dst, word, limit, ks, ok, c: tl.constexpr):
    """XOR keystream column c of the lane's 8 blocks into the data (byte offsets below `limit` only)."""
    for b in tl.static_range(8):
        w = word + 4 * b + c
        m = w * 4 < limit
        tl.store(dst + w, (tl.load(src + w, mask=m, other=0) ^ ks[b]) & ok, mask=m)


@triton.jit(do_not_specialize=["nbytes", "lane", "counter"])
def _ctr_kernel(src, dst, ok_ptr, rk_ptr, ctr_ptr, nbytes, chunk_bytes, src_stride, dst_stride, lane, counter,
                TILE: tl.constexpr, GATE: tl.constexpr):
    """src/dst: uint32 views; strides are chunk strides in words. Program = TILE lanes of one chunk."""
    pid = tl.program_id(0)
    tiles = chunk_bytes // (TILE * 128)
    chunk = pid // tiles
    lanes = (pid % tiles) * TILE + tl.arange(0, TILE)
    chunk_len = tl.minimum(chunk_bytes, nbytes - chunk.to(tl.int64) * chunk_bytes).to(tl.int32)
    ctr = tl.load(ctr_ptr) + counter.to(tl.int64) + chunk
    iv0 = _bswap(lane.to(tl.uint32))
    iv1 = _bswap((ctr >> 32).to(tl.uint32))
    iv2 = _bswap((ctr & 0xFFFFFFFF).to(tl.uint32))
    cols = _keystream(iv0, iv1, iv2, (lanes * 8 + 2).to(tl.uint32), rk_ptr)
    ok = tl.full([TILE], 0xFFFFFFFF, tl.uint32)
    if GATE:
        ok = ok * (tl.load(ok_ptr + chunk) != 0).to(tl.uint32)
    limit = (chunk_len + 15) // 16 * 16
    word = lanes * 32
    s = src + chunk.to(tl.int64) * src_stride
    d = dst + chunk.to(tl.int64) * dst_stride
    _xor_column(s, d, word, limit, cols[0], ok, 0)
    _xor_column(s, d, word, limit, cols[1], ok, 1)
    _xor_column(s, d, word, limit, cols[2], ok, 2)
    _xor_column(s, d, word, limit, cols[3], ok, 3)


# ---------------------------------------------------------------------------------------------------------------
# Triton: GHASH on the int8 tensor cores


@triton.jit
def _fold(u, m_ptr, HALF: tl.constexpr):
    """Rows g and g + HALF -> row g: u[g] * H^(GH_ROW_BLOCKS * HALF) ^ u[g + HALF] (the matrix at m_ptr)."""
    bits = tl.arange(0, 128)
    m = tl.load(m_ptr + bits[:, None] * 128 + bits[None, :])
    lo, hi = tl.split(tl.permute(tl.reshape(u, [2, HALF, 128]), (1, 2, 0)))
    acc = tl.dot(lo, m) + (hi.to(tl.int32) << 7)
    return ((acc >> 7) & 1).to(tl.int8)


@triton.jit
def _load_edge(base, row_start, cols, chunk_len):
    """A tile that crosses the chunk's ends: zero before byte 0 and from byte chunk_len on.

    The load mask is constant over each 16-byte block, so the loads stay 16 bytes wide; a per-byte mask splits them
    into 64 single-byte loads per thread, each with its own address, which made the kernel spill on sm_90 (Triton
    3.6). Reading all of the last, partial block is safe: the chunk's tag follows it on the wire. Its bytes past
    chunk_len are zeroed after the load.
    """
    offs = row_start + cols[None, :]
    blk = row_start + cols[None, :] // 16 * 16
    x = tl.load(base + offs, mask=(blk >= 0) & (blk < chunk_len), other=0)
    return tl.where(offs < chunk_len, x, 0)


@triton.jit(do_not_specialize=["nbytes", "mp_blocks", "nseg", "nwork", "seg_tiles"])
def _ghash_kernel(wire, w_ptr, mt_ptr, mh_ptr, part_ptr, nbytes, chunk_bytes, wire_stride, mp_blocks, nseg, nwork,
                  seg_tiles, ROWS: tl.constexpr, ROW_BLOCKS: tl.constexpr):
    """Partial GHASH of segments (seg_tiles tiles of ROWS rows x ROW_BLOCKS blocks) of chunks; persistent over
    segments. Every size-dependent integer is a plain runtime argument: one compiled kernel serves every message
    size of a chunk size (specializing them compiled a new bitsliced kernel, tens of seconds, per size class).

    Blocks are indexed right-aligned: virtual block v = real block + (mp_blocks - blocks in chunk), so the zero
    blocks padding a short chunk sit in front, where they do not change the GHASH. Each segment writes 16 partial
    sums, row g standing for all blocks up to virtual block `last(g)`, still to be multiplied by
    H^(mp_blocks - last(g)) (see _finalize_kernel). The bit matrices are loaded once per program.
    """
    RB: tl.constexpr = 16 * ROW_BLOCKS
    TILE: tl.constexpr = ROWS * ROW_BLOCKS
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, RB)
    bits = tl.arange(0, 128)
    mt = tl.load(mt_ptr + bits[:, None] * 128 + bits[None, :])
    w = ()
    for k in tl.static_range(8):
        w = w + (tl.load(w_ptr + k * RB * 128 + cols[:, None] * 128 + bits[None, :]),)
    for work in range(tl.program_id(0), nwork, tl.num_programs(0)):
        chunk = work // nseg
        seg = work % nseg
        chunk_len = tl.minimum(chunk_bytes, nbytes - chunk.to(tl.int64) * chunk_bytes).to(tl.int32)
        pad = mp_blocks - (chunk_len + 15) // 16
        base = wire + chunk.to(tl.int64) * wire_stride
        u = tl.zeros([ROWS, 128], dtype=tl.int8)
        for t in range(seg_tiles):
            start = ((seg * seg_tiles + t) * TILE - pad) * 16
            offs = start + rows[:, None] * RB + cols[None, :]
            if (start >= 0) & (start + TILE * 16 <= chunk_len):
                x = tl.load(base + offs)  # whole tile inside the chunk: the fast, unmasked path
            else:
                x = _load_edge(base, start + rows[:, None] * RB, cols, chunk_len)
            acc = tl.dot(u, mt)
            for k in tl.static_range(8):  # out_dtype: Triton 3.6 defaults it to float32 and rejects an int32 acc
                acc = tl.dot((x & (1 << k)).to(tl.int8, bitcast=True), w[k], acc, out_dtype=tl.int32)
            u = ((acc >> 7) & 1).to(tl.int8)
        u = _fold(u, mh_ptr, 64)
        u = _fold(u, mh_ptr + 128 * 128, 32)
        u = _fold(u, mh_ptr + 2 * 128 * 128, 16)
        shift = 31 - tl.arange(0, 32)
        words = tl.sum(tl.reshape(u.to(tl.uint32), [16, 4, 32]) << shift[None, None, :], axis=2)
        r16 = tl.arange(0, 16)
        w4 = tl.arange(0, 4)
        tl.store(part_ptr + (work * 16 + r16[:, None]) * 4 + w4[None, :], words)


# ---------------------------------------------------------------------------------------------------------------
# Triton: finalize (powers of H, length block, E_K(J0), tag write or compare)


@triton.jit
def _gf_mul_words(x, v):
    """x * v in GCM's GF(2^128) on 4 big-endian words; v is walked as v * t^i (x and v broadcast)."""
    z0 = (x[0] & 0) | (v[0] & 0)
    z = (z0, z0, z0, z0)
    for w in tl.static_range(4):
        xw = x[w]
        for i in range(32):
            m = 0 - ((xw >> (31 - i)) & 1)
            z = (z[0] ^ (v[0] & m), z[1] ^ (v[1] & m), z[2] ^ (v[2] & m), z[3] ^ (v[3] & m))
            red = (0 - (v[3] & 1)) & 0xE1000000
            v = ((v[0] >> 1) ^ red, (v[1] >> 1) | (v[0] << 31), (v[2] >> 1) | (v[1] << 31),
                 (v[3] >> 1) | (v[2] << 31))
    return z


@triton.jit
def _te(te_ptr, x, k: tl.constexpr):
    return tl.load(te_ptr + k * 256 + ((x >> (8 * k)) & 0xFF))


@triton.jit
def _sb(sb_ptr, x, k: tl.constexpr):
    return tl.load(sb_ptr + ((x >> (8 * k)) & 0xFF)) << (8 * k)


@triton.jit
def _aes_block(s, te_ptr, sb_ptr, rk_ptr):
    """AES-256 of one block per element, T-table style (only E_K(J0) per chunk: one block, speed irrelevant)."""
    s = (s[0] ^ tl.load(rk_ptr), s[1] ^ tl.load(rk_ptr + 1), s[2] ^ tl.load(rk_ptr + 2), s[3] ^ tl.load(rk_ptr + 3))
    for r in range(1, 14):
        k = rk_ptr + 4 * r
        s = (_te(te_ptr, s[0], 0) ^ _te(te_ptr, s[1], 1) ^ _te(te_ptr, s[2], 2) ^ _te(te_ptr, s[3], 3) ^ tl.load(k),
             _te(te_ptr, s[1], 0) ^ _te(te_ptr, s[2], 1) ^ _te(te_ptr, s[3], 2) ^ _te(te_ptr, s[0], 3)
             ^ tl.load(k + 1),
             _te(te_ptr, s[2], 0) ^ _te(te_ptr, s[3], 1) ^ _te(te_ptr, s[0], 2) ^ _te(te_ptr, s[1], 3)
             ^ tl.load(k + 2),
             _te(te_ptr, s[3], 0) ^ _te(te_ptr, s[0], 1) ^ _te(te_ptr, s[1], 2) ^ _te(te_ptr, s[2], 3)
             ^ tl.load(k + 3))
    k = rk_ptr + 56
    return ((_sb(sb_ptr, s[0], 0) | _sb(sb_ptr, s[1], 1) | _sb(sb_ptr, s[2], 2) | _sb(sb_ptr, s[3], 3)) ^ tl.load(k),
            (_sb(sb_ptr, s[1], 0) | _sb(sb_ptr, s[2], 1) | _sb(sb_ptr, s[3], 2) | _sb(sb_ptr, s[0], 3))
            ^ tl.load(k + 1),
            (_sb(sb_ptr, s[2], 0) | _sb(sb_ptr, s[3], 1) | _sb(sb_ptr, s[0], 2) | _sb(sb_ptr, s[1], 3))
            ^ tl.load(k + 2),
            (_sb(sb_ptr, s[3], 0) | _sb(sb_ptr, s[0], 1) | _sb(sb_ptr, s[1], 2) | _sb(sb_ptr, s[2], 3))
            ^ tl.load(k + 3))


@triton.jit
def _tag_word(wire_at, tag, ok, w: tl.constexpr, mask, DECRYPT: tl.constexpr):
    """Write word w of the tag (4 bytes, little-endian) or compare it with the wire; returns the running ok."""
    if DECRYPT:
        got = tl.load(wire_at + 4 * w, mask=mask, other=0).to(tl.uint32)
        for i in tl.static_range(1, 4):
            got = got | (tl.load(wire_at + 4 * w + i, mask=mask, other=0).to(tl.uint32) << (8 * i))
        ok = ok & (got == tag)
    else:
        for i in tl.static_range(4):
            tl.store(wire_at + 4 * w + i, ((tag >> (8 * i)) & 0xFF).to(tl.uint8), mask=mask)
    return ok


@triton.jit(do_not_specialize=["nbytes", "nchunks", "lane", "counter", "mp_blocks", "npart", "seg_blocks"])
def _finalize_kernel(part_ptr, pow_ptr, wire, ok_ptr, te_ptr, sb_ptr, rk_ptr, ctr_ptr, nbytes, chunk_bytes, wire_stride,
                     nchunks, lane, counter, mp_blocks, npart, seg_blocks,
                     CPP: tl.constexpr, PB: tl.constexpr, DECRYPT: tl.constexpr, ROWS: tl.constexpr,
                     ROW_BLOCKS: tl.constexpr):
    TILE: tl.constexpr = ROWS * ROW_BLOCKS
    cid = tl.program_id(0) * CPP + tl.arange(0, CPP)
    cmask = cid < nchunks
    z0 = tl.zeros([CPP], dtype=tl.uint32)
    z = (z0, z0, z0, z0)
    for p0 in range(0, npart, PB):
        p = p0 + tl.arange(0, PB)
        pmask = p < npart
        seg = p // 16
        last = seg * seg_blocks + seg_blocks - TILE + (p % 16 + ROWS - 16) * ROW_BLOCKS + ROW_BLOCKS - 1
        e = tl.where(pmask, mp_blocks - last, 0)
        v = (tl.load(pow_ptr + e * 4)[None, :], tl.load(pow_ptr + e * 4 + 1)[None, :],
             tl.load(pow_ptr + e * 4 + 2)[None, :], tl.load(pow_ptr + e * 4 + 3)[None, :])
        at = (cid[:, None] * npart + p[None, :]) * 4
        m = cmask[:, None] & pmask[None, :]
        x = (tl.load(part_ptr + at, mask=m, other=0), tl.load(part_ptr + at + 1, mask=m, other=0),
             tl.load(part_ptr + at + 2, mask=m, other=0), tl.load(part_ptr + at + 3, mask=m, other=0))
        y = _gf_mul_words(x, v)
        z = (z[0] ^ tl.xor_sum(y[0], axis=1), z[1] ^ tl.xor_sum(y[1], axis=1),
             z[2] ^ tl.xor_sum(y[2], axis=1), z[3] ^ tl.xor_sum(y[3], axis=1))
    chunk_len = tl.minimum(chunk_bytes, nbytes - cid.to(tl.int64) * chunk_bytes)
    bitlen = chunk_len * 8
    zero = tl.zeros([CPP], dtype=tl.uint32)
    h = (tl.load(pow_ptr + 4), tl.load(pow_ptr + 5), tl.load(pow_ptr + 6), tl.load(pow_ptr + 7))
    lh = _gf_mul_words((zero, zero, (bitlen >> 32).to(tl.uint32), (bitlen & 0xFFFFFFFF).to(tl.uint32)), h)
    ctr = tl.load(ctr_ptr) + counter.to(tl.int64) + cid
    j0 = (zero + _bswap(lane.to(tl.uint32)), _bswap((ctr >> 32).to(tl.uint32)),
          _bswap((ctr & 0xFFFFFFFF).to(tl.uint32)), zero + 0x01000000)
    ej0 = _aes_block(j0, te_ptr, sb_ptr, rk_ptr)
    at = wire + cid.to(tl.int64) * wire_stride + chunk_len
    ok = cmask
    ok = _tag_word(at, _bswap(z[0] ^ lh[0]) ^ ej0[0], ok, 0, cmask, DECRYPT)
    ok = _tag_word(at, _bswap(z[1] ^ lh[1]) ^ ej0[1], ok, 1, cmask, DECRYPT)
    ok = _tag_word(at, _bswap(z[2] ^ lh[2]) ^ ej0[2], ok, 2, cmask, DECRYPT)
    ok = _tag_word(at, _bswap(z[3] ^ lh[3]) ^ ej0[3], ok, 3, cmask, DECRYPT)
    if DECRYPT:
        tl.store(ok_ptr + cid, ok.to(tl.int32), mask=cmask)


# ---------------------------------------------------------------------------------------------------------------
# Triton: GHASH of short messages, one block per thread, with the tag in the same kernel


@triton.jit
def _be_word(base, blk, w: tl.constexpr, chunk_len):
    """Word w of each 16-byte block blk of a chunk at `base`, read big-endian; bytes from chunk_len on (the tag,
    or past the message) read as zero, as GHASH pads the last block."""
    offs = blk[:, None] * 16 + 4 * w + tl.arange(0, 4)[None, :]
    b = tl.load(base + offs, mask=offs < chunk_len, other=0)
    return tl.sum(b.to(tl.uint32) << (24 - 8 * tl.arange(0, 4))[None, :], axis=1)


@triton.jit(do_not_specialize=["nbytes", "nchunks", "lane", "counter", "progs"])
def _ghash_short_kernel(wire, pow_ptr, acc_ptr, ok_ptr, te_ptr, sb_ptr, rk_ptr, ctr_ptr, nbytes, chunk_bytes,
                        wire_stride, nchunks, lane, counter, progs, BLOCKS: tl.constexpr, DECRYPT: tl.constexpr):
    """GHASH and tag of the chunks of a short message: `progs` + 1 programs per chunk.

    The tag of a chunk is bswap(GHASH ^ L*H) ^ E_K(J0) word by word, and bswap is linear over XOR, so every term
    can be XORed into one accumulator by whoever computes it: block program i (BLOCKS blocks, one per thread) adds
    C_j * H^(n - j + 1) for its blocks j (one GF multiply each, the power read from the table), and one more
    program adds the length block L*H and bswap(E_K(J0)) (a T-table AES and a multiply), in parallel with the
    blocks instead of after them. The program that finishes a chunk last (an atomic count) only byte-swaps the
    accumulator into the tag and writes it, or compares it (DECRYPT) and stores the chunk's verdict.
    acc_ptr: int32 [nchunks * 4 words, nchunks counts], zero.
    """
    pid = tl.program_id(0)
    chunk = pid // (progs + 1)
    part = pid % (progs + 1)
    chunk_len = tl.minimum(chunk_bytes, nbytes - chunk.to(tl.int64) * chunk_bytes).to(tl.int32)
    base = wire + chunk.to(tl.int64) * wire_stride
    acc = acc_ptr + chunk * 4
    if part < progs:
        n = (chunk_len + 15) // 16
        blk = part * BLOCKS + tl.arange(0, BLOCKS)
        x = (_be_word(base, blk, 0, chunk_len), _be_word(base, blk, 1, chunk_len), _be_word(base, blk, 2, chunk_len),
             _be_word(base, blk, 3, chunk_len))
        e = tl.where(blk < n, n - blk + 1, 0)
        v = (tl.load(pow_ptr + e * 4), tl.load(pow_ptr + e * 4 + 1), tl.load(pow_ptr + e * 4 + 2),
             tl.load(pow_ptr + e * 4 + 3))
        y = _gf_mul_words(x, v)
        for w in tl.static_range(4):
            tl.atomic_xor(acc + w, tl.xor_sum(y[w], axis=0).to(tl.int32, bitcast=True))
    else:
        bitlen = chunk_len.to(tl.int64) * 8
        zero = tl.zeros([1], dtype=tl.uint32)
        h = (tl.load(pow_ptr + 4) + zero, tl.load(pow_ptr + 5) + zero, tl.load(pow_ptr + 6) + zero,
             tl.load(pow_ptr + 7) + zero)
        lh = _gf_mul_words((zero, zero, zero + (bitlen >> 32).to(tl.uint32),
                            zero + (bitlen & 0xFFFFFFFF).to(tl.uint32)), h)
        ctr = tl.load(ctr_ptr) + counter.to(tl.int64) + chunk
        j0 = (zero + _bswap(lane.to(tl.uint32)), zero + _bswap((ctr >> 32).to(tl.uint32)),
              zero + _bswap((ctr & 0xFFFFFFFF).to(tl.uint32)), zero + 0x01000000)
        ej0 = _aes_block(j0, te_ptr, sb_ptr, rk_ptr)
        for w in tl.static_range(4):    # scalar atomics, as above: one thread issues each
            tl.atomic_xor(acc + w, tl.xor_sum(lh[w] ^ _bswap(ej0[w]), axis=0).to(tl.int32, bitcast=True))
    tl.debug_barrier()      # every thread's share is in before this program counts itself done
    done = tl.atomic_add(acc_ptr + nchunks * 4 + chunk, 1)
    if done == progs:
        tag_at = base + chunk_len + tl.arange(0, 1)
        yes = tl.full([1], 1, tl.int1)
        ok = yes
        for w in tl.static_range(4):
            z = tl.atomic_xor(acc + w, 0).to(tl.uint32, bitcast=True) + tl.zeros([1], dtype=tl.uint32)
            ok = _tag_word(tag_at, _bswap(z), ok, w, yes, DECRYPT)
        if DECRYPT:
            tl.store(ok_ptr + chunk + tl.arange(0, 1), ok.to(tl.int32))


# ---------------------------------------------------------------------------------------------------------------
# Launch


def _segment_tiles(tiles_per_chunk: int, nchunks: int) -> int:
    """Tiles per GHASH segment (a power of two): at most GH_MAX_SEGMENTS segments per chunk, and longer segments
    (fewer partials for the finalize) while there are still MIN_SEGMENTS segments to spread over the GPU."""
    r = 1
    while r < GH_MAX_TILES and r * 2 <= tiles_per_chunk and (
            tiles_per_chunk // r > GH_MAX_SEGMENTS or nchunks * tiles_per_chunk // (r * 2) >= MIN_SEGMENTS):
        r *= 2
    return r


def _ghash(dk: DeviceKey, wire: torch.Tensor, nbytes: int, chunk_bytes: int):
    """Run the GHASH kernel over every chunk on the wire; returns partials and their geometry."""
    nch = num_chunks(nbytes, chunk_bytes)
    blocks = -(-min(chunk_bytes, nbytes) // 16)
    r = _segment_tiles(-(-blocks // GH_TILE_BLOCKS), nch)
    seg_blocks = r * GH_TILE_BLOCKS
    mp = -(-blocks // seg_blocks) * seg_blocks
    nseg = mp // seg_blocks
    part = torch.empty(nch * nseg * GH_OUT_ROWS * 4, dtype=torch.uint32, device=wire.device)
    grid = min(nch * nseg, num_sms(wire.device))
    _ghash_kernel[(grid,)](wire, dk.table("w"), dk.table("mt"), dk.table("mh"), part, nbytes, chunk_bytes,
                           chunk_bytes + TAG_BYTES, mp, nseg, nch * nseg, r, ROWS=GH_ROWS,
                           ROW_BLOCKS=GH_ROW_BLOCKS, num_warps=8, num_stages=1)  # 168 KiB smem; more stages overflow
    return part, mp, nseg * GH_OUT_ROWS, seg_blocks


def _finalize(dk: DeviceKey, wire: torch.Tensor, ok: torch.Tensor, ghash, nbytes: int, chunk_bytes: int, lane: int,
              counter: int, counter_at: torch.Tensor, decrypt: bool) -> None:
    part, mp, npart, seg_blocks = ghash
    nch = num_chunks(nbytes, chunk_bytes)
    cpp = FIN_CHUNKS          # fixed (short messages mask lanes): one compiled kernel for every size
    _finalize_kernel[(triton.cdiv(nch, cpp),)](
        part, dk.powers(mp + 1), wire, ok, dk.table("te"), dk.table("sbox"), dk.table("rk"), counter_at, nbytes,
        chunk_bytes, chunk_bytes + TAG_BYTES, nch, lane, counter, mp, npart, seg_blocks, CPP=cpp, PB=FIN_ELEMS // cpp,
        DECRYPT=decrypt, ROWS=GH_ROWS, ROW_BLOCKS=GH_ROW_BLOCKS, num_warps=4)


def _tag(dk: DeviceKey, wire: torch.Tensor, ok: torch.Tensor, nbytes: int, chunk_bytes: int, lane: int,
         counter: int, counter_at: torch.Tensor, decrypt: bool) -> None:
    """GHASH and tag of every chunk (written, or compared into `ok` when decrypting): one kernel for a short message,
    GHASH on the tensor cores and then finalize for a long one."""
    if nbytes <= SHORT_MESSAGE_BYTES:
        _ghash_short(dk, wire, ok, nbytes, chunk_bytes, lane, counter, counter_at, decrypt)
    else:
        ghash = _ghash(dk, wire, nbytes, chunk_bytes)
        _finalize(dk, wire, ok, ghash, nbytes, chunk_bytes, lane, counter, counter_at, decrypt)


def _ghash_short(dk: DeviceKey, wire: torch.Tensor, ok: torch.Tensor, nbytes: int, chunk_bytes: int, lane: int,
                 counter: int, counter_at: torch.Tensor, decrypt: bool) -> None:
    """GHASH and tag (written, or compared into `ok`) of every chunk of a short message, in one kernel."""
    nch = num_chunks(nbytes, chunk_bytes)
    blocks = -(-min(chunk_bytes, nbytes) // 16)
    progs = triton.cdiv(blocks, SHORT_BLOCKS)
    acc = torch.zeros(nch * 5, dtype=torch.int32, device=wire.device)   # per chunk: 4 GHASH words; then counts
    _ghash_short_kernel[(nch * (progs + 1),)](
        wire, dk.powers(blocks + 2), acc, ok, dk.table("te"), dk.table("sbox"), dk.table("rk"), counter_at, nbytes,
        chunk_bytes, chunk_bytes + TAG_BYTES, nch, lane, counter, progs, BLOCKS=SHORT_BLOCKS, DECRYPT=decrypt,
        num_warps=SHORT_BLOCKS // 32)


def _ctr(dk: DeviceKey, src: torch.Tensor, dst: torch.Tensor, ok: torch.Tensor, nbytes: int, chunk_bytes: int,
         src_stride: int, dst_stride: int, lane: int, counter: int, counter_at: torch.Tensor, gate: bool) -> None:
    short = nbytes <= SHORT_MESSAGE_BYTES      # latency-bound: one lane per thread
    tile = min(CTR_TILE_SHORT if short else CTR_TILE, chunk_bytes // LANE_BYTES)
    per_tile = tile * LANE_BYTES
    nch = num_chunks(nbytes, chunk_bytes)
    grid = (nch - 1) * (chunk_bytes // per_tile) + triton.cdiv(nbytes - (nch - 1) * chunk_bytes, per_tile)
    _ctr_kernel[(grid,)](src.view(torch.uint32), dst.view(torch.uint32), ok, dk.table("rk_bs"), counter_at, nbytes,
                         chunk_bytes, src_stride // 4, dst_stride // 4, lane, counter, TILE=tile, GATE=gate,
                         num_warps=max(1, min(CTR_WARPS, tile // 32)))


def _check(dk: DeviceKey, plain: torch.Tensor, wire: torch.Tensor, nbytes: int, chunk_bytes: int) -> None:
    """Buffers as the kernels need them. Triton compiles a kernel per pointer alignment it sees: a buffer off a
    16-byte boundary would compile new variants of the bitsliced CTR (seconds each on a GPU) in the middle of
    serving, and run slower ones; so the GPU path takes aligned buffers only (alloc_* gives them)."""
    check_chunk_bytes(chunk_bytes)
    if nbytes <= 0:
        raise ValueError("messages must be at least one byte long")
    wire_need = _round16(wire_bytes(nbytes, chunk_bytes))
    for name, t, need in (("plain", plain, _round16(nbytes)), ("wire", wire, wire_need)):
        if t.dtype != torch.uint8 or not t.is_contiguous() or t.numel() < need:
            raise ValueError(f"{name} must be a contiguous uint8 tensor of at least {need} bytes (use alloc_*)")
        if dk.backend == "triton" and t.data_ptr() % 16:
            raise ValueError(f"{name} must start at a 16-byte boundary (use alloc_*, or copy into one)")


def gcm_encrypt(dk: DeviceKey, plain: torch.Tensor, wire: torch.Tensor, nbytes: int, chunk_bytes: int, lane: int,
                counter: int, counter_at: torch.Tensor | None = None) -> None:
    """Encrypt the first nbytes of `plain` into `wire` (ciphertext and tags), chunk i under IV (lane, c + i), where
    c = counter + the int64 in `counter_at` (a one-element tensor on the key's device; default 0)."""
    _check(dk, plain, wire, nbytes, chunk_bytes)
    if dk.backend == "ref":
        seal_chunks(dk.aead, plain.numpy(), wire.numpy(), nbytes, chunk_bytes, lane, _host_counter(counter, counter_at),
                    range(num_chunks(nbytes, chunk_bytes)))
        return
    at = dk.zero_counter if counter_at is None else counter_at
    stride = chunk_bytes + TAG_BYTES
    none = torch.empty(1, dtype=torch.int32, device=plain.device)     # no verdicts when encrypting
    _ctr(dk, plain, wire, none, nbytes, chunk_bytes, chunk_bytes, stride, lane, counter, at, False)
    _tag(dk, wire, none, nbytes, chunk_bytes, lane, counter, at, False)


def gcm_decrypt(dk: DeviceKey, wire: torch.Tensor, plain: torch.Tensor, nbytes: int, chunk_bytes: int, lane: int,
                counter: int, counter_at: torch.Tensor | None = None) -> torch.Tensor:
    """Verify and decrypt `wire` into `plain`; returns int32 ok flags per chunk. Failed chunks decrypt to zeros.
    The IVs are those gcm_encrypt would use with the same counter and counter_at."""
    _check(dk, plain, wire, nbytes, chunk_bytes)
    nch = num_chunks(nbytes, chunk_bytes)
    if dk.backend == "ref":
        ok = open_chunks(dk.aead, wire.numpy(), plain.numpy(), nbytes, chunk_bytes, lane,
                         _host_counter(counter, counter_at), range(nch))
        return torch.tensor(ok, dtype=torch.int32)
    at = dk.zero_counter if counter_at is None else counter_at
    ok = torch.empty(nch, dtype=torch.int32, device=wire.device)
    stride = chunk_bytes + TAG_BYTES
    _tag(dk, wire, ok, nbytes, chunk_bytes, lane, counter, at, True)
    _ctr(dk, wire, plain, ok, nbytes, chunk_bytes, stride, chunk_bytes, lane, counter, at, True)
    return ok


def _host_counter(counter: int, counter_at: torch.Tensor | None) -> int:
    """The reference path's counter: it runs on the host, where reading counter_at costs nothing."""
    return counter if counter_at is None else counter + int(counter_at.item())
