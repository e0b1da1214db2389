"""GPU AES-256-GCM throughput (the GPU side of the channel): decrypt+verify and encrypt, 1 MiB .. 1 GiB.

First checks the kernels on the GPU against OpenSSL (bit-exact wire, tamper detected), then times whole
encrypt/decrypt calls, a per-kernel breakdown at the largest size (where the time goes), and CTR tile variants.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from secure_common import cuda_device, environment, gpu_time, print_table, write_json

from ccserve.kernels import aes_gcm as g

CHUNK = 1 << 20


def check(dev: torch.device) -> dict:
    """Both paths (short messages, and long ones forced through the tensor-core GHASH), each checked."""
    short = check_path(dev)
    threshold = g.SHORT_MESSAGE_BYTES
    g.SHORT_MESSAGE_BYTES = 0
    try:
        long = check_path(dev)
    finally:
        g.SHORT_MESSAGE_BYTES = threshold
    result = {f"{k}_{path}": v for path, r in (("short", short), ("long", long)) for k, v in r.items()}
    print("correctness:", result, flush=True)
    if not all(result.values()):
        raise SystemExit("GPU AES-GCM is not correct on this machine; not timing it")
    return result


def check_path(dev: torch.device) -> dict:
    """Bit-exact with OpenSSL on a 3-chunk message with a short tail; a flipped bit fails only its chunk."""
    key, nbytes, chunk, lane, counter = os.urandom(32), 2 * CHUNK + 99, CHUNK, 0x48320001, (1 << 32) - 1
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    dk = g.DeviceKey(key, dev)
    plain = g.alloc_plain(nbytes, dev)
    plain[:nbytes].copy_(data)
    wire = g.alloc_wire(nbytes, chunk, dev)
    g.gcm_encrypt(dk, plain, wire, nbytes, chunk, lane, counter)
    ref = g.alloc_wire(nbytes, chunk, "cpu")
    g.seal_chunks(AESGCM(key), data.numpy(), ref.numpy(), nbytes, chunk, lane, counter, range(3))
    size = g.wire_bytes(nbytes, chunk)
    exact = torch.equal(wire[:size].cpu(), ref[:size])
    out = g.alloc_plain(nbytes, dev)
    ok = g.gcm_decrypt(dk, ref.to(dev), out, nbytes, chunk, lane, counter)
    roundtrip = bool(ok.all()) and torch.equal(out[:nbytes].cpu(), data)
    bad = ref.clone()
    bad[chunk + 16 + 5] ^= 1
    ok = g.gcm_decrypt(dk, bad.to(dev), out, nbytes, chunk, lane, counter)
    tamper = ok.tolist() == [1, 0, 1] and not out[chunk:2 * chunk].any()
    return {"bit_exact_with_openssl": exact, "decrypt_round_trip": roundtrip, "tamper_detected": tamper}


def throughput(dev: torch.device, nbytes: int, reps: int) -> dict:
    dk = g.DeviceKey(os.urandom(32), dev)
    plain = g.alloc_plain(nbytes, dev).random_(0, 256)
    wire = g.alloc_wire(nbytes, CHUNK, dev)
    out = g.alloc_plain(nbytes, dev)
    enc = gpu_time(lambda: g.gcm_encrypt(dk, plain, wire, nbytes, CHUNK, 1, 0), reps)
    dec = gpu_time(lambda: g.gcm_decrypt(dk, wire, out, nbytes, CHUNK, 1, 0), reps)
    assert torch.equal(out[:nbytes], plain[:nbytes])
    copy = gpu_time(lambda: out.copy_(plain), reps)
    return {"bytes": nbytes, "encrypt_GBps": nbytes / enc / 1e9, "decrypt_GBps": nbytes / dec / 1e9,
            "d2d_copy_GBps": nbytes / copy / 1e9}


def breakdown(dev: torch.device, nbytes: int, reps: int) -> dict:
    """Seconds per kernel of a decryption (ghash, finalize, ctr), as GB/s of message bytes."""
    dk = g.DeviceKey(os.urandom(32), dev)
    wire = g.alloc_wire(nbytes, CHUNK, dev).random_(0, 256)
    out = g.alloc_plain(nbytes, dev)
    ok = torch.ones(g.num_chunks(nbytes, CHUNK), dtype=torch.int32, device=dev)
    gh = g._ghash(dk, wire, nbytes, CHUNK)
    t_gh = gpu_time(lambda: g._ghash(dk, wire, nbytes, CHUNK), reps)
    t_fin = gpu_time(lambda: g._finalize(dk, wire, ok, gh, nbytes, CHUNK, 1, 0, dk.zero_counter, True), reps)
    t_ctr = gpu_time(lambda: g._ctr(dk, wire, out, ok, nbytes, CHUNK, CHUNK + 16, CHUNK, 1, 0, dk.zero_counter, True), reps)
    return {name: nbytes / t / 1e9 for name, t in (("ghash", t_gh), ("finalize", t_fin), ("ctr", t_ctr))}


def ctr_variants(dev: torch.device, nbytes: int, reps: int) -> list[dict]:
    """CTR GB/s for lanes per program / warps choices (the kernel's constants are CTR_TILE, CTR_WARPS)."""
    dk = g.DeviceKey(os.urandom(32), dev)
    plain = g.alloc_plain(nbytes, dev).random_(0, 256)
    wire = g.alloc_wire(nbytes, CHUNK, dev)
    ok = torch.ones(1, dtype=torch.int32, device=dev)
    rows = []
    default = (g.CTR_TILE, g.CTR_WARPS)
    for tile, warps in ((128, 4), (256, 4), (256, 8), (512, 8)):
        g.CTR_TILE, g.CTR_WARPS = tile, warps
        t = gpu_time(lambda: g._ctr(dk, plain, wire, ok, nbytes, CHUNK, CHUNK, CHUNK + 16, 1, 0, dk.zero_counter, False), reps)
        rows.append({"tile": tile, "warps": warps, "ctr_GBps": nbytes / t / 1e9})
    g.CTR_TILE, g.CTR_WARPS = default
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variants", action="store_true", help="also time CTR tile variants (each one compiles)")
    ap.add_argument("--sizes-mib", default=None,
                    help="comma-separated sizes (default: powers of two up to --max-mib); each new size class "
                         "compiles its own GHASH/finalize specialization, minutes on a fresh machine")
    ap.add_argument("--no-check", action="store_true", help="skip the OpenSSL bit-exactness check")
    args = ap.parse_args()
    dev = cuda_device()
    result = {"env": environment(), "chunk_bytes": CHUNK, "correctness": None if args.no_check else check(dev)}
    sizes = ([int(m) << 20 for m in args.sizes_mib.split(",")] if args.sizes_mib else
             [1 << (20 + i) for i in range(11) if (1 << i) <= args.max_mib])
    result["throughput"] = []
    for n in sizes:
        t0 = time.perf_counter()
        result["throughput"].append(throughput(dev, n, args.reps))
        result["throughput"][-1]["first_call_s"] = time.perf_counter() - t0   # compile included
        print({k: round(v, 1) for k, v in result["throughput"][-1].items()}, flush=True)
    write_json("secure_kernel", result)
    result["breakdown_GBps"] = breakdown(dev, sizes[-1], args.reps)
    if args.variants:
        result["ctr_variants"] = ctr_variants(dev, min(sizes[-1], 256 << 20), args.reps)
        print_table("CTR variants (GB/s)", ["tile", "warps", "ctr"],
                    [[r["tile"], r["warps"], r["ctr_GBps"]] for r in result["ctr_variants"]])
    write_json("secure_kernel", result)
    print_table(f"kernel breakdown at {sizes[-1] >> 20} MiB (GB/s of message bytes, each kernel alone)",
                list(result["breakdown_GBps"]), [list(result["breakdown_GBps"].values())])
    print_table("GPU AES-256-GCM, 1 MiB chunks (GB/s)", ["MiB", "encrypt", "decrypt+verify", "d2d copy"],
                [[r["bytes"] >> 20, r["encrypt_GBps"], r["decrypt_GBps"], r["d2d_copy_GBps"]]
                 for r in result["throughput"]])


if __name__ == "__main__":
    main()
