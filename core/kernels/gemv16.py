"""16-bit weights (bf16/fp16 `nn.Linear`): a GEMV for one token (up to three layers per launch), and
the skinny `tl.dot` GEMM of core.kernels.tiling for a batched step's 2-16 rows.

cuBLAS reads a large bf16 GEMV at about copy bandwidth, but a decode step of an 8B model also has
64 small ones (k and v: 8 MB each) whose launch and tail cost more than their bytes, and an MLP
whose gate and up outputs only meet in silu(gate) · up. This kernel takes a layer's q, k and v in
one grid, or gate and up with the SiLU product written directly (core.kernels.tiling). Whether it
beats cuBLAS is measured per shape on the device (core.kernels.select). `reference` is the same math.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from core.kernels.tiling import (Blocks, gemv_blocks, gemv_grid, launch_dense_gemm, outputs, row_dots, rows_of,
                                  segment, three, three_rows)


def reference(x: torch.Tensor, weights: list[torch.Tensor], silu_pair: bool) -> list[torch.Tensor]:
    """fp32 math rounded to x's dtype: what the kernel computes (no rounding between gate and SiLU)."""
    outs = [x.float() @ w.float().T for w in weights]
    if silu_pair:
        gate, up = outs
        outs = [torch.nn.functional.silu(gate) * up]
    return [o.to(x.dtype) for o in outs]


@triton.jit
def gemv_kernel(x_ptr, w0, w1, w2, o0, o1, o2, N0, N1, N2, K: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, SILU_PAIR: tl.constexpr):
    """One activation row against up to three weights; with SILU_PAIR, o0 = silu(x·W0ᵀ) · (x·W1ᵀ). (The last
    argument of row_dots, 0, is tiling.CONVERT_PLAIN: 16-bit weights convert with Triton's own conversion.)"""
    pid = tl.program_id(0)
    if SILU_PAIR:
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        live = rows < N0
        gate = row_dots(x_ptr, w0, rows, live, K, BLOCK_N, BLOCK_K, 0)
        up = row_dots(x_ptr, w1, rows, live, K, BLOCK_N, BLOCK_K, 0)
        tl.store(o0 + rows, (gate * tl.sigmoid(gate) * up).to(o0.dtype.element_ty), mask=live)
    else:
        w, _, o, n, first = segment(pid, N0, N1, N2, w0, w1, w2, w0, w1, w2, o0, o1, o2, BLOCK_N)
        rows = first + tl.arange(0, BLOCK_N)
        live = rows < n
        tl.store(o + rows, row_dots(x_ptr, w, rows, live, K, BLOCK_N, BLOCK_K, 0).to(o.dtype.element_ty), mask=live)


def launch_gemv(x: torch.Tensor, weights: list[torch.Tensor], outs: list[torch.Tensor], silu_pair: bool = False,
                blocks: Blocks | None = None) -> None:
    """One activation row x ([1, K], unit stride) against up to three weights, into outs."""
    rows = [w.shape[0] for w in weights]
    blocks = blocks or gemv_blocks(x.shape[-1], 8 * weights[0].element_size())
    gemv_kernel[gemv_grid(rows, blocks.block_n, silu_pair)](
        x, *three(weights), *three(outs), *three_rows(rows), K=x.shape[-1], BLOCK_N=blocks.block_n,
        BLOCK_K=blocks.block_k, SILU_PAIR=silu_pair, num_warps=blocks.warps)


@torch.library.custom_op("llm_app::gemv16", mutates_args=())
def gemv(x: torch.Tensor, weights: list[torch.Tensor], silu_pair: bool) -> list[torch.Tensor]:
    """One token through up to three 16-bit layers that share it, in one launch; with `silu_pair`,
    two (gate, up) and the result is silu(gate) · up."""
    outs = outputs(x, [w.shape[0] for w in weights], silu_pair)
    launch_gemv(rows_of(x), weights, outs, silu_pair)
    return outs


@gemv.register_fake
def _(x, weights, silu_pair):
    return outputs(x, [w.shape[0] for w in weights], silu_pair)


@torch.library.custom_op("llm_app::linear16", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One 16-bit layer without bias, any row count: the GEMV for one row, the tiled GEMM otherwise."""
    x2 = rows_of(x)
    out = torch.empty((x2.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    if x2.shape[0] == 1:
        launch_gemv(x2, [weight], [out])
    else:
        launch_dense_gemm(x2, weight, None, out)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@linear.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
