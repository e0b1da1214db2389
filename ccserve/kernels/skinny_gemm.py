"""Skinny GEMM for decode: y[M, N] = x[M, K] @ W[N, K]^T (+ bias) with M <= 16 rows.

At decode batch sizes a linear layer is a pass over its weight: the FLOPs are nothing, the time is bytes / HBM
bandwidth. cuBLAS picks split-K GEMV kernels for some Llama shapes that stay well below copy bandwidth (o_proj
4096x4096 at ~50%) and adds a second reduce launch. Here each program owns a BLOCK_N slab of output columns and
streams those rows of W once, along K, in wide loads; x (a few KB) comes from L1/L2 on every K step.

Two inner products, picked per config: `use_dot` runs tl.dot on W[BLOCK_N, BLOCK_K] @ x^T[BLOCK_K, 16] ("swap
AB": the weight is the tall operand, x is padded to the 16-row minimum; tensor cores have FLOPs to spare, and
Triton pipelines the loads that feed a dot), the other multiplies and sums in fp32 registers, best for one row.

Shapes with too few column slabs to fill the GPU split K across programs. Their fp32 partials are combined
either by a second tiny kernel, or inside the same launch: every program writes its partial, bumps a per-slab
counter, and the last to arrive sums the partials in split order (so results are deterministic) and resets the
counter to zero for the next launch. The counters live in one zeroed buffer per device, allocated on first use;
launches that share it must run on one stream, one after another (as a decode step does).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ccserve.kernels.prefill_attention import dot_types

DOT_ROWS = 16          # x rows a tl.dot program computes (its minimum N dimension); M <= DOT_ROWS
MAX_ROWS = DOT_ROWS
MAX_SERIAL_TILES = 1 << 14   # column slabs the in-kernel split-K combine can count (per device)
DEFAULT_SMS = 132      # H100 SXM; the launcher asks the device
FMA_TILE = 4096        # W elements per K step of an fma program: 32 fp32 accumulators a thread at 4 warps


@dataclass(frozen=True)
class SkinnyConfig:
    """How one launch tiles the GEMM. block_k is an upper bound: the launcher shrinks it for short K."""
    block_n: int
    block_k: int
    split_k: int = 1
    use_dot: bool = True
    serial_combine: bool = True   # split_k > 1: combine in the same launch (counters), else in a second kernel
    num_warps: int = 4
    num_stages: int = 3

    def describe(self) -> str:
        combine = "" if self.split_k == 1 else f"x{self.split_k}{'s' if self.serial_combine else 'r'}"
        return (f"{'dot' if self.use_dot else 'fma'} n{self.block_n} k{self.block_k}{combine} "
                f"w{self.num_warps} s{self.num_stages}")


def skinny_gemm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T + bias, accumulated in fp32 and rounded once to x's dtype."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def choose_config(m: int, n: int, k: int, num_sms: int = DEFAULT_SMS) -> SkinnyConfig:
    """A config from the shape alone (so CUDA graphs replay what they captured). One row multiplies on CUDA
    cores, more on tensor cores. The slab is the widest that still gives >= 4 programs per SM (so no SM idles
    while others finish), the narrowest otherwise; K is split only while there are fewer programs than SMs and
    each split keeps >= 4 K steps (small-N shapes, e.g. tensor-parallel shards)."""
    use_dot = m > 1
    widths = (32, 16) if use_dot else (32, 16, 8)
    block_n = next((w for w in widths if triton.cdiv(n, w) >= 4 * num_sms), widths[-1])
    block_k = 256 if use_dot else FMA_TILE // block_n
    split_k = 1
    while triton.cdiv(n, block_n) * split_k < num_sms and k >= 2 * split_k * 4 * block_k:
        split_k *= 2
    return SkinnyConfig(block_n, block_k, split_k, use_dot)


@triton.jit
def _store_tile(acc, Bias, Y, offs_n, offs_m, M, N, HAS_BIAS: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] fp32 -> y[m, n] in Y's dtype, bias added in fp32."""
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    tl.store(Y + offs_m[None, :].to(tl.int64) * N + offs_n[:, None], acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _load_w(w_rows, offs_k, k_ok, EVEN_K: tl.constexpr):
    """A [BLOCK_N, BLOCK_K] tile of W: unmasked when every split is whole tiles, so loads stay 16 bytes wide."""
    if EVEN_K:
        return tl.load(w_rows + offs_k[None, :])
    return tl.load(w_rows + offs_k[None, :], mask=k_ok[None, :], other=0.0)


@triton.jit
def _slab_dot(X, w_rows, offs_m, m_ok, k_start, k_per_split, K, stride_xm, BLOCK_N: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """[BLOCK_N, BLOCK_M] = W slab @ x^T over one K split, on tensor cores; Triton pipelines the W loads
    (num_stages) because they feed a dot. DOT_FP32: the interpreter's bf16 dot multiplies raw bits."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, k_per_split, BLOCK_K):
        offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        w = _load_w(w_rows, offs_k, k_ok, EVEN_K)
        xt = tl.load(X + offs_m[None, :] * stride_xm + offs_k[:, None], mask=m_ok[None, :] & k_ok[:, None], other=0.0)
        if DOT_FP32:
            w, xt = w.to(tl.float32), xt.to(tl.float32)
        acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _slab_fma(X, w_rows, offs_m, m_ok, k_start, k_per_split, K, stride_xm, BLOCK_N: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The same on CUDA cores for one or a few rows: products pile up elementwise in [BLOCK_N, BLOCK_M,
    BLOCK_K] registers and are summed across threads once at the end, not on every K step."""
    acc = tl.zeros((BLOCK_N, BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, k_per_split, BLOCK_K):
        offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        w = _load_w(w_rows, offs_k, k_ok, EVEN_K)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32)[:, None, :] * x.to(tl.float32)[None, :, :]
    return tl.sum(acc, axis=2)


@triton.jit
def _combine_in_kernel(acc, Partials, Counters, Bias, Y, pid_n, pid_k, offs_n, offs_m, M, N,
                       SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Publish this split's partial; the slab's last program to arrive sums all of them in split order, writes
    y and resets the slab's counter."""
    tile = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    tl.store(Partials + pid_k * M * N + tile, acc, mask=mask)
    tl.debug_barrier()   # every thread's partial is written before the release below publishes them
    if tl.atomic_add(Counters + pid_n, 1, sem="acq_rel") == SPLIT_K - 1:
        total = tl.zeros(acc.shape, dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):   # L2 reads (.cg): other SMs wrote these
            total += tl.load(Partials + s * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
        _store_tile(total, Bias, Y, offs_n, offs_m, M, N, HAS_BIAS)
        tl.store(Counters + pid_n, 0)


@triton.jit(do_not_specialize=["M"])
def _skinny_gemm_kernel(X, W, Bias, Y, Partials, Counters, M, N, K, stride_xm, stride_wn, k_per_split,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                        USE_DOT: tl.constexpr, SERIAL_COMBINE: tl.constexpr, DOT_FP32: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N), SPLIT_K). Rows of W past N are read as row n % N (valid memory, never stored), so
    W loads carry a mask only along K, and none when every split is whole tiles (EVEN_K)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    w_rows = W + ((offs_n % N).to(tl.int64) * stride_wn)[:, None]
    m_ok = offs_m < M
    k_start = pid_k * k_per_split
    if USE_DOT:
        acc = _slab_dot(X, w_rows, offs_m, m_ok, k_start, k_per_split, K, stride_xm, BLOCK_N, BLOCK_M, BLOCK_K,
                        EVEN_K, DOT_FP32, DOT_PRECISION)
    else:
        acc = _slab_fma(X, w_rows, offs_m, m_ok, k_start, k_per_split, K, stride_xm, BLOCK_N, BLOCK_M, BLOCK_K,
                        EVEN_K)
    if SPLIT_K == 1:
        _store_tile(acc, Bias, Y, offs_n, offs_m, M, N, HAS_BIAS)
    elif SERIAL_COMBINE:
        _combine_in_kernel(acc, Partials, Counters, Bias, Y, pid_n, pid_k, offs_n, offs_m, M, N, SPLIT_K, HAS_BIAS)
    else:
        tl.store(Partials + pid_k * M * N + offs_m[None, :].to(tl.int64) * N + offs_n[:, None], acc,
                 mask=(offs_n < N)[:, None] & m_ok[None, :])


@triton.jit(do_not_specialize=["total"])
def _split_k_reduce_kernel(Partials, Bias, Y, total, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK: tl.constexpr):
    """The second-kernel combine: y (flat [M * N]) = sum of the SPLIT_K partial planes + bias, in split order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(Partials + s * total + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(Bias + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)


_counters: dict[torch.device, torch.Tensor] = {}
_num_sms: dict[torch.device, int] = {}


def _split_counters(device: torch.device) -> torch.Tensor:
    """The device's zeroed slab counters. Allocating them inside a CUDA graph capture would leave them unset
    outside it, so the first split-K launch must be an eager one (the model runner's warm-up is)."""
    if device not in _counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("skinny_gemm: run one eager forward pass before capturing a CUDA graph "
                               "(split-K counters are allocated on first use)")
        _counters[device] = torch.zeros(MAX_SERIAL_TILES, dtype=torch.int32, device=device)
    return _counters[device]


def device_sms(device: torch.device) -> int:
    """SM count of a CUDA device (cached), DEFAULT_SMS elsewhere (the CPU interpreter)."""
    if device.type != "cuda":
        return DEFAULT_SMS
    if device not in _num_sms:
        _num_sms[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _num_sms[device]


def _fit(cfg: SkinnyConfig, k: int) -> SkinnyConfig:
    """Shrink block_k to K (>= 16, tl.dot's minimum) and drop splits that would be empty."""
    if cfg.use_dot and cfg.block_n < 16:
        raise ValueError(f"skinny_gemm: tl.dot needs block_n >= 16, got {cfg.block_n}")
    block_k = max(16, min(cfg.block_k, triton.next_power_of_2(k)))
    return replace(cfg, block_k=block_k, split_k=max(1, min(cfg.split_k, triton.cdiv(k, block_k))))


def skinny_gemm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       config: SkinnyConfig | None = None) -> torch.Tensor:
    """Same contract as skinny_gemm_ref for at most MAX_ROWS rows of x (a strided row view is read in place);
    weight must be row-major [N, K] in x's dtype. config overrides choose_config (benchmarks sweep it)."""
    k, n = x.shape[-1], weight.shape[0]
    rows = x.reshape(-1, k) if x.stride(-1) == 1 else x.contiguous().view(-1, k)
    m = rows.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"skinny_gemm takes at most {MAX_ROWS} rows, got {m}: use F.linear for larger batches")
    if weight.shape[1] != k or weight.stride(1) != 1 or weight.dtype != x.dtype:
        raise ValueError(f"skinny_gemm needs a row-major [N, {k}] weight in {x.dtype}, got "
                         f"{tuple(weight.shape)} {weight.dtype} with strides {weight.stride()}")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.view(*x.shape[:-1], n)
    cfg = _fit(config or choose_config(m, n, k, device_sms(x.device)), k)
    _launch(rows, weight, bias, y, cfg)
    return y.view(*x.shape[:-1], n)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
            cfg: SkinnyConfig) -> None:
    (m, k), n = x.shape, weight.shape[0]
    tiles = triton.cdiv(n, cfg.block_n)
    k_per_split = triton.cdiv(k, cfg.split_k * cfg.block_k) * cfg.block_k
    serial = cfg.split_k > 1 and cfg.serial_combine
    if serial and tiles > MAX_SERIAL_TILES:
        raise ValueError(f"skinny_gemm: {tiles} column slabs exceed the {MAX_SERIAL_TILES} split-K counters; "
                         "use a wider block_n or serial_combine=False")
    partials = y if cfg.split_k == 1 else torch.empty(cfg.split_k, m, n, dtype=torch.float32, device=x.device)
    counters = _split_counters(x.device) if serial else partials
    dot_fp32, dot_precision = dot_types(x)
    _skinny_gemm_kernel[(tiles, cfg.split_k)](
        x, weight, y if bias is None else bias, y, partials, counters, m, n, k, x.stride(0), weight.stride(0),
        k_per_split, HAS_BIAS=bias is not None, BLOCK_M=DOT_ROWS if cfg.use_dot else triton.next_power_of_2(m),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, EVEN_K=k % (cfg.split_k * cfg.block_k) == 0,
        USE_DOT=cfg.use_dot, SERIAL_COMBINE=serial, DOT_FP32=dot_fp32, DOT_PRECISION=dot_precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.split_k > 1 and not serial:
        block = 1024
        _split_k_reduce_kernel[(triton.cdiv(m * n, block),)](
            partials, y if bias is None else bias, y, m * n, n, SPLIT_K=cfg.split_k, HAS_BIAS=bias is not None,
            BLOCK=block, num_warps=4)


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel on CUDA tensors, the PyTorch reference elsewhere."""
    if x.is_cuda:
        return skinny_gemm_triton(x, weight, bias)
    return skinny_gemm_ref(x, weight, bias)
