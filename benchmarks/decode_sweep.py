"""The fast path's kernels against the libraries' on each layer shape of a model, at 1-16 rows.

For each weight format (bf16, LLM.int8()'s int8, NF4) and each decoder-layer shape it builds 32
layers of random weights (so the set is far larger than L2 and each call reads memory, as in a
decode step) and times, inside one CUDA graph, the library's call (cuBLAS; bitsandbytes' 4-bit
kernel; none for int8, whose LLM.int8() matmul cannot be captured), torchao's int4 weight-only
layer (group 128, NF4's peer; --peers) and our kernels with several tile shapes:
- 1 row: the GEMVs as the fast path groups them (q/k/v in one launch, gate/up with SiLU, o, down);
- 2-16 rows (a batched decode step): each layer alone through the tl.dot kernels.
Every kernel output is first checked against the float64 reference of the dequantized weights,
written over a NaN-filled buffer so that unwritten outputs fail. Prints µs per layer, GB/s and % of
the copy bandwidth; the fastest variant per (format, layer, rows) is marked.

    python benchmarks/decode_sweep.py --model llama8b --rows 1,2,4,8,16 --results out/sweep.md   # on a GPU
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import SHAPES, conditions, copy_bandwidth  # noqa: E402
from core.kernels import gemv16, w4a16, w4mma, w8a16  # noqa: E402
from core.kernels.select import graph_time_us  # noqa: E402
from core.kernels.tiling import Blocks, dividing, launch_dense_gemm, split_k  # noqa: E402

LAYERS = 32
DEVICE = "cuda"
GEMV_TILES = [(n, t) for n in (2, 4, 8, 16) for t in (8192, 16384)]  # (rows per program, bytes per K step)
# (block_n, block_k, warps, stages, programs) of the tl.dot kernels at 2-16 rows: K is split until the grid
# has about `programs` programs (tiling.split_k; 1: not split); block_k in 4-bit weights' elements
GEMM_TILES = {16: [(32, 128, 4, 3, 1), (16, 128, 4, 3, 1024), (64, 128, 4, 3, 1024), (32, 128, 4, 3, 512),
                   (32, 256, 4, 3, 1024)],
              8: [(32, 256, 4, 3, 1), (16, 256, 4, 3, 1024), (64, 256, 4, 3, 1024), (32, 256, 4, 3, 512),
                  (32, 512, 4, 3, 1024)],
              4: [(32, 256, 4, 3, 1), (16, 256, 4, 3, 1024), (64, 128, 4, 3, 1024), (32, 256, 4, 3, 512),
                  (32, 128, 4, 3, 1024), (32, 512, 4, 3, 1024)]}
BITS = {"bf16": 16, "int8": 8, "nf4": 4}
# (warps, K blocks each warp loads before it computes) of the 4-bit tensor-core kernel (core.kernels.w4mma)
MMA_VARIANTS = [(w4mma.WARPS, w4mma.UNROLL), (4, 2), (4, 4), (8, 1), (8, 2), (8, 4), (16, 1), (16, 2)]


def sweep(model_name: str, bandwidth: float, rows_list: list[int], formats: list[str], gemv_tiles: bool,
          peers: bool) -> str:
    shape = SHAPES[model_name]
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    head = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * head, shape["num_key_value_heads"] * head
    grouped = [("q/k/v", [q, kv, kv], h, False), ("o", [h], q, False), ("gate/up+SiLU", [inter, inter], h, True),
               ("down", [h], inter, False)]
    single = [("q, o", [q], h, False), ("k, v", [kv], h, False), ("gate, up", [inter], h, False),
              ("down", [h], inter, False)]
    lines = ["| format | layer | rows | variant | µs/layer | GB/s | % copy bw | rel. error | fastest |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = ["| format | layer | rows | library µs | torchao int4 µs | ours, default µs | ours, best µs | "
               "% copy bw | best variant |", "|---|---|---|---|---|---|---|---|---|"]
    few = [rows for rows in rows_list if rows > 1]
    jobs = [(fmt, *op, counts, LAYERS) for fmt in formats
            for ops, counts in ((grouped, [1] if 1 in rows_list else []), (single, few)) if counts for op in ops]
    for fmt, name, outs, k, silu, counts, layers in jobs + [("bf16", "lm_head", [shape["vocab_size"]], h, False,
                                                            rows_list, 4)]:
        found, brief = _op(fmt, name, outs, k, silu, counts, bandwidth, gemv_tiles, peers and name != "lm_head",
                           layers)
        lines += found
        summary += brief
        torch.cuda.empty_cache()
        print("\n".join(found), flush=True)
    return "\n".join(lines) + "\n\nSummary (µs per layer):\n\n" + "\n".join(summary)


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


def _torchao_int4(n: int, k: int, layers: int) -> list[torch.nn.Module]:
    """torchao's int4 weight-only layers (group 128, its tile-packed layout): NF4's peer; [] without torchao."""
    found = []
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        for _ in range(layers):
            linear = torch.nn.Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16)
            linear.weight.data.normal_(0.0, 0.02)
            quantize_(linear, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
            found.append(linear)
    except Exception as failure:  # torchao missing, or its kernel not built for this machine
        print(f"torchao peer skipped: {type(failure).__name__}: {failure}", flush=True)
        return []
    return found


def _silu(outs: list) -> torch.Tensor:
    return F.silu(outs[0]) * outs[1]


def _ours(fmt: str, x: torch.Tensor, ws: list, outs: list, silu: bool, blocks: Blocks | None,
          decode: str, pairs: bool) -> Callable:
    if x.shape[0] > 1:
        if fmt == "int8":
            return lambda: launch_dense_gemm(x, ws[0][0], ws[0][1], outs[0], blocks)
        if fmt == "bf16":
            return lambda: launch_dense_gemm(x, ws[0], None, outs[0], blocks)
        return lambda: w4a16.launch_gemm(x, ws[0], outs[0], blocks, decode, pairs)
    if fmt == "bf16":
        return lambda: gemv16.launch_gemv(x, ws, outs, silu, blocks)
    if fmt == "int8":
        return lambda: w8a16.launch_gemv(x, [w[0] for w in ws], [w[1] for w in ws], outs, silu, blocks)
    return lambda: w4a16.launch_gemv(x, ws, outs, silu, blocks, decode)


def _variants(fmt: str, rows: int, n: int, k: int, gemv_tiles: bool) -> list[tuple[str, Blocks | None, bool]]:
    """(label, tiles, 4-bit GEMM decode in bf16x2 pairs) of our kernel to time."""
    bits = BITS[fmt]
    found: list[tuple[str, Blocks | None, bool]] = [("default", None, w4a16.PAIRS)]
    if rows > 1:
        tiles = [(f"n{bn} k{bk} w{warps} s{stages} split {split_k(n, k, bn, bk, programs)}",
                  Blocks(bn, bk, warps, 16, stages, split_k(n, k, bn, bk, programs)), w4a16.PAIRS)
                 for bn, bk, warps, stages, programs in GEMM_TILES[bits] if k % bk == 0]
        if bits == 4:  # the other decode (fp32 scaling, or bf16x2 pairs), with the default and one other tile
            tiles += [(f"{label}, {'fp32 scaling' if w4a16.PAIRS else 'bf16x2 pairs'}", blocks, not pairs)
                      for label, blocks, pairs in [("default", None, w4a16.PAIRS)] + tiles[1:2]]
        return found + tiles
    if not gemv_tiles:
        return found
    for block_n, tile in GEMV_TILES:
        target = max(64, tile * 8 // (bits * block_n))
        block_k = dividing(k, target, 64) if bits == 4 else min(target, 1 << (k - 1).bit_length())
        for warps in (4, 8):
            found.append((f"n{block_n} k{block_k} w{warps}", Blocks(block_n, block_k, warps), False))
    return found


def _op(fmt: str, name: str, outs_n: list[int], k: int, silu: bool, row_counts: list[int], bandwidth: float,
        gemv_tiles: bool, peers: bool, layers: int = LAYERS) -> tuple[list[str], list[str]]:
    """Every variant's line, and one summary line per row count."""
    torch.manual_seed(0)
    sets = [[_weights(fmt, n, k) for n in outs_n] for _ in range(layers)]
    decode = w4a16.prmt_tables(sets[0][0].code) if fmt == "nf4" else ""
    per_layer = sum(_bytes(fmt, w) for w in sets[0])
    dense = [_dense(fmt, w) for w in sets[0]]
    torchao = peers and fmt == "nf4" and len(outs_n) == 1
    peer = _torchao_int4(outs_n[0], k, layers) if torchao and graph_time_us is not _once else []
    lines, summary = [], []
    shuffled = None
    if fmt == "nf4" and w4mma.available(torch.device(DEVICE)) is None:
        shuffled = [[w4a16.Packed(w4mma.shuffled(w.data, *w.shape).contiguous(),
                                  w4mma.shuffled_absmax(w.absmax, *w.shape).contiguous(), w.code, w.shape, 64)
                     for w in ws] for ws in sets]
    for rows in row_counts:
        x = torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16)
        expected = [x.double() @ d.T for d in dense]
        if silu:
            expected = [F.silu(expected[0]) * expected[1]]
        timed: list[tuple[str, float, str]] = []
        calls = [c for c in (_library(fmt, x, ws, silu) for ws in sets) if c is not None]
        if calls:
            timed.append(("library", graph_time_us(calls), ""))
        if peer:
            try:
                timed.append(("torchao int4 g128", graph_time_us([lambda call=call: call(x) for call in peer]), ""))
            except Exception as failure:  # torchao's kernel not built for this machine: a row, not the end
                timed.append((f"torchao failed: {type(failure).__name__}: {str(failure)[:60]}", 0.0, ""))
        for label, blocks, pairs in _variants(fmt, rows, outs_n[0], k, gemv_tiles):
            outs = [[torch.full((rows, n), float("nan"), device=DEVICE, dtype=torch.bfloat16)
                     for n in (outs_n[:1] if silu else outs_n)] for _ in sets]
            try:
                runs = [_ours(fmt, x, ws, o, silu, blocks, decode, pairs) for ws, o in zip(sets, outs)]
                runs[0]()
                error = max(((o.double() - e).norm() / e.norm()).item() for o, e in zip(outs[0], expected))
                timed.append((label, graph_time_us(runs), f"{error:.1e}"))
            except Exception as failure:  # a variant that does not compile is a row, not the end of the sweep
                timed.append((f"{label} failed: {type(failure).__name__}: {str(failure)[:60]}", 0.0, ""))
        if fmt == "nf4" and shuffled is not None:
            timed += _mma(x, shuffled, outs_n, silu, expected)
        best = min((us for _, us, _ in timed if us), default=0.0)
        lines += [_line(fmt, name, rows, label, us, per_layer, bandwidth, error, us == best)
                  for label, us, error in timed]
        summary.append(_brief(fmt, name, rows, timed, per_layer, bandwidth))
    return lines, summary


def _mma(x: torch.Tensor, sets: list, outs_n: list[int], silu: bool, expected: list) -> list[tuple[str, float, str]]:
    """The tensor-core kernel on shuffled copies of the weights, one launch per layer (grouped as the GEMV is)."""
    timed = []
    for warps, unroll in MMA_VARIANTS:
        label = f"tensor cores, shuffled, w{warps} u{unroll}" + (" (default)" if (warps, unroll) == MMA_VARIANTS[0]
                                                                else "")
        outs = [[torch.full((x.shape[0], n), float("nan"), device=DEVICE, dtype=torch.bfloat16)
                 for n in (outs_n[:1] if silu else outs_n)] for _ in sets]
        try:
            runs = [lambda ws=ws, o=o: w4mma.launch(x, ws, o, silu, warps, unroll) for ws, o in zip(sets, outs)]
            runs[0]()
            error = max(((o.double() - e).norm() / e.norm()).item() for o, e in zip(outs[0], expected))
            timed.append((label, graph_time_us(runs), f"{error:.1e}"))
        except Exception as failure:
            timed.append((f"{label} failed: {type(failure).__name__}: {str(failure)[:80]}", 0.0, ""))
    return timed


def _brief(fmt, name, rows, timed, per_layer, bandwidth) -> str:
    def time_of(label):
        return next((f"{us:.1f}" for found, us, _ in timed if found == label and us), "")

    ours = [(us, label) for label, us, error in timed if us and error]
    us, label = min(ours, default=(0.0, ""))
    share = f"{100 * per_layer / (us / 1e6) / bandwidth:.0f}" if us else ""
    return (f"| {fmt} | {name} | {rows} | {time_of('library')} | {time_of('torchao int4 g128')} | "
            f"{time_of('default')} | {us:.1f} | {share} | {label} |")


def _line(fmt, name, rows, label, us, per_layer, bandwidth, error, best) -> str:
    if not us:
        return f"| {fmt} | {name} | {rows} | {label} | | | | | |"
    rate = per_layer / (us / 1e6)
    return (f"| {fmt} | {name} | {rows} | {label} | {us:.1f} | {rate / 1e9:.0f} | "
            f"{100 * rate / bandwidth:.0f} | {error} | {'yes' if best else ''} |")


def _once(calls) -> float:
    for call in calls[:1]:
        call()
    return 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama8b", choices=list(SHAPES))
    parser.add_argument("--rows", default="1,2,4,8,16", help="activation rows (comma-separated)")
    parser.add_argument("--formats", default="bf16,int8,nf4")
    parser.add_argument("--gemv-tiles", action="store_true", help="also sweep the one-row GEMVs' tiles")
    parser.add_argument("--peers", action="store_true", help="time torchao's int4 weight-only layers beside NF4")
    parser.add_argument("--results", default=None, help="append the table to this Markdown file")
    parser.add_argument("--check-only", action="store_true",
                        help="compile and check each variant, no timing (several at once fill Triton's cache)")
    args = parser.parse_args()
    if args.check_only:
        global graph_time_us
        graph_time_us = _once
    bandwidth = copy_bandwidth(DEVICE)
    text = (f"\nConditions: {conditions(DEVICE, bandwidth)}; {LAYERS} random layers per shape, µs per layer in "
            f"one CUDA graph\n\n" + sweep(args.model, bandwidth, [int(r) for r in args.rows.split(",")],
                                          args.formats.split(","), args.gemv_tiles, args.peers))
    print(text)
    if args.results:
        with open(args.results, "a") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
