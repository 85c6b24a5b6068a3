"""Tile shapes shared by the kernels, and one launch over up to three weights that share an input.

Batch-1 decode is bound by the bytes in flight: a GEMV program streams BLOCK_N weight rows, and the
grid should give each multiprocessor several programs. The shapes here are the ones
`benchmarks/decode_sweep.py` measured fastest on an H200.

At batch 1 a decode step is ~225 GEMVs, and the small ones (an 8B model's k and v: 8 MB in bf16,
2 MB in 4-bit) cost their launch and tail more than their bytes. The GEMV kernels therefore take
three (weight, scale, output) triples with their row counts; `segment` finds a program's triple, so
a layer's q, k and v are one grid. Unused triples have 0 rows.

A batched step's 2-16 rows go through `tl.dot` kernels (the dense GEMM here for int8 and 16-bit
weights, core.kernels.w4a16's for 4-bit) whose K is split into parts where the grid would otherwise
leave multiprocessors idle; the parts of a tile meet in `store_tile`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    split: int = 1  # tl.dot kernels: K parts per output tile, summed by the last part to finish


def gemv_blocks(k: int, weight_bits: int, silu_pair: bool = False, k_multiple: int = 64) -> Blocks:
    """Tile shape of a one-token GEMV, from `decode_sweep.py --gemv-tiles` on an H200 (8B shapes, RESULTS.md).

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


def gemm_blocks(m: int, n: int, k: int, bits: int, k_multiple: int = 1) -> Blocks:
    """Tile shape of the tl.dot kernels. tl.dot needs 16 at least in each dimension, so 2-16 rows
    are one 16-row tile and each program streams a stripe of weight rows once for all of them.

    One program per 32 weight rows gave an 8B model's 4096-row layers 128 programs, one per
    multiprocessor: each K step's decode is a long dependent chain, and with one warp per scheduler
    the 4-bit GEMM ran at 13% of copy bandwidth whatever the tile. K is therefore split until the
    grid has about 1024 programs (4-bit) or 512 (int8, 16-bit), and the 4-bit GEMM takes 64 rows and
    a short K step, so that each activation tile read from shared memory serves more weights: 2.0x
    on q/o/down, 1.4x on gate/up (decode_sweep.py on an H200, RESULTS.md)."""
    if m > 16:
        return Blocks(block_n=64, block_k=dividing(k, 64, k_multiple) if k_multiple > 1 else 64, block_m=64)
    if bits == 4:
        block_n, block_k, programs = 64, dividing(k, 128, k_multiple), SPLIT_PROGRAMS
    else:
        block_n, block_k, programs = 32, 256 * 8 // bits, SPLIT_PROGRAMS // 2  # ~8 KB of weights a K step
    return Blocks(block_n, block_k, block_m=16, split=split_k(n, k, block_n, block_k, programs))


SPLIT_PROGRAMS = 1024  # ~8 programs per multiprocessor of an H200 (132); also bounds the split scratch


def split_k(n: int, k: int, block_n: int, block_k: int, programs: int = SPLIT_PROGRAMS) -> int:
    """K parts per tile (a power of two up to 16, each a whole number of K steps) so that the grid has
    at most `programs` programs; 1 where K does not divide into steps."""
    tiles, steps = triton.cdiv(n, block_n), k // block_k
    split = 1
    while k % block_k == 0 and split < 16 and tiles * split * 2 <= programs and steps % (split * 2) == 0:
        split *= 2
    return split


_scratch: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def split_scratch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fp32 partials and per-tile arrival counters for split-K launches on `device`: allocated once
    (4 MB: SPLIT_PROGRAMS programs of at most 16 x 64 outputs) and kept for the process, so that
    captured CUDA graphs keep valid addresses. The counters are zero between launches (the last part
    of each tile resets its own); launches on one device must not overlap (one stream), as in a
    decode step. None while a CUDA graph is being captured before the first split launch: then the
    caller does not split."""
    if device not in _scratch:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _scratch[device] = (torch.empty(SPLIT_PROGRAMS * 16 * 64, dtype=torch.float32, device=device),
                            torch.zeros(SPLIT_PROGRAMS, dtype=torch.int32, device=device))
    return _scratch[device]


def split_args(x2: torch.Tensor, out: torch.Tensor, blocks: Blocks) -> tuple[Blocks, dict]:
    """The blocks to launch with (no split when the scratch cannot be had or would overflow) and the
    scratch pointers (stand-ins when not split: never read)."""
    n = out.shape[1]
    fits = triton.cdiv(n, blocks.block_n) * blocks.split <= SPLIT_PROGRAMS and blocks.block_m * blocks.block_n <= 1024
    scratch = split_scratch(x2.device) if blocks.split > 1 and fits and x2.shape[0] <= blocks.block_m \
        else None
    if scratch is None:
        return replace(blocks, split=1), dict(partial_ptr=out, count_ptr=out, SPLIT=1)
    return blocks, dict(partial_ptr=scratch[0], count_ptr=scratch[1], SPLIT=blocks.split)


def gemm_grid(m: int, n: int, blocks: Blocks) -> tuple[int, int, int]:
    return triton.cdiv(n, blocks.block_n), triton.cdiv(m, blocks.block_m), blocks.split


@triton.jit
def store_tile(acc, out_ptr, partial_ptr, count_ptr, rows, cols, M, N, stride_om, SPLIT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stores a tl.dot kernel's fp32 tile. With SPLIT > 1 (grid axis 2: the K part) each part writes
    its partial, and the last part of the tile to arrive sums all of them in part order (the same
    result whichever arrives last), stores, and resets the tile's counter for the next launch."""
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    outs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    if SPLIT == 1:
        tl.store(outs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tile = tl.program_id(0)
        local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        base = partial_ptr + tile * SPLIT * BLOCK_M * BLOCK_N
        tl.store(base + tl.program_id(2) * BLOCK_M * BLOCK_N + local, acc)
        tl.debug_barrier()  # every thread's partial is written before the tile's counter moves
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for part in tl.static_range(SPLIT):  # .cg: past L1, which may hold an older launch's lines
                total += tl.load(base + part * BLOCK_M * BLOCK_N + local, cache_modifier=".cg")
            tl.store(outs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")


def dividing(k: int, target: int, floor: int) -> int:
    """The largest power of two <= max(target, floor) that divides k (a multiple of `floor`, a power of two)."""
    size = floor
    while size * 2 <= target and k % (size * 2) == 0:
        size *= 2
    return size


# int8 codes to floats without the integer-to-float instruction. `cvt` from int8 (I2F) issues at 16 results a clock
# on a multiprocessor against 128 for an FMA, so a one-row int8 GEMV converting each weight with it is bound by the
# conversions, not by its bytes (H200: gate/up at 3.2 TB/s against bf16's 4.4). Here, four codes a register: flip
# each byte's sign bit (w + 128, 0-255), place the byte under the exponent of 2^23 with a byte permute (the float
# 2^23 + w + 128), and subtract 2^23 + 128: exactly w, in integer and float instructions that issue at full rate
# (FasterTransformer's conversion). For 16-bit results the float's upper half is the bf16 of w (|w| <= 128 has at
# most 8 significant bits), and for fp16 the byte goes under 1024's exponent (10 mantissa bits), two per register.
CONVERT_PLAIN, CONVERT_F32, CONVERT_BF16, CONVERT_F16 = 0, 1, 2, 3
_F32_ASM = tl.constexpr("""{
.reg .b32 t, m;
mov.b32 m, 0x4B000000;
xor.b32 t, $4, 0x80808080;
prmt.b32 $0, t, m, 0x7650;
prmt.b32 $1, t, m, 0x7651;
prmt.b32 $2, t, m, 0x7652;
prmt.b32 $3, t, m, 0x7653;
sub.f32 $0, $0, 0f4B000080;
sub.f32 $1, $1, 0f4B000080;
sub.f32 $2, $2, 0f4B000080;
sub.f32 $3, $3, 0f4B000080;
}""")
_BF16_ASM = tl.constexpr("""{
.reg .b32 t, m, f0, f1, f2, f3;
mov.b32 m, 0x4B000000;
xor.b32 t, $2, 0x80808080;
prmt.b32 f0, t, m, 0x7650;
prmt.b32 f1, t, m, 0x7651;
prmt.b32 f2, t, m, 0x7652;
prmt.b32 f3, t, m, 0x7653;
sub.f32 f0, f0, 0f4B000080;
sub.f32 f1, f1, 0f4B000080;
sub.f32 f2, f2, 0f4B000080;
sub.f32 f3, f3, 0f4B000080;
prmt.b32 $0, f0, f1, 0x7632;
prmt.b32 $1, f2, f3, 0x7632;
}""")
_F16_ASM = tl.constexpr("""{
.reg .b32 t, m, c;
mov.b32 m, 0x64646464;
mov.b32 c, 0x64806480;
xor.b32 t, $2, 0x80808080;
prmt.b32 $0, t, m, 0x5140;
prmt.b32 $1, t, m, 0x5342;
sub.f16x2 $0, $0, c;
sub.f16x2 $1, $1, c;
}""")


def convert_mode(codes: torch.Tensor, to: torch.dtype, kernel, plain: bool = False) -> int:
    """How a kernel converts `codes` to `to`: the byte-permute conversion for int8 codes on a GPU, else (and with
    `plain`, which the GPU tests compare against) Triton's own."""
    if plain or codes.dtype != torch.int8 or codes.device.type != "cuda" or interpreted(kernel):
        return CONVERT_PLAIN
    modes = {torch.float32: CONVERT_F32, torch.bfloat16: CONVERT_BF16, torch.float16: CONVERT_F16}
    return modes.get(to, CONVERT_PLAIN)


@triton.jit
def converted(w, to: tl.constexpr, CONVERT: tl.constexpr):
    """int8 codes (or 16-bit weights, CONVERT_PLAIN) as `to`, the same values."""
    if CONVERT == 1:
        return tl.inline_asm_elementwise(_F32_ASM, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
    elif CONVERT == 2:
        return tl.inline_asm_elementwise(_BF16_ASM, "=r,=r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=4)
    elif CONVERT == 3:
        return tl.inline_asm_elementwise(_F16_ASM, "=r,=r,r", [w], dtype=tl.float16, is_pure=True, pack=4)
    else:
        return w.to(to)


@triton.jit
def row_dots(x_ptr, w_ptr, rows, live, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             CONVERT: tl.constexpr):
    """fp32 [BLOCK_N]: x · W[row] for each of `rows` of a row-major [N, K] weight (16-bit, or int8 codes)."""
    base = w_ptr + rows.to(tl.int64)[:, None] * K
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)  # one cross-thread reduction, after the loop
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        inside = cols < K
        w = tl.load(base + cols[None, :], mask=live[:, None] & inside[None, :], other=0.0)
        x = tl.load(x_ptr + cols, mask=inside, other=0.0)
        acc += converted(w, tl.float32, CONVERT) * x.to(tl.float32)[None, :]
    return tl.sum(acc, axis=1)


@triton.jit(do_not_specialize=["M"])  # one compile for every row count of a batched step
def dense_gemm_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, partial_ptr, count_ptr, M, N, K: tl.constexpr, stride_xm,
                      stride_om, SCALED: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr,
                      PRECISION: tl.constexpr, CONVERT: tl.constexpr):
    """x [M, K] · W[N, K]ᵀ for a row-major W of 16-bit weights or int8 codes (converted to x's dtype,
    exact for |code| <= 127), times scale[n] / 127 when SCALED (LLM.int8()'s row absmax), once per output.
    Each program reads a BLOCK_N x K stripe of W once for all the BLOCK_M rows: at 16 rows or fewer
    the bytes are those of one row. With SPLIT, program (tile, 0, part) does K part `part` (store_tile)."""
    PART: tl.constexpr = K // SPLIT
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for step in range(0, PART, BLOCK_K):
        ks = tl.program_id(2) * PART + step + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * K + ks[None, :],
                    mask=(cols[:, None] < N) & (ks[None, :] < K), other=0)
        if FP32_DOT:  # Triton 3.6's interpreter multiplies bf16 bit patterns as integers in tl.dot
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
        else:
            acc = tl.dot(x, tl.trans(converted(w, x.dtype, CONVERT)), acc, input_precision=PRECISION)
    if SCALED:
        acc = acc * (tl.load(scale_ptr + cols, mask=cols < N, other=0.0) * (1.0 / 127.0))[None, :]
    store_tile(acc, out_ptr, partial_ptr, count_ptr, rows, cols, M, N, stride_om, SPLIT, BLOCK_M, BLOCK_N)


def launch_dense_gemm(x2, w, scale, out, blocks: Blocks | None = None, plain: bool = False) -> None:
    """x2 ([M, K], unit stride along K) · Wᵀ (· scale / 127 when `scale` is given) into out ([M, N]); `plain` as
    w8a16.launch_gemv's."""
    m, k = x2.shape
    n = w.shape[0]
    blocks, split = split_args(x2, out, blocks or gemm_blocks(m, n, k, bits=8 * w.element_size()))
    dense_gemm_kernel[gemm_grid(m, n, blocks)](
        x2, w, w if scale is None else scale, out, M=m, N=n, K=k, stride_xm=x2.stride(0), stride_om=out.stride(0),
        SCALED=scale is not None, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k,
        FP32_DOT=interpreted(dense_gemm_kernel), PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
        CONVERT=convert_mode(w, x2.dtype, dense_gemm_kernel, plain), num_warps=blocks.warps, num_stages=blocks.stages,
        **split)


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
