"""Weight-only int8 (W8A16) over LLM.int8()'s stored weights: y = x · (CB · SCB / 127)ᵀ.

bitsandbytes keeps an LLM.int8() layer as CB (int8 [N, K], row-major, the weight Parameter's data)
and SCB (fp32 [N], each row's absmax). Its own matmul quantizes the activations to int8 as well and,
with an outlier threshold, gathers the outlier columns on the host: two host syncs in every layer,
so no CUDA graph can hold it. Here the activations stay 16-bit: LLM.int8() with every activation
column treated as an outlier column. Same stored bytes, no host sync, and each step reads the int8
weights once (half of bf16's bytes). The per-row scale is applied once per output, after the sum.
The codes become floats by byte permutes and one subtraction (core.kernels.tiling.converted), not by
the integer-to-float instruction, whose rate bound the one-row kernel.

Two kernels: a GEMV for one row of activations (batch-1 decode, the bandwidth-bound case; up to
three layers sharing the input in one launch, see core.kernels.tiling) and the tiled `tl.dot` GEMM
of core.kernels.tiling (shared with 16-bit weights) for more rows (a batched decode step, prefill).
`reference` is the same math in PyTorch: the tests compare against it, and the quality check runs it
on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from core.kernels.tiling import (Blocks, convert_mode, gemv_blocks, gemv_grid, launch_dense_gemm,
                                  outputs, rows_of, segment, three, three_rows)
from core.kernels.tiling import row_dots as code_dots

SCALE = 1.0 / 127.0  # CB holds round(127 · w / absmax(row))


def reference(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None):
    """x · dequantized(CB)ᵀ in fp32, rounded to x's dtype: what the kernels compute."""
    weight = cb.float() * (scb.float() * SCALE)[:, None]
    out = x.float() @ weight.T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@triton.jit
def row_dots(x_ptr, cb_ptr, scb_ptr, rows, live, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             CONVERT: tl.constexpr):
    """fp32 [BLOCK_N]: x · dequantized(CB[row]) for each of `rows`: the int8 sums, then each row's scale once."""
    dots = code_dots(x_ptr, cb_ptr, rows, live, K, BLOCK_N, BLOCK_K, CONVERT)
    scale = tl.load(scb_ptr + rows, mask=live, other=0.0) * (1.0 / 127.0)  # CB = round(127 w / absmax)
    return dots * scale


@triton.jit
def gemv_kernel(x_ptr, w0, w1, w2, s0, s1, s2, o0, o1, o2, N0, N1, N2, K: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SILU_PAIR: tl.constexpr, CONVERT: tl.constexpr):
    """One activation row against up to three weights (core.kernels.segments). With SILU_PAIR,
    weights 0 and 1 are an MLP's gate and up projections and o0 gets silu(gate) · up."""
    pid = tl.program_id(0)
    if SILU_PAIR:
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        live = rows < N0
        gate = row_dots(x_ptr, w0, s0, rows, live, K, BLOCK_N, BLOCK_K, CONVERT)
        up = row_dots(x_ptr, w1, s1, rows, live, K, BLOCK_N, BLOCK_K, CONVERT)
        tl.store(o0 + rows, (gate * tl.sigmoid(gate) * up).to(o0.dtype.element_ty), mask=live)
    else:
        w, s, o, n, first = segment(pid, N0, N1, N2, w0, w1, w2, s0, s1, s2, o0, o1, o2, BLOCK_N)
        rows = first + tl.arange(0, BLOCK_N)
        live = rows < n
        tl.store(o + rows, row_dots(x_ptr, w, s, rows, live, K, BLOCK_N, BLOCK_K, CONVERT).to(o.dtype.element_ty),
                 mask=live)


def launch_gemv(x: torch.Tensor, cbs: list[torch.Tensor], scbs: list[torch.Tensor], outs: list[torch.Tensor],
                silu_pair: bool = False, blocks: Blocks | None = None, plain: bool = False) -> None:
    """One activation row x ([1, K], unit stride) against up to three weights, into outs. `plain` converts the
    codes with Triton's own conversion instead of the byte permutes (the GPU tests compare the two)."""
    rows = [cb.shape[0] for cb in cbs]
    blocks = blocks or gemv_blocks(x.shape[-1], 8)
    gemv_kernel[gemv_grid(rows, blocks.block_n, silu_pair)](
        x, *three(cbs), *three(scbs), *three(outs), *three_rows(rows), K=x.shape[-1], BLOCK_N=blocks.block_n,
        BLOCK_K=blocks.block_k, SILU_PAIR=silu_pair, CONVERT=convert_mode(cbs[0], torch.float32, gemv_kernel, plain),
        num_warps=blocks.warps)


@torch.library.custom_op("llm_app::w8a16_linear", mutates_args=())
def linear(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """An LLM.int8() layer's forward as W8A16. A torch op, so torch.compile and CUDA graphs hold it."""
    x2 = rows_of(x)
    out = torch.empty((x2.shape[0], cb.shape[0]), dtype=x.dtype, device=x.device)
    if x2.shape[0] == 1:
        launch_gemv(x2, [cb], [scb], [out])
    else:
        launch_dense_gemm(x2, cb, scb, out)
    if bias is not None:
        out += bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], cb.shape[0])


@linear.register_fake
def _(x, cb, scb, bias=None):
    return x.new_empty((*x.shape[:-1], cb.shape[0]))


@torch.library.custom_op("llm_app::w8a16_gemv", mutates_args=())
def gemv(x: torch.Tensor, cbs: list[torch.Tensor], scbs: list[torch.Tensor], silu_pair: bool) -> list[torch.Tensor]:
    """One token through up to three int8 layers that share it (q/k/v) in one launch; with
    `silu_pair`, two (gate, up) and the result is silu(gate) · up."""
    outs = outputs(x, [cb.shape[0] for cb in cbs], silu_pair)
    launch_gemv(rows_of(x), cbs, scbs, outs, silu_pair)
    return outs


@gemv.register_fake
def _(x, cbs, scbs, silu_pair):
    return outputs(x, [cb.shape[0] for cb in cbs], silu_pair)
