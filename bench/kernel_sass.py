"""Instruction mix of the decode attention kernel per KV format, compiled for sm_90 on this (CPU) machine.

Costs no device time: the wrapper is run on CPU tensors with the kernel replaced by a recorder (as
tests/kernels/sm90_compile.py does), the recorded launch is compiled for an H100 the way the launcher would
specialize it (integer arguments equal to 1 become constants, multiples of 16 are marked divisible, the dots
run in bf16 as on the GPU), and the cubin is disassembled with Triton's bundled nvdisasm. What it answers:
are the loads wide (LDG.E.128, LDGSTS) or one element at a time (LDG.E.U8/U16), how many conversions and
shared-memory round trips a tile costs. This is how the per-element scale loads of the first quantized kernels
were found (128 two-byte loads per thread and tile).

Usage: python bench/kernel_sass.py [PRESET ...] [NAME=VALUE ...]   (NAME=VALUE overrides a constexpr or a
launch option, e.g. BLOCK_N=128 num_warps=8). Env TRITON_ALWAYS_COMPILE=1 avoids a stale cache.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tests.kernels.sm90_compile as recorder  # noqa: E402
from ccserve.kernels import decode_attention as dec  # noqa: E402
from ccserve.kv.formats import kv_format  # noqa: E402
from tests.kernels.quantized import make_cache  # noqa: E402

NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
OPCODE = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def compile_like_launcher(fn, args: list, kwargs: dict):
    """triton.compile with the launcher's specializations (see the module docstring)."""
    values = dict(zip([p.name for p in fn.params], args))
    values.update({k: v for k, v in kwargs.items() if k not in recorder.LAUNCH_OPTIONS})
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr or (isinstance(v, int) and not isinstance(v, bool) and v == 1 and not p.do_not_specialize):
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name], attrs[(i,)] = "*" + recorder.TYPES[v.dtype], [["tt.divisibility", 16]]
        elif isinstance(v, int):
            signature[p.name] = "i64" if abs(v) >= 2 ** 31 else "i32"
            if v % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = "fp32"
    options = {k: kwargs[k] for k in recorder.LAUNCH_OPTIONS if k in kwargs}
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)


def opcode_counts(cubin: bytes) -> collections.Counter:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(NVDISASM), "-c", f.name], capture_output=True, text=True, check=True).stdout
    return collections.Counter(m.group(1) for m in map(OPCODE.search, sass.splitlines()) if m)


def main(names: list[str], overrides: dict[str, int]) -> None:
    recorder.patch(dec, "_decode_partial_kernel")
    recorder.patch(dec, "_decode_reduce_kernel")
    for name in names:
        _, k, v = make_cache(kv_format(name), 64, 8, 16, 128, torch.bfloat16)
        recorder.launches.clear()
        q = torch.randn(16, 32, 128, dtype=torch.bfloat16)
        lens = torch.full((16,), 1024, dtype=torch.int32)
        tables = torch.arange(64, dtype=torch.int32).repeat(16, 1)
        dec.decode_attention_triton(q, k, v, lens, tables, 128 ** -0.5, num_splits=2)
        _, fn, args, kwargs = recorder.launches[0]
        kwargs.update(DOT_FP32=False, DOT_PRECISION="tf32", **overrides)      # as on a GPU (q.is_cuda)
        ops = opcode_counts(compile_like_launcher(fn, args, kwargs).asm["cubin"])
        memory = {op: n for op, n in sorted(ops.items()) if op.startswith(("LDG", "LDS", "STS", "STL", "LDL"))}
        print(f"{name}: {sum(ops.values())} instructions; memory {memory}")
        print("   top: " + ", ".join(f"{op} {n}" for op, n in ops.most_common(16)))


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    cli = sys.argv[1:]
    main([a for a in cli if "=" not in a] or ["bf16", "fp8", "K8V4"],
         {a.split("=")[0]: int(a.split("=")[1]) for a in cli if "=" in a})
