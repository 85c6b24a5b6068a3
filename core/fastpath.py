"""The attention fast path: what BetterTransformer was for, built on what transformers 5 has.

BetterTransformer (`model.to_bettertransformer()`, optimum) swapped attention modules for fused
kernels and had to be reversed before saving. transformers 5 removed it: fused attention is now an
attention implementation chosen per model (`set_attn_implementation`), and decode speed comes from a
static KV cache whose fixed shapes let the decode step be replayed as a CUDA graph (core.cuda_graphs),
optionally of a compiled forward.

On a GPU with Triton, layers also compute through the fast path's own kernels (core.kernels):
LLM.int8() layers as weight-only int8 (W8A16) from the int8 weights bitsandbytes stores, which makes
the int8 decode step graphable at all; 4-bit layers through a 4-bit GEMV, or through tensor cores
over a shuffled layout, wherever it measured faster than bitsandbytes' own. Those are `forward`s set
on the layer instances, over views of the stored tensors.

The fast path changes only how decode runs, never a module, so `reverse` restores the canonical model
exactly: same module tree, same config, bitwise-equal state dict. The one change to stored tensors is a
permutation: 4-bit layers that move to the tensor-core kernel (core.kernels.w4mma) have their bytes and
absmax shuffled in place while the fast path is on (no memory added), and `reverse` unshuffles them. The
choice is made once per model with the reason recorded (`FastPathState.reason`), and can be overridden. What `enable`
changed is kept in one frozen record (`FastPathUndo`, `LoadedModel.canonical`; None while off).

A model split across GPUs (a device map over several) is graphed as one CUDA graph over all of them
(core.cuda_graphs), and the kernels are installed per GPU on the layers each holds, with a hook that
makes that GPU current around its layers (Triton launches on the current GPU). The device-map entries
keep accelerate's placement hooks (they move activations between GPUs); inside them a kernel's forward
stands in for accelerate's per-module hook while the fast path is on, and reverse puts every hook back.
Modules offloaded to the CPU leave the whole model as loaded, and the reason names them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core import families, kernels
from core.loading import LoadedModel
from core.placement import compress_names, device_label, normalize_device

if TYPE_CHECKING:
    from core.cuda_graphs import GraphedDecode
    from core.kernels.modules import Installed


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


@dataclass(frozen=True)
class FastPathUndo:
    """What `enable` changed, for `reverse` to restore exactly; `LoadedModel.canonical` while the fast path is on."""

    choice: FastPathChoice  # what was enabled, with its reason (kept here only)
    attn_implementation: str  # as loaded
    cache_implementation: str | None  # the generation config's, as loaded
    int8_log_level: int | None = None  # bitsandbytes' int8 logger level as it was, when silenced
    kernels: tuple[tuple[str, Installed], ...] = ()  # core.kernels' forwards: (GPU, installation), one per GPU
    device_hooks: tuple = ()  # handles of the hooks that make a GPU current around its layers (split models)
    hooked_forwards: tuple = ()  # (module, forward) on instances before the kernels' (accelerate's, on a split model)
    graph: GraphedDecode | None = None
    undo_deferred_stop: Callable[[], None] | None = None


def _on_gpu(loaded: LoadedModel) -> bool:
    return loaded.input_device.type == "cuda"


def choose(loaded: LoadedModel, compile_step: bool | None = None, own_kernels: bool = True) -> FastPathChoice:
    """The fastest correct configuration for this model on this machine, with the reason.

    Measured on an H100 with 8B Llama shapes (benchmarks/RESULTS.md): plain
    decode is host-bound for every dtype (the GPU is busy ~20% of each step), so the decode step is
    replayed as a CUDA graph from a static cache; sdpa stays, since inside the graph it beat eager.
    On the CPU nothing here helps (measured on the embedded model), so the canonical settings stay.
    An encoder-decoder is graphed where transformers gives it a static cache (core.families.fast_path_support).
    A model split across GPUs gets one graph over all of them, not compiled (`_split_reason`).
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
        return _offloaded(loaded)
    attn = loaded.model.config._attn_implementation
    missing = kernels.unavailable("cuda") if own_kernels else "they are turned off"
    support = families.fast_path_support(loaded.model)
    if not support.cuda_graph:
        w8a16 = quant.mode == "int8" and missing is None
        extra = (" LLM.int8() layers run as weight-only int8 through the fast path's kernel (W8A16), which measured "
                 "2.1x LLM.int8() on t5-11b shapes (benchmarks/RESULTS.md)." if w8a16 else
                 " bitsandbytes' per-matmul int8 log line is silenced." if quant.mode == "int8" else "")
        return FastPathChoice(attn, None, support.reason + extra, quiet_int8_log=quant.mode == "int8", kernels=w8a16)
    split = _split_reason(loaded, compile_step, missing is None)
    prefix = support.reason + " " if support.reason else ""
    suffix = " " + split if split else ""
    graphed = dict(cuda_graph=True, compile_step=compile_step and not split, quiet_int8_log=quant.mode == "int8",
                   kernels=missing is None)
    step_attn = attn
    if missing is None and attn == "sdpa":  # core.kernels.attention: the decode step's attention split over the cache
        from core.kernels import attention as split_kv_attention

        step_attn = split_kv_attention.register()
        suffix += (" A decode step's attention is split over the key/value cache (flash-decoding, one launch for "
                   "all the query heads that share a key/value head); prefill keeps sdpa.")
    if quant.mode == "int8" and missing is None:
        return FastPathChoice(step_attn, "static", prefix + W8A16_REASON + suffix, **graphed)
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
        reason += (" 4-bit layers use the fast path's kernels (a GEMV, or tensor cores over their bytes shuffled in "
                   "place) where one measurement found them faster than bitsandbytes' kernel." if missing is None
                   else f" bitsandbytes' 4-bit kernel stays: {missing}.")
    return FastPathChoice(step_attn, "static", prefix + reason + suffix, **graphed)


def _offloaded(loaded: LoadedModel) -> FastPathChoice:
    offloaded = loaded.report.offloaded
    on_gpus = sorted({d for d in loaded.report.device_map.values() if isinstance(d, int)})
    int8 = loaded.spec.quant.mode == "int8"
    return FastPathChoice(
        loaded.model.config._attn_implementation, None,
        f"{len(offloaded)} module(s) are offloaded to the CPU or disk ({compress_names(list(offloaded))}) and stay "
        f"plain: their transfers dominate each step and cannot be captured in a CUDA graph, so the whole model, its "
        f"layers on {', '.join(device_label(d) for d in on_gpus)} too, decodes as loaded."
        + (" bitsandbytes' per-matmul int8 log line is silenced." if int8 else ""), quiet_int8_log=int8)


def _split_reason(loaded: LoadedModel, compile_step: bool, own_kernels: bool) -> str:
    """What runs where on a model split across GPUs ("" on one GPU)."""
    grouped: dict[int, list[str]] = {}
    for module, device in loaded.report.device_map.items():
        grouped.setdefault(device, []).append(module)
    if len(grouped) < 2:
        return ""
    where = "; ".join(f"{device_label(d)}: {compress_names(names)}" for d, names in sorted(grouped.items()))
    return (f"Split across {len(grouped)} GPUs ({where}): one CUDA graph replays the decode step on all of them, "
            "with the hand-offs between GPUs as device-to-device copies inside it; each GPU keeps the static KV "
            "cache of its own layers" + (" and runs the fast path's kernels on them" if own_kernels else "") + "."
            + (" The step is not compiled: the split model's placement hooks switch devices inside its forward."
               if compile_step else ""))


def state(loaded: LoadedModel) -> FastPathState:
    undo = loaded.canonical
    graph = undo.graph if undo is not None else None
    cache = "static" if graph is not None else (loaded.model.generation_config.cache_implementation or "dynamic")
    return FastPathState(
        enabled=undo is not None,
        attn_implementation=loaded.model.config._attn_implementation,
        cache_implementation=cache,
        compiled=bool(graph is not None and graph.compile_step),
        cuda_graph=graph is not None,
        reason=undo.choice.reason if undo is not None else "Canonical model as loaded.",
        kernels=_kernels_summary(undo.kernels) if undo is not None else "",
    )


def _kernels_summary(installed: tuple[tuple[str, Installed], ...]) -> str:
    if len(installed) == 1:
        return installed[0][1].summary()
    return ". ".join(f"{where}: {one.summary()}" for where, one in installed if one.summary())


def enable(loaded: LoadedModel, choice: FastPathChoice | None = None) -> FastPathState:
    """Turns the fast path on (idempotent). `choice` overrides the automatic one, for tests and benchmarks."""
    if loaded.canonical is not None:
        reverse(loaded)
    choice = choice or choose(loaded)
    model = loaded.model
    attn, cache_implementation = model.config._attn_implementation, model.generation_config.cache_implementation
    if choice.attn_implementation != attn:
        model.set_attn_implementation(choice.attn_implementation)
    level = None
    if choice.quiet_int8_log:
        logger = logging.getLogger(INT8_LOGGER)
        level = logger.level
        logger.setLevel(logging.ERROR)
    hooked = tuple((m, m.__dict__["forward"]) for m in model.modules() if "forward" in m.__dict__)
    installed, hooks = _install_kernels(model) if choice.kernels else ((), ())  # before the graph: a compiled step
    graph = undo_deferred_stop = None                                          # traces the kernel-backed forwards
    if choice.cuda_graph:
        from core.cuda_graphs import GraphedDecode, defer_stop_checks

        graph = GraphedDecode(model, choice.compile_step, choice.compile_mode).install()
        undo_deferred_stop = defer_stop_checks()
    else:
        model.generation_config.cache_implementation = choice.cache_implementation
    loaded.canonical = FastPathUndo(choice, attn, cache_implementation, level, installed, hooks, hooked, graph,
                                    undo_deferred_stop)
    return state(loaded)


def reverse(loaded: LoadedModel) -> FastPathState:
    """Restores the canonical model exactly; a no-op when the fast path is off."""
    undo = loaded.canonical
    if undo is None:
        return state(loaded)
    model = loaded.model
    if undo.graph is not None:
        undo.graph.release()
        undo.undo_deferred_stop()
    for handle in undo.device_hooks:
        handle.remove()
    for _, installed in undo.kernels:
        installed.remove()
    for module, forward in undo.hooked_forwards:  # removing a kernel's forward removed the one it had replaced
        module.forward = forward
    if undo.int8_log_level is not None:
        logging.getLogger(INT8_LOGGER).setLevel(undo.int8_log_level)
    if model.config._attn_implementation != undo.attn_implementation:
        model.set_attn_implementation(undo.attn_implementation)
    model.generation_config.cache_implementation = undo.cache_implementation
    for attribute in ("_compiled_call", "_cache"):  # compiled graphs and static caches hold GPU memory
        if attribute in model.__dict__:
            delattr(model, attribute)
    loaded.canonical = None
    return state(loaded)


def graph_of(loaded: LoadedModel) -> GraphedDecode | None:
    """The graphed decode step while the fast path holds one (the running batch replays it; benchmarks profile it)."""
    return loaded.canonical.graph if loaded.canonical is not None else None


def generate_kwargs(loaded: LoadedModel, input_ids, max_new_tokens: int) -> dict:
    """Extra generate() arguments the fast path needs: its own static cache when decode is graphed."""
    graph = graph_of(loaded)
    if graph is None:
        return {}
    batch, prompt_length = input_ids.shape
    if loaded.family.is_encoder_decoder:  # the decoder's sequence is its start token and the answer
        return {"cache": graph.cache_for(batch, max_new_tokens + 2, input_length=prompt_length)}
    return {"cache": graph.cache_for(batch, prompt_length + max_new_tokens + 1)}


@contextmanager
def suspended(loaded: LoadedModel) -> Iterator[None]:
    """The canonical model within the block (for saving); the same fast path as before afterwards."""
    choice = loaded.canonical.choice if loaded.canonical is not None else None
    reverse(loaded)
    try:
        yield
    finally:
        if choice is not None:
            enable(loaded, choice)


def set_enabled(loaded: LoadedModel, on: bool) -> FastPathState:
    return enable(loaded) if on else reverse(loaded)


# ----------------------------------------------------------------------------- a model split across GPUs


def _install_kernels(model) -> tuple[tuple[tuple[str, Installed], ...], tuple]:
    """core.kernels' forwards on the model's layers: on the whole model when it sits on one device, else per GPU on
    the layers that GPU holds, with hooks that make it current around them. Returns ((GPU, installation) pairs,
    hook handles)."""
    import torch

    from core.kernels import modules

    segments = _segments(model)
    if segments is None:
        return (("", modules.install(model)),), ()
    installed = []
    for device, members in segments.items():
        segment = torch.nn.ModuleList(members)  # a view for install(): the members keep their place in the model
        segment.dtype = model.dtype  # install() reads the activations' dtype here
        with _current(device):
            installed.append((f"cuda:{device.index}", modules.install(segment)))
    home = model.get_input_embeddings().weight.device
    return tuple(installed), _current_device_hooks(model, home)


@contextmanager
def _current(device) -> Iterator[None]:
    """`device` current, and torch.cuda.graph's default capture stream on it: Triton launches on the current GPU,
    and core.kernels.select captures its timings on that default stream, which torch creates once, on whichever GPU
    was current at the first capture (entering it would make that GPU current again)."""
    import torch

    previous = torch.cuda.graph.default_capture_stream
    with torch.cuda.device(device):
        torch.cuda.graph.default_capture_stream = torch.cuda.Stream(device=device)
        try:
            yield
        finally:
            torch.cuda.graph.default_capture_stream = previous


def _placed(model) -> dict[str, int | str]:
    return {name: normalize_device(d) for name, d in (getattr(model, "hf_device_map", None) or {}).items()}


def _segments(model) -> dict | None:
    """{GPU: the modules of its device-map entries}, for a model on two or more GPUs; None otherwise.

    accelerate's dispatch sets a `forward` on every module with weights that moves its inputs to its GPU. An entry
    stands for its children: inside an entry the inputs are already on its GPU, so a kernel's forward may stand in
    for those hooks while the fast path is on (reverse puts them back), but an entry's own hook moves what arrives
    from another GPU, and a leaf entry (an lm_head of its own) keeps it and its library's forward."""
    import torch

    placed = {name: d for name, d in _placed(model).items() if isinstance(d, int)}
    if len(set(placed.values())) < 2:
        return None
    segments: dict = {}
    for name, device in placed.items():
        members = list(model.get_submodule(name).children())
        segments.setdefault(torch.device("cuda", device), []).extend(members)
    return segments


def _current_device_hooks(model, home) -> tuple:
    """Hooks on each device-map entry off the home GPU: its GPU is current while it runs, the home GPU after."""
    import torch

    handles = []
    for name, device in _placed(model).items():
        if not isinstance(device, int) or device == home.index:
            continue
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(lambda *_, d=device: torch.cuda.set_device(d)))
        handles.append(module.register_forward_hook(lambda *_, d=home.index: torch.cuda.set_device(d)))
    return tuple(handles)
