"""Tile shapes shared by the kernels, and one launch over up to three weights that share an input.

Batch-1 decode is bound by the bytes in flight: a GEMV program streams BLOCK_N weight rows, and the
grid should give each multiprocessor several programs. The shapes here are the ones
`benchmarks/decode.py --sweep` measured fastest on an H200.

At batch 1 a decode step is ~225 GEMVs, and the small ones (an 8B model's k and v: 8 MB in bf16,
2 MB in 4-bit) cost their launch and tail more than their bytes. The GEMV kernels therefore take
three (weight, scale, output) triples with their row counts; `segment` finds a program's triple, so
a layer's q, k and v are one grid. Unused triples have 0 rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from core.kernels import interpreted


@dataclass(frozen=True)
class Blocks:
    block_n: int
    block_k: int
    warps: int = 4
    block_m: int = 1
    stages: int = 3  # Triton's software pipelining of the K loop (tl.dot kernels)


def gemv_blocks(k: int, weight_bits: int, silu_pair: bool = False, k_multiple: int = 64) -> Blocks:
    """Tile shape of a one-token GEMV, from `decode.py --sweep` on an H200 (8B shapes, RESULTS.md).

    Many small programs won for 16- and 8-bit weights: two rows each, a K step of ~8 KB of weights
    (a whole 4096-wide int8 row), so every multiprocessor keeps several programs' loads in flight;
    rows whose length is no power of two (14336) take the largest dividing step and more rows. The
    4-bit kernel is bound by its decode instructions, not by loads: its shape mattered little, except
    that gate/up (two row sets per program) preferred more, shorter rows."""
    if weight_bits == 4:
        if silu_pair:
            return Blocks(16, dividing(k, 1024, k_multiple))
        return Blocks(4, dividing(k, 4096, k_multiple))
    block_k = dividing(k, 8192 * 8 // (weight_bits * 2), 16)
    block_n = max(2, 8192 * 8 // (weight_bits * block_k))
    return Blocks(block_n, block_k, warps=8 if weight_bits == 16 or block_n > 2 else 4)


def gemm_blocks(m: int, k: int, bits: int, k_multiple: int = 1) -> Blocks:
    """Tile shape of the tl.dot kernels. tl.dot needs 16 at least in each dimension, so 2-16 rows
    are one 16-row tile and each program streams a stripe of weight rows once for all of them."""
    if m <= 16:
        step = 256 * 8 // max(bits, 8)  # ~8 KB of int8 or 16-bit weights per K step; 4-bit as int8
        return Blocks(block_n=32, block_k=dividing(k, step, k_multiple) if k_multiple > 1 else step, block_m=16)
    return Blocks(block_n=64, block_k=dividing(k, 64, k_multiple) if k_multiple > 1 else 64, block_m=64)


def dividing(k: int, target: int, floor: int) -> int:
    """The largest power of two <= max(target, floor) that divides k (a multiple of `floor`, a power of two)."""
    size = floor
    while size * 2 <= target and k % (size * 2) == 0:
        size *= 2
    return size


@triton.jit
def row_dots(x_ptr, w_ptr, rows, live, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_N]: x · W[row] for each of `rows` of a row-major [N, K] weight (16-bit, or int8 codes)."""
    base = w_ptr + rows.to(tl.int64)[:, None] * K
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)  # one cross-thread reduction, after the loop
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        inside = cols < K
        w = tl.load(base + cols[None, :], mask=live[:, None] & inside[None, :], other=0.0)
        x = tl.load(x_ptr + cols, mask=inside, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    return tl.sum(acc, axis=1)


@triton.jit(do_not_specialize=["M"])  # one compile for every row count of a batched step
def dense_gemm_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, M, N, K: tl.constexpr, stride_xm, stride_om,
                      SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      FP32_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """x [M, K] · W[N, K]ᵀ for a row-major W of 16-bit weights or int8 codes (converted to x's dtype,
    exact for |code| <= 127), times scale[n] / 127 when SCALED (LLM.int8()'s row absmax), once per output.
    Each program reads a BLOCK_N x K stripe of W once for all the BLOCK_M rows: at 16 rows or fewer
    the bytes are those of one row."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * K + ks[None, :],
                    mask=(cols[:, None] < N) & (ks[None, :] < K), other=0)
        if FP32_DOT:  # Triton 3.6's interpreter multiplies bf16 bit patterns as integers in tl.dot
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
    if SCALED:
        acc = acc * (tl.load(scale_ptr + cols, mask=cols < N, other=0.0) * (1.0 / 127.0))[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def launch_dense_gemm(x2, w, scale, out, blocks: Blocks | None = None) -> None:
    """x2 ([M, K], unit stride along K) · Wᵀ (· scale / 127 when `scale` is given) into out ([M, N])."""
    m, k = x2.shape
    n = w.shape[0]
    blocks = blocks or gemm_blocks(m, k, bits=8 * w.element_size())
    grid = (triton.cdiv(n, blocks.block_n), triton.cdiv(m, blocks.block_m))
    dense_gemm_kernel[grid](x2, w, w if scale is None else scale, out, m, n, k, x2.stride(0), out.stride(0),
                            SCALED=scale is not None, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
                            BLOCK_K=blocks.block_k, FP32_DOT=interpreted(dense_gemm_kernel),
                            PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", num_warps=blocks.warps,
                            num_stages=blocks.stages)


@triton.jit
def segment(pid, N0, N1, N2, w0, w1, w2, s0, s1, s2, o0, o1, o2, BLOCK_N: tl.constexpr):
    """(weight, scale, output, rows of that weight, first row) for program `pid`."""
    blocks0 = tl.cdiv(N0, BLOCK_N)
    blocks1 = tl.cdiv(N1, BLOCK_N)
    if pid < blocks0:
        w, s, o, n, first = w0, s0, o0, N0, pid * BLOCK_N
    elif pid < blocks0 + blocks1:
        w, s, o, n, first = w1, s1, o1, N1, (pid - blocks0) * BLOCK_N
    else:
        w, s, o, n, first = w2, s2, o2, N2, (pid - blocks0 - blocks1) * BLOCK_N
    return w, s, o, n, first


def gemv_grid(rows: list[int], block_n: int, silu_pair: bool) -> tuple[int]:
    if silu_pair:  # gate and up rows are computed by the same program
        return (triton.cdiv(rows[0], block_n),)
    return (sum(triton.cdiv(n, block_n) for n in rows),)


def three(items: list) -> list:
    """Fills unused triples with the first (never read: their row count is 0)."""
    return items + [items[0]] * (3 - len(items))


def three_rows(rows: list[int]) -> list[int]:
    return rows + [0] * (3 - len(rows))


def rows_of(x):
    """x as [M, K] with unit stride along K (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def outputs(x, rows: list[int], silu_pair: bool) -> list:
    """Output tensors of a grouped GEMV: one per weight, or one for silu(gate) · up."""
    return [x.new_empty((*x.shape[:-1], n)) for n in (rows[:1] if silu_pair else rows)]
