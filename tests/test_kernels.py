"""The fast path's own kernels on the CPU, through Triton's interpreter: correctness, choice, reverse, fallbacks.

Triton decides when a kernel is defined whether it is compiled or interpreted, so TRITON_INTERPRET
is set here only around the first import of core.kernels (and restored at once: nothing else in the
suite sees it). If the kernels were already imported compiled, or triton is missing, the module is
skipped with the reason. Shapes are small: the interpreter runs each program in numpy.

Numerics follow METHOD.md: fresh random inputs per test, outputs poisoned with NaN before the
launch, and ‖out − ref‖/‖ref‖ against the float64 product of the dequantized weights below 1e-5
with fp32 activations, 2e-3 with fp16 and 1e-2 with bf16. The inline-PTX decode cannot run in the
interpreter; its program is checked against a model of PTX's `prmt` instead (GPU tests run it).
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (requirements-dev.txt pins it for these tests)", allow_module_level=True)

_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton.experimental.gluon  # noqa: F401  the interpreter imports it at the first launch; it
    # wraps triton's own jit helpers and checks then that the interpreter is on
    from core import fastpath, generation, kernels, loading, quality
    from core.kernels import attention, gemv16, layers, modules, select, tiling, w4a16, w4mma, w8a16
finally:
    os.environ.pop("TRITON_INTERPRET") if _previous is None else os.environ.update(TRITON_INTERPRET=_previous)

if not kernels.interpreted(w8a16.gemv_kernel):
    pytest.skip("core.kernels was imported compiled before this module; run it on its own", allow_module_level=True)

from conftest import QUESTION, relative_error, subprocess_env  # noqa: E402
from core.spec import GenerationSpec, LoadSpec, QuantSpec  # noqa: E402

BOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _poisoned(rows: int, n: int, dtype) -> torch.Tensor:
    return torch.full((rows, n), float("nan"), dtype=dtype)


def _int8(n: int, k: int):
    return torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) + 0.1


def _int8_dense(cb, scb) -> torch.Tensor:
    return cb.double() * scb.double()[:, None] / 127


def _packed(n: int, k: int, quant_type: str = "nf4", nested: bool = False) -> w4a16.Packed:
    return _quantized(n, k, quant_type, nested)[0]


def _quantized(n: int, k: int, quant_type: str, nested: bool) -> tuple[w4a16.Packed, torch.Tensor]:
    """A random weight quantized by bitsandbytes: as the kernels read it, and as bitsandbytes dequantizes it."""
    import bitsandbytes.functional as bnb

    data, state = bnb.quantize_4bit(torch.randn(n, k), blocksize=64, quant_type=quant_type,
                                    compress_statistics=nested)
    weight = type("Weight", (), {"data": data, "quant_state": state})()
    return w4a16.Packed.from_param(weight), bnb.dequantize_4bit(data, state).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_w8a16_matches_dequantized_reference(dtype, rows):
    cb, scb = _int8(48, 320)  # 320: K is no multiple of the K step, so the masks are exercised
    x = torch.randn(rows, 320, dtype=dtype)
    out = _poisoned(rows, 48, dtype)
    if rows == 1:
        w8a16.launch_gemv(x, [cb], [scb], [out])
    else:
        tiling.launch_dense_gemm(x, cb, scb, out)
    assert relative_error(out, x.double() @ _int8_dense(cb, scb).T) < BOUND[dtype]
    assert relative_error(w8a16.reference(x, cb, scb), x.double() @ _int8_dense(cb, scb).T) < BOUND[dtype]


@pytest.mark.parametrize("silu_pair", [False, True])
def test_grouped_gemvs_match_reference(silu_pair):
    """q/k/v (or gate/up with SiLU) in one launch, for int8, 4-bit and 16-bit weights."""
    k, rows = 256, ([64, 64] if silu_pair else [64, 32, 32])
    x = torch.randn(1, k, dtype=torch.bfloat16)

    def expected(dense):
        outs = [x.double() @ d.T for d in dense]
        return [torch.nn.functional.silu(outs[0]) * outs[1]] if silu_pair else outs

    int8 = [_int8(n, k) for n in rows]
    packed = [_packed(n, k) for n in rows]
    sixteen = [torch.randn(n, k, dtype=torch.bfloat16) for n in rows]
    cases = [
        (lambda outs: w8a16.launch_gemv(x, [c for c, _ in int8], [s for _, s in int8], outs, silu_pair),
         [_int8_dense(c, s) for c, s in int8]),
        (lambda outs: w4a16.launch_gemv(x, packed, outs, silu_pair), [w4a16.dequantize(p).double() for p in packed]),
        (lambda outs: gemv16.launch_gemv(x, sixteen, outs, silu_pair), [w.double() for w in sixteen]),
    ]
    for launch, dense in cases:
        outs = [_poisoned(1, n, torch.bfloat16) for n in (rows[:1] if silu_pair else rows)]
        launch(outs)
        for out, want in zip(outs, expected(dense)):
            assert relative_error(out, want) < 1e-2


@pytest.mark.parametrize("quant_type,nested", [("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("rows", [1, 2, 5, 16])
def test_w4a16_matches_bitsandbytes_dequantization(quant_type, nested, rows):
    """The GEMV (1 row) and the decode-once GEMM (2-16 rows) against bitsandbytes' own dequantization."""
    packed, theirs = _quantized(40, 384, quant_type, nested)
    weight = w4a16.dequantize(packed)
    assert torch.allclose(weight, theirs, atol=1e-6)  # the reference reads bitsandbytes' layout right
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, 384, dtype=dtype)
        out = _poisoned(rows, 40, dtype)
        if rows == 1:
            w4a16.launch_gemv(x, [packed], [out])
        else:
            w4a16.launch_gemm(x, packed, out)
        assert relative_error(out, x.double() @ weight.double().T) < BOUND[dtype]


@pytest.mark.parametrize("quant_type,nested", [("nf4", False), ("fp4", True), ("nf4", True)])
def test_tensor_core_layout_computes_the_product_and_unshuffles_exactly(quant_type, nested):
    """The CUDA kernel's algorithm (core.kernels.w4mma.emulate: each lane's A and B registers placed where
    mma.sync m16n8k16 puts their elements) over the shuffled bytes and absmax gives x · W as bitsandbytes
    dequantizes W, for 1-16 rows; the shuffle is a permutation: unshuffling restores the bytes exactly."""
    packed, theirs = _quantized(48, 192, quant_type, nested)
    data, absmax = packed.data.clone(), packed.absmax.clone()
    w4mma.shuffle_(packed)
    assert not torch.equal(packed.data, data) and sorted(packed.data.tolist()) == sorted(data.tolist())
    for rows in (1, 3, 8, 9, 16):
        x = torch.randn(rows, 192)
        assert relative_error(w4mma.emulate(x, packed), x.double() @ theirs.double().T) < 1e-5
    w4mma.unshuffle_(packed)
    assert torch.equal(packed.data, data) and torch.equal(packed.absmax, absmax)


def test_tensor_core_kernel_is_offered_only_where_it_can_run():
    """On the CPU (and for fp32 activations, or blocks other than 64) the 4-bit layers keep the Triton kernels."""
    packed, _ = _quantized(48, 192, "nf4", False)
    assert w4mma.available(torch.device("cpu")) == "it needs a CUDA GPU"
    assert w4mma.supported(packed, torch.bfloat16) and not w4mma.supported(packed, torch.float32)
    assert not w4mma.supported(_quantized(40, 192, "nf4", False)[0], torch.bfloat16)  # 40 rows: not whole tiles


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_split_kv_attention_matches_reference(dtype, mask_kind):
    """A decode step's attention split over 3 chunks of a 150-position cache (the last partial), 6 query heads on
    2 key/value heads, 3 rows: one left-padded past a whole chunk, one with the cache's tail unused."""
    torch.manual_seed(0)
    batch, heads, heads_kv, length, dim = 3, 6, 2, 150, 32
    query = torch.randn(batch, heads, 1, dim, dtype=dtype)
    key, value = (torch.randn(batch, heads_kv, length, dim, dtype=dtype) for _ in range(2))
    keep = torch.ones(batch, 1, 1, length + 10, dtype=torch.bool)  # masks may be longer than the cache
    keep[0, ..., :70] = False  # left padding over the first chunk and part of the second
    keep[1, ..., 100:] = False  # positions not written yet
    mask = {"bool": keep, "float": torch.zeros_like(keep, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min),
            "none": None}[mask_kind]
    assert attention.served(query, key, value, mask, {})
    out = attention.split_kv(query, key, value, None if mask is None else mask[..., :length], dim ** -0.5)
    expected = attention.reference(query.double(), key.double(), value.double(), mask, dim ** -0.5)
    assert out.shape == (batch, 1, heads, dim)
    assert relative_error(out, expected.double()) < BOUND[dtype]


def test_split_kv_attention_gives_a_long_cache_more_blocks_per_program():
    """A cache longer than 64 parts of 64 positions: each program takes several blocks (an online softmax across
    them), one row left-padded over 1,000 positions."""
    torch.manual_seed(0)
    length = 64 * 70 + 17
    query = torch.randn(2, 4, 1, 16)
    key, value = torch.randn(2, 2, length, 16), torch.randn(2, 2, length, 16)
    keep = torch.ones(2, 1, 1, length, dtype=torch.bool)
    keep[1, ..., :1000] = False
    out = attention.split_kv(query, key, value, keep, 0.25)
    assert relative_error(out, attention.reference(query.double(), key.double(), value.double(), keep, 0.25)) < 1e-5


def test_split_kv_attention_leaves_other_calls_to_sdpa():
    query, key = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16)
    assert not attention.served(torch.randn(1, 4, 3, 16), key, key, None, {})  # prefill
    assert not attention.served(query, key, key, None, {"softcap": 30.0})
    assert not attention.served(query, key, key, torch.ones(1, 4, 1, 8, dtype=torch.bool), {})  # a mask per head
    assert not attention.served(torch.randn(1, 4, 1, 24), torch.randn(1, 2, 8, 24), torch.randn(1, 2, 8, 24), None,
                                {})  # head size not a power of two


def test_split_k_parts_meet_in_the_last_and_leave_the_counters_at_zero():
    """K split in parts (what gemm_blocks chooses for few output rows): the last part of each tile
    sums all partials in part order, so two launches agree bitwise, and every tile's counter is back
    at zero for the next launch."""
    packed, _ = _quantized(96, 1024, "nf4", True)
    cb, scb = _int8(96, 1024)
    x = torch.randn(5, 1024)
    cases = [(lambda out, split: w4a16.launch_gemm(x, packed, out, tiling.Blocks(32, 128, 4, 16, 3, split)),
              w4a16.dequantize(packed).double()),
             (lambda out, split: tiling.launch_dense_gemm(x, cb, scb, out, tiling.Blocks(32, 128, 4, 16, 3, split)),
              _int8_dense(cb, scb))]
    assert tiling.gemm_blocks(5, 96, 1024, 4, 64).split > 1
    for launch, dense in cases:
        outs = []
        for split in (4, 4, 8):
            out = _poisoned(5, 96, torch.float32)
            launch(out, split)
            assert relative_error(out, x.double() @ dense.T) < BOUND[torch.float32]
            assert not tiling.split_scratch(x.device)[1].any()
            outs.append(out)
        assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("shape", [(6, 384), (3, 1, 384), (1, 1, 384)])
def test_each_format_serves_flattened_rows_and_batched_sequences(shape):
    """A batched step presents [N, K] token rows or [B, 1, K] sequences: every format's kernel gives
    its reference's numbers in the input's shape (bias included), whatever the row count."""
    packed, _ = _quantized(40, 384, "nf4", True)
    bias = torch.randn(40)
    four = layers.FourBitLayer(_module(torch.nn.Linear(384, 40), bias, compute_dtype=torch.float32), packed)
    cb, scb = _int8(40, 384)
    int8 = layers.Int8Layer(_module(torch.nn.Linear(384, 40), bias, weight=cb, SCB=scb),
                            activations=torch.float32)
    sixteen = layers.SixteenBitLayer(_module(torch.nn.Linear(384, 40), bias.bfloat16(),
                                             weight=torch.randn(40, 384, dtype=torch.bfloat16)))
    for layer in (four, int8, sixteen):
        x = torch.randn(shape, dtype=layer.compute_dtype)
        out = layer.kernel(x)
        assert out.shape == (*shape[:-1], 40) and out.dtype == x.dtype
        assert relative_error(out, layer.reference(x).double()) < BOUND[x.dtype]


def _module(linear: torch.nn.Linear, bias: torch.Tensor, weight: torch.Tensor | None = None, SCB=None,  # noqa: N803
            compute_dtype=None) -> torch.nn.Linear:
    """An nn.Linear standing in for a bitsandbytes layer: the attributes the layer classes read."""
    if weight is not None:
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    linear.bias = torch.nn.Parameter(bias, requires_grad=False)
    linear.weight.SCB = SCB
    linear.compute_dtype = compute_dtype
    return linear


def _prmt(a: int, b: int, c: int) -> int:
    """PTX `prmt.b32` (default mode): byte i of the result is byte c[i] & 7 of {b, a}, or its sign
    replicated when c[i] & 8."""
    source, out = (b << 32) | a, 0
    for i in range(4):
        select_ = (c >> (4 * i)) & 0xF
        byte = (source >> (8 * (select_ & 7))) & 0xFF
        out |= ((0xFF if byte & 0x80 else 0) if select_ & 8 else byte) << (8 * i)
    return out


def _bf16x2_fma(a: int, b: int, c: int) -> int:
    """PTX `fma.rn.bf16x2`: per 16-bit half, a · b + c rounded once to bf16 (a bf16 product is exact in fp32)."""
    def halves(v):
        return torch.tensor([v & 0xFFFF, v >> 16], dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()

    out = (halves(a) * halves(b) + halves(c)).to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    return int(out[0]) | int(out[1]) << 16


def _run_ptx(program: str, inputs: list[int]) -> list[int]:
    """Runs the straight-line PTX of a decode program (integer ops, byte permutes, bf16x2 FMAs) on Python ints."""
    registers = {f"${8 + i}": v for i, v in enumerate(inputs)}
    operations = {"and": lambda a, b: a & b, "or": lambda a, b: a | b, "shr": lambda a, b: a >> b,
                  "shl": lambda a, b: (a << b) & 0xFFFFFFFF, "prmt": _prmt, "mov": lambda a: a, "fma": _bf16x2_fma}
    for line in program.splitlines():
        match = re.match(r"\s*(\w+)(?:\.\w+)+\s+([^;]+);", line)
        if match and match.group(1) in operations:
            target, *sources = [a.strip() for a in match.group(2).split(",")]
            values = [registers[s] if s in registers else int(s, 0) for s in sources]
            registers[target] = operations[match.group(1)](*values)
    return [registers[f"${i}"] for i in range(8)]


def _nibbles(word: int) -> list[int]:
    return [(word >> (8 * (e // 2) + 4 * (1 - e % 2))) & 15 for e in range(8)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_prmt_decode_program_gives_each_nibbles_code(quant_type):
    from bitsandbytes.functional import get_4bit_type

    code = get_4bit_type(quant_type, device="cpu")
    tables = [int(word, 16) for word in w4a16.prmt_tables(code).split(",")]
    want = code.to(torch.bfloat16).float()
    for word in torch.randint(0, 2**32, (64,), dtype=torch.int64).tolist():
        decoded = torch.tensor(_run_ptx(w4a16._PRMT_DECODE.value, [word] + tables)).to(torch.int32).view(torch.float32)
        assert torch.equal(decoded, want[_nibbles(word)])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_paired_decode_program_gives_each_scaled_weight(quant_type):
    """The GEMM's decode of two words at once (Triton's pack=2 operands: both words, their absmax as
    bf16x2, each table word twice): output e holds element e of each word, code · absmax in bf16."""
    from bitsandbytes.functional import get_4bit_type

    code = get_4bit_type(quant_type, device="cpu")
    tables = [int(word, 16) for word in w4a16.prmt_tables(code).split(",")]
    doubled = [t for t in tables for _ in range(2)]
    bf16 = code.to(torch.bfloat16).float()
    for _ in range(32):
        words = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
        scales = (torch.rand(2) * 4).to(torch.bfloat16)
        scale_pair = scales.view(torch.int16).to(torch.int32) & 0xFFFF
        out = _run_ptx(w4a16._PRMT_PAIRS.value, words + [int(scale_pair[0]) | int(scale_pair[1]) << 16] + doubled)
        pairs = torch.tensor(out, dtype=torch.int64)
        halves = torch.stack([pairs & 0xFFFF, pairs >> 16], dim=1).to(torch.int32).to(torch.int16).view(torch.bfloat16)
        for which, word in enumerate(words):
            want = (bf16[_nibbles(word)] * scales[which].float()).to(torch.bfloat16)
            assert torch.equal(halves[:, which], want)


_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from core.kernels import gemv16, tiling, w4a16, w8a16
from core.kernels.tiling import gemm_blocks, gemv_blocks

def compile(fn, pointers, constants, warps):
    names = list(fn.arg_names)
    signature = {**pointers, **{name: "constexpr" for name in constants}}
    signature.update({n: "i32" for n in names if n not in signature})
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n, t in pointers.items() if t.startswith("*")}
    triton.compile(ASTSource(fn, signature, constants, aligned), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": warps})

x = {"x_ptr": "*bf16"}
outs = {o: "*bf16" for o in ("o0", "o1", "o2")}
for silu in (False, True):
    b = gemv_blocks(4096, 8)
    compile(w8a16.gemv_kernel, {**x, **outs, **{w: "*i8" for w in ("w0", "w1", "w2")},
            **{s: "*fp32" for s in ("s0", "s1", "s2")}},
            dict(K=4096, BLOCK_N=b.block_n, BLOCK_K=b.block_k, SILU_PAIR=silu, CONVERT=tiling.CONVERT_F32), b.warps)
    b = gemv_blocks(4096, 16)
    compile(gemv16.gemv_kernel, {**x, **outs, **{w: "*bf16" for w in ("w0", "w1", "w2")}},
            dict(K=4096, BLOCK_N=b.block_n, BLOCK_K=b.block_k, SILU_PAIR=silu), b.warps)
    for prmt, nested in ((True, False), (False, True)):
        b = gemv_blocks(4096, 4, silu, 64)
        compile(w4a16.gemv_kernel, {**x, **outs, **{p: "*i32" for p in ("p0", "p1", "p2")},
                **{a: "*u8" if nested else "*fp32" for a in ("a0", "a1", "a2")},
                **{p: "*fp32" for p in ("absmax2_ptr", "code2_ptr", "offset_ptr", "code_ptr")}},
                dict(K=4096, BLOCKSIZE=64, NESTED=nested, BLOCK2=256, PRMT=prmt,
                     TABLE=(1, 2, 3, 4, 5, 6, 7, 8) if prmt else w4a16.NO_TABLE, BLOCK_N=b.block_n,
                     BLOCK_K=b.block_k, SILU_PAIR=silu), b.warps)
split = {"partial_ptr": "*fp32", "count_ptr": "*i32"}
for bits, weight, act, convert in ((8, "*i8", "*bf16", tiling.CONVERT_BF16), (8, "*i8", "*fp16", tiling.CONVERT_F16),
                                   (16, "*bf16", "*bf16", tiling.CONVERT_PLAIN)):
    g = gemm_blocks(8, 4096, 4096, bits)
    compile(tiling.dense_gemm_kernel, {"x_ptr": act, "w_ptr": weight, "scale_ptr": "*fp32", "out_ptr": act, **split},
            dict(K=4096, SCALED=bits == 8, SPLIT=g.split, BLOCK_M=16, BLOCK_N=g.block_n, BLOCK_K=g.block_k,
                 FP32_DOT=False, PRECISION="tf32", CONVERT=convert), g.warps)
g = gemm_blocks(8, 4096, 4096, 4, 64)
for prmt, nested, pairs, parts in ((True, False, True, g.split), (True, True, False, 1), (False, False, False, 2)):
    compile(w4a16.gemm_kernel, {**x, "words_ptr": "*i32", "out_ptr": "*bf16",
            "absmax_ptr": "*u8" if nested else "*fp32",
            **{p: "*fp32" for p in ("absmax2_ptr", "code2_ptr", "offset_ptr", "code_ptr")}, **split},
            dict(K=4096, SPLIT=parts, BLOCKSIZE=64, NESTED=nested, BLOCK2=256, PRMT=prmt,
                 TABLE=(1, 2, 3, 4, 5, 6, 7, 8) if prmt else w4a16.NO_TABLE, PAIRS=pairs, BLOCK_M=16, BLOCK_N=g.block_n,
                 BLOCK_K=g.block_k, FP32_DOT=False, PRECISION="tf32"), g.warps)
print("compiled")
"""


def test_kernels_compile_for_hopper():
    """The interpreter runs Python that Triton's compiler rejects (list comprehensions over ranges,
    non-constexpr globals): compile each kernel for sm_90, with the ptxas of Triton's wheel, in a
    process without the interpreter."""
    env = subprocess_env()
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", _HOPPER], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


# ----------------------------------------------------------------------------- choices and models


def test_selection_keeps_the_faster_and_remembers_it():
    select.forget()
    timings = iter([3.0, 2.0])
    decision = select.decide(("shape",), "nf4 8x8", [], [], lambda calls: next(timings), "bitsandbytes'")
    assert not decision.ours and "bitsandbytes' (2.0 µs against ours 3.0)" in decision.describe()
    assert select.decide(("shape",), "nf4 8x8", [], [], lambda calls: 0.0) is decision  # measured once
    assert select.decide(("other",), "nf4 8x8", [], [], _alternating(ours_first_faster=True)).ours
    select.forget()


def _alternating(ours_first_faster: bool):
    """A timer for decide(): it times ours, then theirs."""
    values = itertools.cycle([1.0, 2.0] if ours_first_faster else [2.0, 1.0])
    return lambda calls: next(values)


@pytest.fixture(scope="module")
def tiny(checkpoint, tmp_path_factory):
    """A 2-layer Llama with random weights and the embedded model's tokenizer (fast under the interpreter)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    for param in model.parameters():
        param.data.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint / name, folder / name)
    return str(folder)


def _load(tiny: str, mode: str):
    logging.getLogger(fastpath.INT8_LOGGER).setLevel(logging.ERROR)
    return loading.load(LoadSpec(model=tiny, dtype="float32", device_map="cpu",
                                 quant=QuantSpec(mode=mode, compute_dtype="float32")))


GREEDY = GenerationSpec(greedy=True, max_new_tokens=6, use_chat_template=False)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_kernel_forwards_give_the_reference_tokens_and_reverse_exactly(tiny, mode, monkeypatch):
    select.forget()
    monkeypatch.setattr(select, "graph_time_us", _alternating(ours_first_faster=True))  # no CUDA graphs here
    loaded = _load(tiny, mode)  # no forward yet: bitsandbytes' CPU path repacks 4-bit weights on its first one
    tree, state = str(loaded.model), {k: v.clone() for k, v in loaded.model.state_dict().items()}
    choice = fastpath.FastPathChoice("sdpa", None, "test", kernels=True)
    on = fastpath.enable(loaded, choice)
    assert on.enabled and "in one launch: ours" in on.kernels
    fast = generation.generate(loaded, [QUESTION], GREEDY, min_new_tokens=6).token_ids
    off = fastpath.reverse(loaded)
    assert not off.kernels and not [m for m in loaded.model.modules() if "forward" in m.__dict__]
    assert str(loaded.model) == tree
    after = loaded.model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(state[k], after[k]) for k in state)
    reference = modules.install(loaded.model, reference=True)
    expected = generation.generate(loaded, [QUESTION], GREEDY, min_new_tokens=6).token_ids
    reference.remove()
    assert fast == expected
    select.forget()


def test_split_kv_attention_answers_as_sdpa_and_reverses(tiny):
    """The fast path's decode attention (core.kernels.attention) on a model with grouped key/value heads and a
    static cache: greedy tokens equal to sdpa's, one prompt and two of different lengths (left padding), and
    reverse restores sdpa."""
    loaded = _load(tiny, "none")
    prompts = [QUESTION, "Once upon a time"]
    plain = [generation.generate(loaded, [p], GREEDY, min_new_tokens=6).token_ids for p in prompts]
    together = generation.generate(loaded, prompts, GREEDY, min_new_tokens=6).token_ids
    on = fastpath.enable(loaded, fastpath.FastPathChoice(attention.register(), "static", "test"))
    try:
        assert loaded.model.config._attn_implementation == attention.NAME
        calls = []
        split = attention.split_kv
        attention.split_kv = lambda *a: calls.append(1) or split(*a)
        try:
            assert [generation.generate(loaded, [p], GREEDY, min_new_tokens=6).token_ids for p in prompts] == plain
            assert generation.generate(loaded, prompts, GREEDY, min_new_tokens=6).token_ids == together
        finally:
            attention.split_kv = split
        assert calls  # the decode steps went through the split kernel
    finally:
        off = fastpath.reverse(loaded)
    assert on.enabled and off.attn_implementation == "sdpa" == loaded.model.config._attn_implementation


def test_fast_path_measures_and_enables_through_choose(tiny, monkeypatch):
    """On a 'GPU' (the interpreter stands in) int8 becomes W8A16 + graph whatever the threshold."""
    loaded = _load(tiny, "int8")
    monkeypatch.setattr(fastpath, "_on_gpu", lambda _: True)
    choice = fastpath.choose(loaded)
    assert choice.kernels and choice.cuda_graph and "W8A16" in choice.reason and "perplexity" in choice.reason
    off = fastpath.choose(loaded, own_kernels=False)
    assert not off.kernels and not off.cuda_graph and "turned off" in off.reason


def test_tensor_core_move_is_all_or_nothing_and_restores_the_bytes(tiny):
    """The 4-bit layers move to the tensor-core layout together where the per-step total wins at 1 and at 16 rows
    (the timer stands in for the GPU's); when it loses, or the kernel cannot be built, every byte is put back."""
    loaded = _load(tiny, "nf4")  # no forward yet: bitsandbytes' CPU path repacks 4-bit weights on its first one
    found = layers.find_layers(loaded.model)
    groups: dict = {}
    for layer in found.values():
        if isinstance(layer, layers.FourBitLayer):
            groups.setdefault(layer.key, []).append(layer)
    stored = {k: v.clone() for k, v in loaded.model.state_dict().items()}

    def unchanged():
        return all(torch.equal(stored[k], v) for k, v in loaded.model.state_dict().items())

    def timer(faster):
        return lambda calls: 1.0 if faster(calls) else 2.0

    def failing(calls):
        raise RuntimeError("NVRTC: no kernel image for this driver")

    tensor_core_first = itertools.cycle([True] * len(modules.TENSOR_CORE_VARIANTS) + [False])
    moved, notes = modules._tensor_cores(list(groups.values()), {}, timer(lambda calls: next(tensor_core_first)))
    assert len(moved) == sum(len(g) for g in groups.values()) and "moved to the tensor-core layout" in notes[0]
    assert not unchanged()
    for layer in moved:
        layer.unshuffle()
    assert unchanged()
    installed_first = itertools.cycle([False] * len(modules.TENSOR_CORE_VARIANTS) + [True])
    moved, notes = modules._tensor_cores(list(groups.values()), {}, timer(lambda calls: next(installed_first)))
    assert moved == [] and "not moved" in notes[0] and unchanged()
    moved, notes = modules._tensor_cores(list(groups.values()), {}, failing)
    assert moved == [] and "NVRTC" in notes[0] and unchanged()


def test_losing_kernels_leave_the_library_forward(tiny):
    select.forget()
    loaded = _load(tiny, "nf4")
    installed = modules.install(loaded.model, timer=_alternating(ours_first_faster=False))
    try:
        assert "bitsandbytes'" in installed.summary() and ": ours" not in installed.summary()
        assert not [m for m in loaded.model.modules() if "forward" in m.__dict__]
    finally:
        installed.remove()
        select.forget()


def test_batched_rows_take_the_kernel_only_where_it_won_at_both_ends(tiny, monkeypatch):
    """4-bit layers are measured at 1, 2 and 16 rows; 2-16 rows take our kernel only when it won at
    2 and at 16, and a batched step's [N, K] and [B, 1, K] inputs are routed alike."""
    calls = []
    apply = w4a16.apply
    monkeypatch.setattr(w4a16, "apply", lambda x, *a: calls.append(x.shape) or apply(x, *a))
    for verdicts, few in (([1.0, 2.0] * 3, True), ([1.0, 2.0, 1.0, 2.0, 2.0, 1.0], False)):
        select.forget()
        loaded = _load(tiny, "nf4")
        timings = itertools.cycle(verdicts)
        installed = modules.install(loaded.model, timer=lambda _: next(timings))
        try:
            layer = loaded.model.model.layers[0].mlp.down_proj
            assert "forward" in layer.__dict__ and ("16 rows: ours" in installed.summary()) == few
            calls.clear()
            with torch.inference_mode():
                for shape in ((1, 1, 128), (5, 128), (4, 1, 128), (17, 128)):
                    assert layer(torch.randn(shape)).shape == (*shape[:-1], 64)
            assert calls == [(1, 1, 128)] + ([(5, 128), (4, 1, 128)] if few else [])  # 17 rows: prefill
        finally:
            installed.remove()
            select.forget()


def test_compiled_forwards_trace_as_one_graph(tiny):
    select.forget()
    loaded = _load(tiny, "int8")
    installed = modules.install(loaded.model, timer=_alternating(ours_first_faster=True))
    ids = loaded.tokenizer(QUESTION, return_tensors="pt").input_ids[:, :1]
    try:
        with torch.inference_mode():
            eager = loaded.model(ids, use_cache=False).logits
            compiled = torch.compile(loaded.model, backend="eager", fullgraph=True)(ids, use_cache=False).logits
        assert torch.equal(eager, compiled)
    finally:
        installed.remove()
        torch._dynamo.reset()
        select.forget()


def test_without_triton_or_gpu_the_fast_path_keeps_the_libraries(tiny, monkeypatch):
    loaded = _load(tiny, "int8")
    assert kernels.unavailable("cuda") is None
    monkeypatch.setattr(kernels, "interpreted", lambda kernel: False)
    assert "CUDA GPU" in kernels.unavailable("cpu")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert "Triton is not installed" in kernels.unavailable("cuda")
    monkeypatch.setattr(fastpath, "_on_gpu", lambda _: True)
    choice = fastpath.choose(loaded)
    assert not choice.kernels and not choice.cuda_graph and "Triton is not installed" in choice.reason
    monkeypatch.undo()
    cpu = fastpath.choose(loaded)
    assert not cpu.kernels and "On the CPU" in cpu.reason


def test_layers_found_are_the_ones_read_in_place(tiny):
    found = layers.find_layers(_load(tiny, "int8").model)
    assert len(found) == 14 and {type(layer) for layer in found.values()} == {layers.Int8Layer}
    assert not layers.find_layers(_load(tiny, "none").model)  # fp32 weights: cuBLAS keeps them


def test_w8a16_quality_is_at_least_llm_int8s(loaded_models):
    """The quality check (core.quality) of the W8A16 math on the embedded model, on the CPU with the
    kernel's PyTorch reference: perplexity and next-token agreement at least as good as LLM.int8()'s."""
    full = quality.score(loaded_models("none"))
    int8 = loaded_models("int8")
    llm_int8 = quality.score(int8)
    installed = modules.install(int8.model, reference=True)
    try:
        w8a16_scores = quality.score(int8)
    finally:
        installed.remove()

    def agreement(scores):
        return sum(a == b for a, b in zip(full.predictions, scores.predictions)) / len(full.predictions)

    assert w8a16_scores.perplexity <= llm_int8.perplexity
    assert agreement(w8a16_scores) >= agreement(llm_int8)
    assert abs(w8a16_scores.perplexity - 9.01) < 0.05  # the figure in fastpath.W8A16_REASON
