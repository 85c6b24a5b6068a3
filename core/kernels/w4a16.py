"""4-bit weights (bitsandbytes NF4/FP4, as stored) times 16-bit activations.

bitsandbytes packs a [N, K] weight row-major, two 4-bit codes per byte (the even element in the
high nibble), and keeps one fp32 absmax per block of `blocksize` (64) consecutive elements; with
double quantization the absmax are uint8 codes into a 256-entry table, scaled per 256 blocks and
shifted by one offset. A weight is code[nibble] · absmax. Nothing is repacked here: the kernels read
those bytes in place, so the model and its checkpoint are untouched.

Decoding is the cost of a 4-bit GEMV: one H100 probe had bitsandbytes' kernel at a third of the
copy bandwidth, and at full bandwidth an H200 SM has about 4 instructions per weight. The GEMV reads
the packed bytes as int32 words (one element holds 8 weights, so the nibbles come out of registers)
and turns each word's 8 nibbles into codes one of two ways:
- on a GPU with 16-bit activations, byte permutes over the 16 codes held in 8 registers (`prmt`, in
  inline PTX: ~3.5 instructions a weight, no memory traffic, no layout change; the same idea as the
  lookup tables of FLUTE and of llama.cpp's IQ4_NL). The codes are rounded to bf16 on the way, as
  bitsandbytes' own GEMV rounds them to the compute dtype.
- otherwise (fp32 activations, and Triton's CPU interpreter, which cannot run PTX) loads from the
  fp32 table: exact, but each lookup is a gathered load that Triton re-lays out through shared memory.
The products of each absmax block are summed before the block's absmax scales them, once.

For 2-16 rows (a batched decode step) the GEMM decodes each weight tile the same way once, scales
it by its absmax, rounds it to the activations' dtype and feeds it to tensor cores (`tl.dot`) for
all the rows together: at 16 rows or fewer it reads the bytes one row reads, where bitsandbytes
dequantizes the whole weight to 16 bits and runs cuBLAS (three times the bytes, and a second pass).
`reference` is the same math in PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from core.kernels import interpreted
from core.kernels.tiling import (Blocks, gemm_blocks, gemm_grid, gemv_blocks, gemv_grid, outputs, rows_of, segment,
                                  split_args, store_tile, three, three_rows)


@dataclass(frozen=True)
class Packed:
    """One bitsandbytes 4-bit weight as the kernels read it: views of the stored tensors, no copies."""

    data: torch.Tensor  # uint8 [N*K/2]
    absmax: torch.Tensor  # fp32 [N*K/blocksize], or uint8 codes when nested
    code: torch.Tensor  # fp32 [16]
    shape: tuple[int, int]
    blocksize: int
    absmax2: torch.Tensor | None = None  # nested: fp32 [blocks / 256]
    code2: torch.Tensor | None = None  # nested: fp32 [256]
    offset: torch.Tensor | None = None  # nested: fp32 scalar (a tensor: reading it would sync the host)
    block2: int = 256

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def words(self) -> torch.Tensor:
        """The packed bytes as int32 words (a view): 8 weights per load instead of 2."""
        return self.data.view(torch.int32)

    @classmethod
    def from_param(cls, weight) -> Packed:
        """From a bitsandbytes Params4bit (weight.quant_state)."""
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by bitsandbytes' CPU path
            raise ValueError("bitsandbytes repacked this weight for its CPU kernel")
        nested = state.state2 is not None
        return cls(data=weight.data.view(torch.uint8).reshape(-1), absmax=state.absmax, code=state.code,
                   shape=tuple(state.shape), blocksize=state.blocksize,
                   absmax2=state.state2.absmax if nested else None, code2=state.state2.code if nested else None,
                   offset=state.offset if nested else None, block2=state.state2.blocksize if nested else 256)

    def supported(self) -> bool:
        """The kernels need whole absmax blocks per row (bitsandbytes allows blocks across rows)."""
        n, k = self.shape
        return (k % self.blocksize == 0 and self.code.numel() == 16 and self.data.numel() * 2 == n * k
                and self.data.data_ptr() % 16 == 0)


def dequantize(w: Packed) -> torch.Tensor:
    """The fp32 weight [N, K]: code[nibble] · absmax."""
    codes = torch.stack([w.data >> 4, w.data & 15], dim=1).reshape(-1).long()
    absmax = w.absmax.float()
    if w.nested:
        blocks = torch.arange(w.absmax.numel(), device=w.absmax.device)
        absmax = w.code2[w.absmax.long()] * w.absmax2[blocks // w.block2] + w.offset
    values = w.code.float()[codes].reshape(-1, w.blocksize) * absmax[:, None]
    return values.reshape(w.shape)


def reference(x: torch.Tensor, w: Packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = x.float() @ dequantize(w).T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@triton.jit
def _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, index, live, NESTED: tl.constexpr,
            BLOCK2: tl.constexpr):
    if NESTED:
        q = tl.load(absmax_ptr + index, mask=live, other=0).to(tl.int32)
        scale = tl.load(absmax2_ptr + index // BLOCK2, mask=live, other=0.0)
        return tl.load(code2_ptr + q) * scale + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + index, mask=live, other=0.0)


@triton.jit
def _nibble(words, e: tl.constexpr):
    """Code index of element e (0-7) of each int32 word: little-endian bytes, each holding its even
    element in the high nibble."""
    return (words >> (8 * (e // 2) + 4 * (1 - e % 2))) & 15


# Nibble j of a word is element j ^ 1. Per 4 nibbles: two byte permutes pick each nibble's low byte
# from table entries 0-7 and 8-15 (3-bit selectors), a third keeps the right one (bit 3), likewise
# for the high bytes; two more pair low and high bytes into bf16x2, and fp32 is bf16 << 16.
_PRMT_LOOKUP = """prmt.b32 a, {L0}, {L1}, {s};
prmt.b32 b, {L2}, {L3}, {s};
prmt.b32 lo, a, b, {sel};
prmt.b32 a, {H0}, {H1}, {s};
prmt.b32 b, {H2}, {H3}, {s};
prmt.b32 hi, a, b, {sel};
prmt.b32 {p}, lo, hi, 0x5140;
prmt.b32 {q}, lo, hi, 0x7362;
"""
_SELECTORS = """and.b32 {s}, {word}, 0x77777777;
and.b32 {sel}, {word}, 0x88888888;
shr.u32 {sel}, {sel}, 1;
or.b32 {sel}, {sel}, 0x32103210;
"""
_TABLES = dict(L0="$9", L1="$10", L2="$11", L3="$12", H0="$13", H1="$14", H2="$15", H3="$16")
_FP32 = """and.b32 ${o0}, p, 0xffff0000;
shl.b32 ${o1}, p, 16;
and.b32 ${o2}, q, 0xffff0000;
shl.b32 ${o3}, q, 16;
"""
_PRMT_DECODE = tl.constexpr(
    "{\n.reg .b32 s, sel, a, b, lo, hi, p, q;\n" + _SELECTORS.format(s="s", sel="sel", word="$8")
    + _PRMT_LOOKUP.format(s="s", sel="sel", p="p", q="q", **_TABLES) + _FP32.format(o0=0, o1=1, o2=2, o3=3)
    + "shr.u32 s, s, 16;\nshr.u32 sel, sel, 16;\n"
    + _PRMT_LOOKUP.format(s="s", sel="sel", p="p", q="q", **_TABLES) + _FP32.format(o0=4, o1=5, o2=6, o3=7) + "}")

# Two words at once (Triton's pack=2: words $8 and $9, their two absmax as bf16x2 in $10, the table
# words in $11, $13, ... $25, each passed twice): output e is bf16x2 (code · absmax of element e of the
# first word, the same of the second), so the 16-bit weights come out of the permutes scaled, with
# one bf16x2 FMA per pair instead of two expansions to fp32, two fp32 products and a conversion back.
_PAIR_TABLES = {name: f"${11 + 2 * i}" for i, name in enumerate(_TABLES)}
_PAIR_SCALE = """prmt.b32 x, pa, pb, 0x5410;
fma.rn.bf16x2 ${o0}, x, $10, z;
prmt.b32 x, pa, pb, 0x7632;
fma.rn.bf16x2 ${o1}, x, $10, z;
prmt.b32 x, qa, qb, 0x5410;
fma.rn.bf16x2 ${o2}, x, $10, z;
prmt.b32 x, qa, qb, 0x7632;
fma.rn.bf16x2 ${o3}, x, $10, z;
"""
_PAIR_HALF = (_PRMT_LOOKUP.format(s="s", sel="sel", p="pa", q="qa", **_PAIR_TABLES)
              + _PRMT_LOOKUP.format(s="t", sel="u", p="pb", q="qb", **_PAIR_TABLES))
_PRMT_PAIRS = tl.constexpr(
    "{\n.reg .b32 s, sel, t, u, a, b, lo, hi, pa, qa, pb, qb, x, z;\nmov.b32 z, 0x80008000;\n"
    + _SELECTORS.format(s="s", sel="sel", word="$8") + _SELECTORS.format(s="t", sel="u", word="$9")
    # nibble j holds element j ^ 1
    + _PAIR_HALF + _PAIR_SCALE.format(o0=1, o1=0, o2=3, o3=2)
    + "shr.u32 s, s, 16;\nshr.u32 sel, sel, 16;\nshr.u32 t, t, 16;\nshr.u32 u, u, 16;\n"
    + _PAIR_HALF + _PAIR_SCALE.format(o0=5, o1=4, o2=7, o3=6) + "}")
_PAIRS_OPERANDS = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 19))
NO_TABLE = (0,) * 8
PAIRS = True  # the GEMM's default decode for bf16 activations (benchmarks/decode_sweep.py compares both)


def prmt_tables(code: torch.Tensor) -> str:
    """The decode table for DECODE_PRMT, as the kernels' `decode` argument: 8 int32 words, hex,
    comma-separated (a string, so that torch.library and Triton's constexprs carry it as is): the low
    bytes of the 16 codes as bf16, 4 per word, then the high bytes. Made once, on the host."""
    bits = code.to(torch.bfloat16).view(torch.int16).to(torch.int32).cpu() & 0xFFFF
    words = [sum(int(v) << (8 * i) for i, v in enumerate(part)) for part in
             torch.cat([bits & 0xFF, bits >> 8]).reshape(8, 4)]
    return ",".join(f"0x{w:08x}" for w in words)


def _table(decode: str) -> tuple[int, ...]:
    """prmt_tables' words as int32 constants (NO_TABLE for the fp32-table path)."""
    if not decode:
        return NO_TABLE
    return tuple(w - (1 << 32) if w >= 1 << 31 else w for w in (int(h, 16) for h in decode.split(",")))


@triton.jit
def _codes(words, code_ptr, salt, PRMT: tl.constexpr, TABLE: tl.constexpr):
    """fp32 codes of the 8 elements of each word, in element order."""
    if PRMT:
        # The table words are OR-ed with `salt` (always 0, but per row): as plain constants ptxas kept
        # them in uniform registers and copied one to a vector register before every permute.
        v = tl.inline_asm_elementwise(_PRMT_DECODE, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
                                      [words, salt | TABLE[0], salt | TABLE[1], salt | TABLE[2], salt | TABLE[3],
                                       salt | TABLE[4], salt | TABLE[5], salt | TABLE[6], salt | TABLE[7]],
                                      dtype=(tl.int32,) * 8, is_pure=True, pack=1)
        return [x.to(tl.float32, bitcast=True) for x in v]
    else:
        return [tl.load(code_ptr + _nibble(words, e)) for e in (0, 1, 2, 3, 4, 5, 6, 7)]


@triton.jit
def _scaled_weights(words, scale, code_ptr, salt, PRMT: tl.constexpr, TABLE: tl.constexpr, PAIRS: tl.constexpr):
    """The weights code · absmax of the 8 elements of each word, in element order: bf16 from the
    paired permutes when PAIRS (bf16 activations), else fp32 (rounded to x's dtype by the caller)."""
    if PAIRS:
        return tl.inline_asm_elementwise(
            _PRMT_PAIRS, _PAIRS_OPERANDS,
            [words, scale.to(tl.bfloat16), salt | TABLE[0], salt | TABLE[1], salt | TABLE[2], salt | TABLE[3],
             salt | TABLE[4], salt | TABLE[5], salt | TABLE[6], salt | TABLE[7]],
            dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)
    else:
        return [c * scale for c in _codes(words, code_ptr, salt, PRMT, TABLE)]


@triton.jit
def row_dots(x_ptr, words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, rows, live,
             K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK2: tl.constexpr,
             PRMT: tl.constexpr, TABLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_N]: x · dequantized(W[row]) for each of `rows` (BLOCK_K divides K).

    The packed bytes are read as int32 words (8 weights each, wide loads); the products of each
    absmax block are summed before its absmax scales them once."""
    WORDS: tl.constexpr = BLOCK_K // 8
    GROUP: tl.constexpr = BLOCKSIZE // 8  # words per absmax block
    rows64 = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_N, WORDS // GROUP], tl.float32)
    salt = (rows[:, None] >> 31) + tl.zeros([BLOCK_N, WORDS], tl.int32)
    for start in range(0, K // 8, WORDS):
        cols = start + tl.arange(0, WORDS)
        words = tl.load(words_ptr + rows64[:, None] * (K // 8) + cols[None, :], mask=live[:, None], other=0)
        codes = _codes(words, code_ptr, salt, PRMT, TABLE)
        part = tl.zeros([BLOCK_N, WORDS], tl.float32)
        for e in tl.static_range(8):
            part += codes[e] * tl.load(x_ptr + cols * 8 + e).to(tl.float32)[None, :]
        part = tl.sum(tl.reshape(part, [BLOCK_N, WORDS // GROUP, GROUP]), axis=2)
        blocks = rows64[:, None] * (K // BLOCKSIZE) + (start // GROUP + tl.arange(0, WORDS // GROUP))[None, :]
        acc += part * _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocks, live[:, None], NESTED, BLOCK2)
    return tl.sum(acc, axis=1)


@triton.jit
def gemv_kernel(x_ptr, p0, p1, p2, a0, a1, a2, o0, o1, o2, N0, N1, N2, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK2: tl.constexpr,
                PRMT: tl.constexpr, TABLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SILU_PAIR: tl.constexpr):
    """One activation row against up to three 4-bit weights (core.kernels.tiling; nested absmax: one
    weight only). With SILU_PAIR, weights 0 and 1 are gate and up and o0 gets silu(gate) · up."""
    pid = tl.program_id(0)
    if SILU_PAIR:
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        live = rows < N0
        gate = row_dots(x_ptr, p0, a0, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, rows, live, K, BLOCKSIZE,
                        NESTED, BLOCK2, PRMT, TABLE, BLOCK_N, BLOCK_K)
        up = row_dots(x_ptr, p1, a1, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, rows, live, K, BLOCKSIZE,
                      NESTED, BLOCK2, PRMT, TABLE, BLOCK_N, BLOCK_K)
        tl.store(o0 + rows, (gate * tl.sigmoid(gate) * up).to(o0.dtype.element_ty), mask=live)
    else:
        p, a, o, n, first = segment(pid, N0, N1, N2, p0, p1, p2, a0, a1, a2, o0, o1, o2, BLOCK_N)
        rows = first + tl.arange(0, BLOCK_N)
        live = rows < n
        dots = row_dots(x_ptr, p, a, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, rows, live, K, BLOCKSIZE,
                        NESTED, BLOCK2, PRMT, TABLE, BLOCK_N, BLOCK_K)
        tl.store(o + rows, dots.to(o.dtype.element_ty), mask=live)


@triton.jit(do_not_specialize=["M"])  # one compile for every row count of a batched step
def gemm_kernel(x_ptr, words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, partial_ptr,
                count_ptr, M, N, K: tl.constexpr, stride_xm, stride_om, SPLIT: tl.constexpr, BLOCKSIZE: tl.constexpr,
                NESTED: tl.constexpr,
                BLOCK2: tl.constexpr, PRMT: tl.constexpr, TABLE: tl.constexpr, PAIRS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr,
                PRECISION: tl.constexpr):
    """Up to BLOCK_M activation rows: each weight tile is decoded once (as the GEMV decodes it), scaled
    by its absmax, rounded to x's dtype and fed to tl.dot for all the rows (BLOCK_K divides K and is a
    multiple of BLOCKSIZE). At 16 rows or fewer the bytes read are those of one row. With SPLIT,
    program (tile, 0, part) does K part `part` (core.kernels.tiling.store_tile)."""
    WORDS: tl.constexpr = BLOCK_K // 8
    PART: tl.constexpr = K // 8 // SPLIT  # words
    GROUP: tl.constexpr = BLOCKSIZE // 8  # words per absmax block
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = cols < N
    cols64 = cols.to(tl.int64)
    salt = (cols[:, None] >> 31) + tl.zeros([BLOCK_N, WORDS], tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for step in range(0, PART, WORDS):
        start = tl.program_id(2) * PART + step
        words = tl.load(words_ptr + cols64[:, None] * (K // 8) + (start + tl.arange(0, WORDS))[None, :],
                        mask=live[:, None], other=0)
        blocks = cols64[:, None] * (K // BLOCKSIZE) + (start // GROUP + tl.arange(0, WORDS // GROUP))[None, :]
        scale = _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocks, live[:, None], NESTED, BLOCK2)
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], [BLOCK_N, WORDS // GROUP, GROUP]), [BLOCK_N, WORDS])
        v = _scaled_weights(words, scale, code_ptr, salt, PRMT, TABLE, PAIRS)
        # Join the 8 elements of each word in natural order: join stacks along a new last axis, so
        # the innermost join pairs e and e + 4, the next e and e + 2, the outermost e and e + 1.
        w = tl.join(tl.join(tl.join(v[0], v[4]), tl.join(v[2], v[6])),
                    tl.join(tl.join(v[1], v[5]), tl.join(v[3], v[7])))
        w = tl.reshape(w, [BLOCK_N, BLOCK_K])
        ks = start * 8 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=rows[:, None] < M, other=0.0)
        if FP32_DOT:  # Triton 3.6's interpreter multiplies bf16 bit patterns as integers in tl.dot
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc)
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
    store_tile(acc, out_ptr, partial_ptr, count_ptr, rows, cols, M, N, stride_om, SPLIT, BLOCK_M, BLOCK_N)


def _nested(w: Packed) -> dict:
    """The double-quantization pointers; stand-ins (never read) when the absmax are plain fp32."""
    if w.nested:
        return dict(absmax2_ptr=w.absmax2, code2_ptr=w.code2, offset_ptr=w.offset, NESTED=True, BLOCK2=w.block2)
    return dict(absmax2_ptr=w.absmax, code2_ptr=w.code, offset_ptr=w.absmax, NESTED=False, BLOCK2=256)


def launch_gemv(x: torch.Tensor, weights: list[Packed], outs: list[torch.Tensor], silu_pair: bool = False,
                blocks: Blocks | None = None, decode: str = "") -> None:
    """One activation row x ([1, K], unit stride) against up to three weights of one code table and
    block size, into outs. `decode`: `prmt_tables(code)` to decode with byte permutes (GPU, 16-bit
    x), or "" for lookups in the fp32 table."""
    first, k = weights[0], x.shape[-1]
    rows = [w.shape[0] for w in weights]
    blocks = blocks or gemv_blocks(k, 4, silu_pair, k_multiple=first.blocksize)
    gemv_kernel[gemv_grid(rows, blocks.block_n, silu_pair)](
        x, *three([w.words for w in weights]), *three([w.absmax for w in weights]), *three(outs), *three_rows(rows),
        code_ptr=first.code, K=k, BLOCKSIZE=first.blocksize, PRMT=bool(decode), TABLE=_table(decode),
        BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k, SILU_PAIR=silu_pair, num_warps=blocks.warps,
        **_nested(first))


def launch_gemm(x2: torch.Tensor, w: Packed, out: torch.Tensor, blocks: Blocks | None = None,
                decode: str = "", pairs: bool = PAIRS) -> None:
    """x2 ([M, K], unit stride along K) · dequantized(w)ᵀ into out ([M, N]); `decode` as for launch_gemv;
    `pairs`: with `decode` and bf16 x, weights scaled in bf16x2 inside the permutes (_PRMT_PAIRS)."""
    m, k = x2.shape
    n = w.shape[0]
    blocks, split = split_args(x2, out, blocks or gemm_blocks(m, n, k, 4, k_multiple=w.blocksize))
    gemm_kernel[gemm_grid(m, n, blocks)](
        x2, w.words, w.absmax, code_ptr=w.code, out_ptr=out, M=m, N=n, K=k, stride_xm=x2.stride(0),
        stride_om=out.stride(0), BLOCKSIZE=w.blocksize, PRMT=bool(decode), TABLE=_table(decode),
        PAIRS=pairs and bool(decode) and x2.dtype == torch.bfloat16, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
        BLOCK_K=blocks.block_k, FP32_DOT=interpreted(gemm_kernel), PRECISION="ieee" if x2.dtype == torch.float32 else
        "tf32", num_warps=blocks.warps, num_stages=blocks.stages, **split, **_nested(w))


@torch.library.custom_op("llm_app::w4a16_linear", mutates_args=())
def linear(x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, blocksize: int,
           absmax2: torch.Tensor | None, code2: torch.Tensor | None, offset: torch.Tensor | None, block2: int,
           decode: str) -> torch.Tensor:
    """A bitsandbytes 4-bit layer's forward from its stored bytes (`Packed`'s fields, flattened for
    torch.library). A torch op, so torch.compile and CUDA graphs hold it. `decode`: see launch_gemv."""
    w = Packed(data, absmax, code, (n, x.shape[-1]), blocksize, absmax2, code2, offset, block2)
    x2 = rows_of(x)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0] == 1:
        launch_gemv(x2, [w], [out], decode=decode)
    else:
        launch_gemm(x2, w, out, decode=decode)
    return out.reshape(*x.shape[:-1], n)


@linear.register_fake
def _(x, data, absmax, code, n, blocksize, absmax2, code2, offset, block2, decode):
    return x.new_empty((*x.shape[:-1], n))


def apply(x: torch.Tensor, w: Packed, decode: str = "") -> torch.Tensor:
    return linear(x, w.data, w.absmax, w.code, w.shape[0], w.blocksize, w.absmax2, w.code2, w.offset, w.block2,
                  decode)


@torch.library.custom_op("llm_app::w4a16_gemv", mutates_args=())
def gemv(x: torch.Tensor, datas: list[torch.Tensor], absmaxes: list[torch.Tensor], code: torch.Tensor,
         rows: list[int], blocksize: int, decode: str, silu_pair: bool) -> list[torch.Tensor]:
    """One token through up to three 4-bit layers (plain fp32 absmax, one code table) that share it,
    in one launch; with `silu_pair`, two (gate, up) and the result is silu(gate) · up."""
    k = x.shape[-1]
    weights = [Packed(d, a, code, (n, k), blocksize) for d, a, n in zip(datas, absmaxes, rows)]
    outs = outputs(x, rows, silu_pair)
    launch_gemv(rows_of(x), weights, outs, silu_pair, decode=decode)
    return outs


@gemv.register_fake
def _(x, datas, absmaxes, code, rows, blocksize, decode, silu_pair):
    return outputs(x, rows, silu_pair)


def apply_group(x: torch.Tensor, weights: list[Packed], silu_pair: bool, decode: str = ""):
    first = weights[0]
    return gemv(x, [w.data for w in weights], [w.absmax for w in weights], first.code, [w.shape[0] for w in weights],
                first.blocksize, decode, silu_pair)
