"""Build the attention and KV-store kernels for sm_90 exactly as their wrappers would launch them (run as a
script without TRITON_INTERPRET; tests/kernels/test_sm90_compile.py drives it). The wrappers run on CPU tensors
with each kernel replaced by a recorder, so nothing executes; every recorded launch is then compiled with ptxas
for an H100 (with TRITON_DUMP_PTXAS_LOG=1 ptxas reports each kernel's spills). Prints one line per kernel and
format, and a FAIL line for each that does not build."""
from __future__ import annotations

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ccserve.kernels import attention_importance as imp
from ccserve.kernels import decode_attention as dec
from ccserve.kernels import kv_store as st
from ccserve.kernels import prefill_attention as pre
from ccserve.kernels import rotary as rot
from ccserve.kernels import rotary_store as rs
from tests.kernels.quantized import make_cache

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8", torch.float8_e4m3fn: "fp8e4nv"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")
launches: list[tuple[str, object, list, dict]] = []
# The keep mask's code is the same for every format; these cover the model dtype, per-token scales (scores and
# probabilities scaled) and dequantized tiles. All six presets built with it once (7 min on a busy 2-core CPU).
SPARSE_FORMATS = ("bf16", "fp8", "K8V4")


class Recorder:
    def __init__(self, name: str, fn) -> None:
        self.name, self.fn = name, fn

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            launches.append((self.name, self.fn, list(args), kwargs))
        return record


def patch(module, name: str) -> None:
    setattr(module, name, Recorder(name, getattr(module, name)))


def compile_launch(name: str, fn, args: list, kwargs: dict) -> str:
    params = [p for p in fn.params]
    values = dict(zip([p.name for p in params], args))
    values.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    sig, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(params):
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            constexprs[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i64" if abs(v) >= 2 ** 31 else "i32"
        else:
            sig[p.name] = "fp32"
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=options)
    return "compiled"


def main(formats: list[str]) -> None:
    for name in ("_decode_partial_kernel", "_decode_reduce_kernel"):
        patch(dec, name)
    patch(pre, "_prefill_kernel")
    for name in ("_decode_importance_kernel", "_prefill_importance_kernel"):
        patch(imp, name)
    patch(rs, "_rotary_store_kernel")
    patch(rot, "_rotary_kernel")
    for name in ("_store_kv_kernel", "_store_token_quant_kernel", "_store_channel_quant_kernel"):
        patch(st, name)
    hk, bs, d, h = 8, 16, 128, 32
    for fmt_name in formats:
        from ccserve.kv.formats import kv_format
        _, k, v = make_cache(kv_format(fmt_name), 64, hk, bs, d, torch.bfloat16)
        start = len(launches)
        q = torch.randn(4, h, d, dtype=torch.bfloat16)
        lens = torch.tensor([40, 17, 64, 3], dtype=torch.int32)
        tables = torch.arange(16, dtype=torch.int32).view(4, 4)
        dec.decode_attention_triton(q, k, v, lens, tables, d ** -0.5, num_splits=4)
        dec.decode_attention_triton(q, k, v, lens, tables, d ** -0.5, num_splits=1)
        cu = torch.tensor([0, 20, 30], dtype=torch.int32)
        pre.prefill_attention_triton(torch.randn(30, h, d, dtype=torch.bfloat16), k, v, cu,
                                     torch.tensor([40, 10], dtype=torch.int32), tables[:2], d ** -0.5, 20)
        if fmt_name in SPARSE_FORMATS:         # --kv-sparsity: keep mask, log2-sum-exp out, importance kernels
            pruned = torch.zeros(64, hk, bs, dtype=torch.uint8)
            importance = torch.zeros(64, hk, bs)
            lse = torch.empty(4, h)
            dec.decode_attention_triton(q, k, v, lens, tables, d ** -0.5, num_splits=4, pruned=pruned, lse=lse)
            dec.decode_attention_triton(q, k, v, lens, tables, d ** -0.5, num_splits=1, pruned=pruned, lse=lse)
            imp.add_decode_importance(q, k, lens, tables, d ** -0.5, lse, importance, pruned)
            qp = torch.randn(30, h, d, dtype=torch.bfloat16)
            plen = torch.tensor([40, 10], dtype=torch.int32)
            pre.prefill_attention_triton(qp, k, v, cu, plen, tables[:2], d ** -0.5, 20, pruned=pruned,
                                         lse=torch.empty(30, h))
            imp.add_prefill_importance(qp, k, cu, plen, tables[:2], d ** -0.5, torch.empty(30, h), importance, pruned)
        st.store_kv_triton(torch.randn(5, hk, d, dtype=torch.bfloat16), torch.randn(5, hk, d, dtype=torch.bfloat16),
                           k, v, torch.tensor([0, 1, 2, 17, 40]))
        qkv = torch.randn(5, h + 2 * hk, d, dtype=torch.bfloat16)
        if isinstance(k, torch.Tensor):          # the fused rotary + store serves model-dtype caches
            rs.rotary_store_triton(torch.arange(5), qkv[:, :h], qkv[:, h:h + hk], qkv[:, h + hk:],
                                   torch.randn(64, d), k, v, torch.tensor([0, 1, 2, 17, 40]))
        elif fmt_name == formats[-1]:            # quantized caches rotate in place first (one build is enough)
            rot.rotary_triton(torch.arange(5), qkv[:, :h], qkv[:, h:h + hk], torch.randn(64, d), d)
        for kname, fn, args, kwargs in launches[start:]:
            try:
                report = compile_launch(kname, fn, args, kwargs)
                print(f"{fmt_name} {kname}: {report}", flush=True)
            except Exception as exc:  # report every failure, not only the first
                print(f"FAIL {fmt_name} {kname}: {type(exc).__name__}: {str(exc)[:2000]}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["bf16", "fp8", "K8V4", "K4V2"])
