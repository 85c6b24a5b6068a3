"""`decode.py --sweep`: the fast path's kernels against the libraries' on each layer shape of a model.

For each weight format (bf16, LLM.int8()'s int8, NF4) and each decoder-layer GEMV of the shape
(q/k/v and gate/up+SiLU as the fast path groups them, o and down alone, and the bf16 lm_head), it
builds 32 layers of random weights (so the set is far larger than L2 and each call reads memory,
as in a decode step) and times, inside one CUDA graph, the library's call (cuBLAS; bitsandbytes'
4-bit kernel; none for int8, whose LLM.int8() matmul cannot be captured) and the kernels with
several tile shapes. Every kernel output is first checked against the float64 reference of the
dequantized weights, written over a NaN-filled buffer so that unwritten outputs fail. Prints µs
per layer, GB/s and % of the copy bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.decode import SHAPES
from core.kernels import gemv16, w4a16, w8a16
from core.kernels.select import graph_time_us
from core.kernels.tiling import Blocks, dividing

LAYERS = 32
DEVICE = "cuda"
GEMV_TILES = [(n, t) for n in (2, 4, 8, 16) for t in (8192, 16384)]  # (rows per program, bytes per K step)
GEMM_TILES = [(16, 128), (32, 128), (32, 256), (64, 128)]  # (block_n, block_k) with block_m = 16


def sweep(model_name: str, bandwidth: float) -> str:
    shape = SHAPES[model_name]
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    head = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * head, shape["num_key_value_heads"] * head
    ops = [("q/k/v", [q, kv, kv], h, False), ("o", [h], q, False), ("gate/up+SiLU", [inter, inter], h, True),
           ("down", [h], inter, False)]
    lines = ["| format | layer | rows | variant | µs/layer | GB/s | % copy bw | rel. error |",
             "|---|---|---|---|---|---|---|---|"]
    for fmt in ("bf16", "int8", "nf4"):
        for name, outs, k, silu in ops:
            lines += _op(fmt, name, outs, k, silu, bandwidth)
            torch.cuda.empty_cache()
            print("\n".join(lines[-12:]), flush=True)
    lines += _op("bf16", "lm_head", [shape["vocab_size"]], h, False, bandwidth, layers=4)
    return "\n".join(lines)


def _weights(fmt: str, n: int, k: int):
    if fmt == "bf16":
        return torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02
    if fmt == "int8":
        return (torch.randint(-127, 128, (n, k), device=DEVICE, dtype=torch.int8),
                torch.rand(n, device=DEVICE) * 0.1 + 0.01)
    from bitsandbytes.functional import get_4bit_type

    data = torch.randint(0, 256, (n * k // 2,), device=DEVICE, dtype=torch.uint8)
    absmax = torch.rand(n * k // 64, device=DEVICE) * 0.05 + 0.01
    return w4a16.Packed(data, absmax, get_4bit_type("nf4", device=DEVICE), (n, k), 64)


def _dense(fmt: str, w) -> torch.Tensor:
    if fmt == "bf16":
        return w.double()
    if fmt == "int8":
        return w[0].double() * (w[1].double() / 127)[:, None]
    return w4a16.dequantize(w).double()


def _bytes(fmt: str, w) -> int:
    if fmt == "bf16":
        return w.numel() * 2
    if fmt == "int8":
        return w[0].numel() + w[1].numel() * 4
    return w.data.numel() + w.absmax.numel() * 4


def _library(fmt: str, x: torch.Tensor, ws: list, silu: bool) -> Callable | None:
    if fmt == "int8":
        return None
    if fmt == "bf16":
        outs = lambda: [F.linear(x, w) for w in ws]  # noqa: E731
    else:
        gemm = torch.ops.bitsandbytes.gemm_4bit.default
        outs = lambda: [gemm(x, w.data.view(-1, 1), list(w.shape), w.absmax, w.blocksize, "nf4")  # noqa: E731
                        for w in ws]
    if silu:
        return lambda: _silu(outs())
    return outs


def _silu(outs: list) -> torch.Tensor:
    return F.silu(outs[0]) * outs[1]


def _ours(fmt: str, x: torch.Tensor, ws: list, outs: list, silu: bool, blocks: Blocks | None,
          decode: str) -> Callable:
    if x.shape[0] > 1:
        if fmt == "int8":
            return lambda: w8a16.launch_gemm(x, ws[0][0], ws[0][1], outs[0], blocks)
        return lambda: w4a16.launch_gemm(x, ws[0], outs[0], blocks)
    if fmt == "bf16":
        return lambda: gemv16.launch_gemv(x, ws, outs, silu, blocks)
    if fmt == "int8":
        return lambda: w8a16.launch_gemv(x, [w[0] for w in ws], [w[1] for w in ws], outs, silu, blocks)
    return lambda: w4a16.launch_gemv(x, ws, outs, silu, blocks, decode)


def _variants(fmt: str, rows: int, n: int, k: int) -> list[tuple[str, Blocks | None]]:
    bits = {"bf16": 16, "int8": 8, "nf4": 4}[fmt]
    found: list[tuple[str, Blocks | None]] = [("default", None)]
    if rows > 1:
        return found + [(f"n{bn} k{bk}", Blocks(bn, bk, block_m=16)) for bn, bk in GEMM_TILES]
    for block_n, tile in GEMV_TILES:
        target = max(64, tile * 8 // (bits * block_n))
        block_k = dividing(k, target, 64) if bits == 4 else min(target, 1 << (k - 1).bit_length())
        for warps in (4, 8):
            found.append((f"n{block_n} k{block_k} w{warps}", Blocks(block_n, block_k, warps)))
    return found


def _op(fmt: str, name: str, outs_n: list[int], k: int, silu: bool, bandwidth: float, layers: int = LAYERS):
    torch.manual_seed(0)
    sets = [[_weights(fmt, n, k) for n in outs_n] for _ in range(layers)]
    decode = w4a16.prmt_tables(sets[0][0].code) if fmt == "nf4" else ""
    per_layer = sum(_bytes(fmt, w) for w in sets[0])
    lines = []
    for rows in ((1,) if len(outs_n) > 1 else (1, 8)):
        if fmt == "bf16" and rows > 1:
            continue
        x = torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16)
        dense = [_dense(fmt, w) for w in sets[0]]
        expected = [x.double() @ d.T for d in dense]
        if silu:
            expected = [F.silu(expected[0]) * expected[1]]
        calls = [c for c in (_library(fmt, x, ws, silu) for ws in sets) if c is not None]
        if calls:
            lines.append(_line(fmt, name, rows, "library", graph_time_us(calls), per_layer, bandwidth, ""))
        for label, blocks in _variants(fmt, rows, sum(outs_n), k):
            outs = [[torch.full((rows, n), float("nan"), device=DEVICE, dtype=torch.bfloat16)
                     for n in (outs_n[:1] if silu else outs_n)] for _ in sets]
            try:
                runs = [_ours(fmt, x, ws, o, silu, blocks, decode) for ws, o in zip(sets, outs)]
                runs[0]()
                error = max(((o.double() - e).norm() / e.norm()).item() for o, e in zip(outs[0], expected))
                lines.append(_line(fmt, name, rows, label, graph_time_us(runs), per_layer, bandwidth, f"{error:.1e}"))
            except Exception as failure:  # a variant that does not compile is a row, not the end of the sweep
                lines.append(f"| {fmt} | {name} | {rows} | {label} | failed: {type(failure).__name__} | | | |")
    return lines


def _line(fmt, name, rows, label, us, per_layer, bandwidth, error) -> str:
    rate = per_layer / (us / 1e6)
    return (f"| {fmt} | {name} | {rows} | {label} | {us:.1f} | {rate / 1e9:.0f} | "
            f"{100 * rate / bandwidth:.0f} | {error} |")
