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

import triton
import triton.language as tl


@dataclass(frozen=True)
class Blocks:
    block_n: int
    block_k: int
    warps: int = 4
    block_m: int = 1


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


def gemm_blocks(m: int, k: int, k_multiple: int = 1) -> Blocks:
    """tl.dot needs 16 at least in each dimension; for 2-16 rows the sweep preferred 32 columns and
    a K step of 256."""
    if m <= 16:
        return Blocks(block_n=32, block_k=dividing(k, 256, k_multiple) if k_multiple > 1 else 256, block_m=16)
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
