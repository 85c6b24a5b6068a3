"""The attention fast path: what BetterTransformer was for, built on what transformers 5 has.

BetterTransformer (`model.to_bettertransformer()`, optimum) swapped attention modules for fused
kernels and had to be reversed before saving. transformers 5 removed it: fused attention is now an
attention implementation chosen per model (`set_attn_implementation`), and decode speed comes from a
static KV cache whose fixed shapes let the decode step be replayed as a CUDA graph (core.cuda_graphs),
optionally of a compiled forward.

On a GPU with Triton, layers also compute through the fast path's own kernels (core.kernels):
LLM.int8() layers as weight-only int8 (W8A16) from the int8 weights bitsandbytes stores, which makes
the int8 decode step graphable at all; 4-bit layers through a 4-bit GEMV wherever it measured faster
than bitsandbytes' own. Those are `forward`s set on the layer instances, over views of the stored
tensors.

The fast path changes only how decode runs, never a weight or a module, so `reverse` restores the
canonical model exactly: same module tree, same config, bitwise-equal state dict. The choice is made
once per model with the reason recorded (`FastPathState.reason`), and can be overridden.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from core import families, kernels
from core.loading import LoadedModel


INT8_LOGGER = "bitsandbytes.autograd._functions"
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # the CUDA graph is ours, so never Inductor's
W8A16_REASON = (
    "LLM.int8() layers run as weight-only int8 (W8A16): the int8 weights and row scales bitsandbytes "
    "stores are dequantized inside the fast path's Triton kernel and multiplied with 16-bit activations, "
    "so no layer waits for the host and the decode step is one CUDA graph. That is LLM.int8() with every "
    "activation column kept in 16-bit, as it keeps its outliers, so it is closer to full precision: on the "
    "embedded model, perplexity 9.01 against LLM.int8()'s 10.13 (full precision 8.84) and next-token "
    "agreement with full precision 92.5% against 84.8%, computed on the CPU with the kernel's PyTorch "
    "reference (the same math; the GPU benchmarks use random 8B weights).")


@dataclass(frozen=True)
class FastPathChoice:
    attn_implementation: str
    cache_implementation: str | None  # None: transformers' default dynamic cache
    reason: str
    cuda_graph: bool = False  # decode step captured as a CUDA graph (core.cuda_graphs)
    compile_step: bool = False  # ... of a torch.compile'd forward (~40 s once per batch size, +25%)
    quiet_int8_log: bool = False  # bitsandbytes logs a line per int8 matmul of a 16-bit model: ~80 ms a token
    kernels: bool = False  # layers compute through core.kernels (W8A16, 4-bit GEMV)
    compile_mode: str = "default"  # torch.compile mode of the graphed step, one of COMPILE_MODES


@dataclass(frozen=True)
class FastPathState:
    enabled: bool
    attn_implementation: str
    cache_implementation: str
    compiled: bool
    cuda_graph: bool
    reason: str
    kernels: str = ""  # which layers compute through core.kernels, and the measured 4-bit choices

    def summary(self) -> str:
        mode = "on" if self.enabled else "off"
        extra = ""
        if self.cuda_graph:
            extra = ", decode step as a CUDA graph" + (" of a compiled forward" if self.compiled else "")
        own = f" Kernels: {self.kernels}." if self.kernels else ""
        return (f"Fast path {mode}: attention '{self.attn_implementation}', {self.cache_implementation} KV cache"
                f"{extra}. {self.reason}{own}")


def _on_gpu(loaded: LoadedModel) -> bool:
    return loaded.input_device.type == "cuda"


def choose(loaded: LoadedModel, compile_step: bool | None = None, own_kernels: bool = True) -> FastPathChoice:
    """The fastest correct configuration for this model on this machine, with the reason.

    Measured on an H100 with 8B Llama shapes (benchmarks/RESULTS.md): plain
    decode is host-bound for every dtype (the GPU is busy ~20% of each step), so the decode step is
    replayed as a CUDA graph from a static cache; sdpa stays, since inside the graph it beat eager.
    On the CPU nothing here helps (measured on the embedded model), so the canonical settings stay.
    An encoder-decoder on a GPU keeps plain decode (core.families.fast_path_support says why).
    `own_kernels=False` leaves the layers to their libraries (the fast path before core.kernels).
    """
    compile_step = loaded.spec.fast_path_compile if compile_step is None else compile_step
    quant = loaded.spec.quant
    if not _on_gpu(loaded):
        quiet = quant.mode == "int8"
        return FastPathChoice("sdpa", None, "On the CPU, sdpa with a dynamic cache measured fastest "
                                            "(SmolLM2-135M: 13.7 tok/s against 12.9 eager and 12.7 static); "
                                            "compiling costs minutes of warm-up for no gain."
                              + (" bitsandbytes' per-matmul int8 log line is silenced." if quiet else ""),
                              quiet_int8_log=quiet)
    if loaded.report.offloaded:
        return FastPathChoice(loaded.model.config._attn_implementation, None,
                              "Some modules are offloaded to the CPU or disk: their transfers dominate each step "
                              "and cannot be captured in a CUDA graph.")
    attn = loaded.model.config._attn_implementation
    missing = kernels.unavailable("cuda") if own_kernels else "they are turned off"
    support = families.fast_path_support(loaded.model)
    if not support.cuda_graph:  # an encoder-decoder: the graphed step drives decoder-only forwards
        w8a16 = quant.mode == "int8" and missing is None
        extra = (" LLM.int8() layers run as weight-only int8 through the fast path's kernel (W8A16), which measured "
                 "2.1x LLM.int8() on t5-11b shapes (benchmarks/RESULTS.md)." if w8a16 else
                 " bitsandbytes' per-matmul int8 log line is silenced." if quant.mode == "int8" else "")
        return FastPathChoice(attn, None, support.reason + extra, quiet_int8_log=quant.mode == "int8", kernels=w8a16)
    graphed = dict(cuda_graph=True, compile_step=compile_step, quiet_int8_log=quant.mode == "int8",
                   kernels=missing is None)
    if quant.mode == "int8" and missing is None:
        return FastPathChoice(attn, "static", W8A16_REASON, **graphed)
    if quant.mode == "int8" and quant.int8_threshold > 0:
        return FastPathChoice(attn, None, "LLM.int8() with an outlier threshold waits for the GPU inside every "
                                          "layer, so no CUDA graph can hold it; silencing bitsandbytes' per-matmul "
                                          f"log line is what helps (about 1.5x). The fast path's W8A16 kernel would "
                                          f"allow the graph, but {missing}.",
                              quiet_int8_log=True)
    what = {"none": "16-bit", "int8": "int8 (threshold 0)"}.get(quant.mode, f"4-bit {quant.mode.upper()}")
    reason = (f"{what} decode at small batch is host-bound (the GPU idles ~80% of each step): the step is "
              "replayed as one CUDA graph from a static cache.")
    if quant.bits == 4:
        reason += (" 4-bit layers use the fast path's GEMV for the shapes where one measurement found it faster "
                   "than bitsandbytes' kernel." if missing is None
                   else f" bitsandbytes' 4-bit kernel stays: {missing}.")
    return FastPathChoice(attn, "static", reason, **graphed)


def state(loaded: LoadedModel) -> FastPathState:
    config = loaded.model.generation_config
    graph = loaded.canonical.get("graph")
    cache = "static" if graph is not None else (config.cache_implementation or "dynamic")
    return FastPathState(
        enabled=bool(loaded.canonical),
        attn_implementation=loaded.model.config._attn_implementation,
        cache_implementation=cache,
        compiled=bool(graph is not None and graph.compile_step),
        cuda_graph=graph is not None,
        reason=loaded.canonical.get("reason", "Canonical model as loaded."),
        kernels=loaded.canonical["kernels"].summary() if "kernels" in loaded.canonical else "",
    )


def enable(loaded: LoadedModel, choice: FastPathChoice | None = None) -> FastPathState:
    """Turns the fast path on (idempotent). `choice` overrides the automatic one, for tests and benchmarks."""
    if loaded.canonical:
        reverse(loaded)
    choice = choice or choose(loaded)
    model = loaded.model
    saved: dict = {
        "attn_implementation": model.config._attn_implementation,
        "cache_implementation": model.generation_config.cache_implementation,
        "reason": choice.reason,
        "choice": choice,
    }
    if choice.attn_implementation != model.config._attn_implementation:
        model.set_attn_implementation(choice.attn_implementation)
    if choice.quiet_int8_log:
        logger = logging.getLogger(INT8_LOGGER)
        saved["int8_log_level"] = logger.level
        logger.setLevel(logging.ERROR)
    if choice.kernels:  # before the graph: the compiled step must trace the kernel-backed forwards
        from core.kernels import modules

        saved["kernels"] = modules.install(model)
    if choice.cuda_graph:
        from core.cuda_graphs import GraphedDecode, defer_stop_checks

        saved["graph"] = GraphedDecode(model, choice.compile_step, choice.compile_mode).install()
        saved["undo_deferred_stop"] = defer_stop_checks()
    else:
        model.generation_config.cache_implementation = choice.cache_implementation
    loaded.canonical = saved
    return state(loaded)


def reverse(loaded: LoadedModel) -> FastPathState:
    """Restores the canonical model exactly; a no-op when the fast path is off."""
    if not loaded.canonical:
        return state(loaded)
    model = loaded.model
    saved = loaded.canonical
    if "graph" in saved:
        saved["graph"].release()
        saved["undo_deferred_stop"]()
    if "kernels" in saved:
        saved["kernels"].remove()
    if "int8_log_level" in saved:
        logging.getLogger(INT8_LOGGER).setLevel(saved["int8_log_level"])
    if model.config._attn_implementation != saved["attn_implementation"]:
        model.set_attn_implementation(saved["attn_implementation"])
    model.generation_config.cache_implementation = saved["cache_implementation"]
    for attribute in ("_compiled_call", "_cache"):  # compiled graphs and static caches hold GPU memory
        if attribute in model.__dict__:
            delattr(model, attribute)
    loaded.canonical = {}
    return state(loaded)


def graph_of(loaded: LoadedModel):
    """The GraphedDecode of the fast path when decode is graphed (a GPU), else None: the running batch replays it."""
    return loaded.canonical.get("graph") if loaded.canonical else None


def generate_kwargs(loaded: LoadedModel, input_ids, max_new_tokens: int) -> dict:
    """Extra generate() arguments the fast path needs: its own static cache when decode is graphed."""
    graph = loaded.canonical.get("graph")
    if graph is None:
        return {}
    batch, prompt_length = input_ids.shape
    return {"cache": graph.cache_for(batch, prompt_length + max_new_tokens + 1)}


@contextmanager
def suspended(loaded: LoadedModel) -> Iterator[None]:
    """The canonical model within the block (for saving); the same fast path as before afterwards."""
    choice = loaded.canonical.get("choice")
    reverse(loaded)
    try:
        yield
    finally:
        if choice is not None:
            enable(loaded, choice)


def set_enabled(loaded: LoadedModel, on: bool) -> FastPathState:
    return enable(loaded) if on else reverse(loaded)
