"""The attention fast path: what BetterTransformer was for, built on what transformers 5 has.

BetterTransformer (`model.to_bettertransformer()`, optimum) swapped attention modules for fused
kernels and had to be reversed before saving. transformers 5 removed it: fused attention is now an
attention implementation chosen per model (`set_attn_implementation`), and decode speed comes from a
static KV cache whose fixed shapes let the decode step be compiled (`cache_implementation="static"`,
which makes `generate()` compile the step and replay it as a CUDA graph).

The fast path here changes only those settings, never a weight or a module, so `reverse` restores
the canonical model exactly: same module tree, same config, bitwise-equal state dict. The choice is
made once per model with the reason recorded (`FastPathState.reason`), and can be overridden.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.loading import LoadedModel


@dataclass(frozen=True)
class FastPathChoice:
    attn_implementation: str
    cache_implementation: str | None  # None: transformers' default dynamic cache
    reason: str


@dataclass(frozen=True)
class FastPathState:
    enabled: bool
    attn_implementation: str
    cache_implementation: str
    compiled: bool
    reason: str

    def summary(self) -> str:
        mode = "on" if self.enabled else "off"
        compiled = ", compiled decode step (CUDA graph)" if self.compiled else ""
        return (f"Fast path {mode}: attention '{self.attn_implementation}', {self.cache_implementation} KV cache"
                f"{compiled}. {self.reason}")


def _on_gpu(loaded: LoadedModel) -> bool:
    return loaded.input_device.type == "cuda"


def _offloaded(loaded: LoadedModel) -> bool:
    return bool(loaded.report.offloaded)


def choose(loaded: LoadedModel) -> FastPathChoice:
    """The fastest correct configuration for this model on this machine, with the reason.

    The GPU choices come from benchmarks/RESULTS.md (H100, 8B Llama shapes, batch 1): sdpa's
    per-step mask and kernel-selection overhead makes it slower than eager at batch 1 decode, and a
    static cache lets transformers compile the step into a CUDA graph, removing the host overhead
    that dominates decode. On the CPU neither helps (measured on the embedded model), and
    compiling would cost minutes of warm-up.
    """
    if not _on_gpu(loaded):
        return FastPathChoice("sdpa", None, "On the CPU, sdpa with a dynamic cache measured fastest "
                                            "(SmolLM2-135M: 13.7 tok/s against 12.9 eager and 12.7 static); "
                                            "compiling costs minutes of warm-up for no gain.")
    if _offloaded(loaded):
        return FastPathChoice("sdpa", None, "Some modules are offloaded to the CPU or disk: their transfers "
                                            "dominate each step and cannot be captured in a CUDA graph.")
    quant = loaded.spec.quant
    if quant.mode == "int8":
        return FastPathChoice("eager", "static", "LLM.int8() runs several small kernels per layer; a static "
                                                 "cache and a compiled step remove their launch gaps.")
    if quant.enabled:
        return FastPathChoice("eager", "static", "4-bit decode is host-bound (dequantize + GEMV per layer); "
                                                 "a static cache and a compiled step remove the host gaps.")
    return FastPathChoice("eager", "static", "At batch 1 the decode step is host-bound: eager attention with a "
                                             "static cache lets generate() compile the step into a CUDA graph.")


def state(loaded: LoadedModel) -> FastPathState:
    config = loaded.model.generation_config
    enabled = bool(loaded.canonical)
    cache = config.cache_implementation or "dynamic"
    return FastPathState(
        enabled=enabled,
        attn_implementation=loaded.model.config._attn_implementation,
        cache_implementation=cache,
        compiled=cache == "static" and _on_gpu(loaded) and not getattr(config, "disable_compile", False),
        reason=loaded.canonical.get("reason", "Canonical model as loaded."),
    )


def enable(loaded: LoadedModel, choice: FastPathChoice | None = None) -> FastPathState:
    """Turns the fast path on (idempotent). `choice` overrides the automatic one, for tests and benchmarks."""
    if loaded.canonical:
        reverse(loaded)
    choice = choice or choose(loaded)
    model = loaded.model
    loaded.canonical = {
        "attn_implementation": model.config._attn_implementation,
        "cache_implementation": model.generation_config.cache_implementation,
        "reason": choice.reason,
    }
    if choice.attn_implementation != model.config._attn_implementation:
        model.set_attn_implementation(choice.attn_implementation)
    model.generation_config.cache_implementation = choice.cache_implementation
    return state(loaded)


def reverse(loaded: LoadedModel) -> FastPathState:
    """Restores the canonical model exactly; a no-op when the fast path is off."""
    if not loaded.canonical:
        return state(loaded)
    model = loaded.model
    saved = loaded.canonical
    if model.config._attn_implementation != saved["attn_implementation"]:
        model.set_attn_implementation(saved["attn_implementation"])
    model.generation_config.cache_implementation = saved["cache_implementation"]
    for attribute in ("_compiled_call", "_cache"):  # compiled graphs and static caches hold GPU memory
        if attribute in model.__dict__:
            delattr(model, attribute)
    loaded.canonical = {}
    return state(loaded)


def set_enabled(loaded: LoadedModel, on: bool) -> FastPathState:
    return enable(loaded) if on else reverse(loaded)
