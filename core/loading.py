"""Loading a model as a `LoadSpec` says: from_pretrained with a BitsAndBytesConfig, then a report.

The model's family (core.families) is decided from its config before any weight is read, and picks
the Auto class (causal LM or encoder-decoder). The report holds what a user wants to see after a
load: the kind of model, footprint (`get_memory_footprint`), where each module landed, dtype,
quantization and the modules kept out of it in higher precision, load time, and the attention
implementation in use.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core import bnb_repack, families, source
from core.errors import EngineError, OutOfMemoryError, SpecError
from core.placement import explain_placement_error, normalize_device, offloaded
from core.quantization import bitsandbytes_config, describe, kept_modules, name_matcher, torch_dtype
from core.spec import Device, LoadSpec, OnProgress, validate

if TYPE_CHECKING:
    from core.fastpath import FastPathUndo
    from core.generation import GenerationMetrics
    from core.quality import QualityReport


@dataclass(frozen=True)
class LoadReport:
    model: str
    source: str
    dtype: str
    quantization: str  # one line, from quantization.describe
    device_map: dict[str, Device]
    footprint_bytes: int
    load_seconds: float
    attn_implementation: str
    parameters: int  # the model's parameters, quantized or not
    stored_elements: int  # elements of the tensors held (4-bit weights pack two values in one uint8)
    kind: str  # the model's family, in words (core.families)
    kept_in_higher_precision: str  # modules the model keeps out of quantization or upcast; "" when none

    @property
    def offloaded(self) -> dict[str, Device]:
        return offloaded(self.device_map)


@dataclass(frozen=True)
class ModelFacts:
    """What was measured on the loaded model, for its card: the last generation's metrics and the quality check."""

    last_metrics: GenerationMetrics | None = None
    quality: QualityReport | None = None


@dataclass
class LoadedModel:
    """A model in memory with its tokenizer, the spec it came from and its load report.

    `canonical` holds what the fast path changed, so that reverse can restore the canonical model (None while the
    fast path is off); it is owned by core.fastpath. `facts` holds measurements for the model card. `bnb_originals`
    holds what a save needs to undo bitsandbytes' CPU repack (core.bnb_repack).
    """

    model: Any
    tokenizer: Any
    spec: LoadSpec
    report: LoadReport
    canonical: FastPathUndo | None = None
    facts: ModelFacts = field(default_factory=ModelFacts)  # replaced, never mutated, as measurements come
    bnb_originals: dict[str, Any] = field(default_factory=dict)  # core.bnb_repack.capture, before any forward
    tokenizer_backend: dict[str, Any] | None = None  # the fast tokenizer's padding and truncation as loaded

    @property
    def input_device(self):
        """Where input ids must go: the device of the embedding layer (the first module run)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def family(self) -> families.Family:
        return families.of(self.model.config)


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def load(spec: LoadSpec, progress: OnProgress | None = None) -> LoadedModel:
    """Validates, resolves and loads. Raises EngineError subclasses for every problem a user can fix."""
    progress = progress or (lambda fraction, message: None)
    checked = validate(spec, cuda_device_count())
    progress(0.02, f"Resolving {'the embedded SmolLM2-135M-Instruct' if checked.is_embedded else checked.model}")
    path = source.resolve(checked, progress)
    family = families.of(source.load_config(checked, path=path))  # before any weight is read
    started = time.perf_counter()
    progress(0.35, "Loading tokenizer")
    tokenizer = _load_tokenizer(checked, path, family)
    action = f"Loading weights and quantizing them ({describe(checked.quant)})" if checked.quant.enabled \
        else f"Loading weights ({checked.dtype})"
    progress(0.4, action)
    with _weight_progress(progress, 0.4, 0.93, action):
        model = _from_pretrained(checked, path, family)
    model.eval()
    originals = bnb_repack.capture(model)  # before the first forward repacks 4-bit weights on the CPU
    seconds = time.perf_counter() - started
    progress(0.95, "Measuring footprint")
    report = LoadReport(
        model=checked.model, source=path, dtype=checked.dtype, quantization=describe(checked.quant),
        device_map=_actual_device_map(model), footprint_bytes=int(model.get_memory_footprint()),
        load_seconds=seconds, attn_implementation=model.config._attn_implementation,
        parameters=count_parameters(model), stored_elements=sum(p.numel() for p in model.parameters()),
        kind=family.label, kept_in_higher_precision=kept_summary(model, checked),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, spec=checked, report=report, bnb_originals=originals,
                       tokenizer_backend=_backend_settings(tokenizer))


@contextmanager
def _weight_progress(progress: OnProgress, start: float, end: float, label: str) -> Iterator[None]:
    """Routes transformers' "Loading weights" bar (one step per tensor) into `progress`, through its tqdm hook."""
    from transformers.utils import logging as hf_logging

    from core.source import progress_bar

    bar = progress_bar(progress, start, end, label)

    def hook(factory, args, kwargs):
        if kwargs.get("desc") == "Loading weights":
            return bar(*args, **kwargs)
        return factory(*args, **kwargs)

    previous = hf_logging.set_tqdm_hook(hook)
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous)


def count_parameters(model) -> int:
    """Parameters as the model defines them: a packed 4-bit weight counts its unpacked shape."""
    total = 0
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        total += state.shape.numel() if state is not None else parameter.numel()
    return total


def kept_summary(model, spec: LoadSpec) -> str:
    """One line on the modules the model keeps in higher precision, when that changes anything: they stay out of
    quantization, or load in another dtype than the rest. For T5: 'wo'."""
    names = kept_modules(model)
    matches = name_matcher(names)
    kept = [(n, p) for n, p in model.named_parameters() if matches(n)]
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for _, p in kept})
    if not kept or (not spec.quant.enabled and dtypes == [spec.dtype]):
        return ""
    modules = len({n.rsplit(".", 1)[0] for n, _ in kept})
    size = sum(p.numel() * p.element_size() for _, p in kept)
    how = "not quantized, " if spec.quant.enabled else ""
    return (f"{', '.join(names)}: {modules} modules, {how}{'/'.join(dtypes)}, {size / 2**20:,.1f} MiB "
            "(the model keeps them in higher precision; counted in the footprint)")


def _load_tokenizer(spec: LoadSpec, path: str, family: families.Family):
    from transformers import AutoTokenizer

    with source.hub_errors_explained(spec):
        tokenizer = AutoTokenizer.from_pretrained(path, revision=spec.revision, token=source.hub_token(spec),
                                                  trust_remote_code=spec.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = family.padding_side
    return tokenizer


def _backend_settings(tokenizer) -> dict[str, Any] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else {"padding": backend.padding, "truncation": backend.truncation}


def _apply_backend_settings(backend, settings: dict[str, Any]) -> None:
    if settings["padding"]:
        backend.enable_padding(**settings["padding"])
    else:
        backend.no_padding()
    if settings["truncation"]:
        backend.enable_truncation(**settings["truncation"])
    else:
        backend.no_truncation()


@contextmanager
def tokenizer_as_loaded(loaded: LoadedModel) -> Iterator[None]:
    """The fast tokenizer's padding and truncation as they were at load, for the length of a save.

    A call such as `tokenizer(texts, padding=True)` (every chat) leaves its padding in the fast
    backend's state, and `save_pretrained` writes that state into tokenizer.json: a save after a
    chat differed from a save before it (measured with transformers 5.24 on the embedded model).
    """
    backend = getattr(loaded.tokenizer, "backend_tokenizer", None)
    if backend is None or loaded.tokenizer_backend is None:
        yield
        return
    now = _backend_settings(loaded.tokenizer)
    _apply_backend_settings(backend, loaded.tokenizer_backend)
    try:
        yield
    finally:
        _apply_backend_settings(backend, now)


def _device_map_for(spec: LoadSpec):
    """The device map to hand to from_pretrained.

    With a named map ('auto') and a budget that offloads part of a quantized model to the CPU,
    transformers 5.24 quantizes the offloaded modules anyway (its fp32-offload exclusion only reads
    an explicit map), and 4-bit ones then fail at the first forward ("Cannot copy out of meta
    tensor", measured on an H100). Passing the planned map explicitly (the same map 'auto' yields)
    keeps those modules unquantized on the CPU, as fp32 CPU offload promises.
    """
    requested = spec.device_map_value
    if not (spec.quant.enabled and isinstance(requested, str) and requested != "cpu" and spec.max_memory):
        return requested
    from core.placement import device_label, plan

    planned = plan(spec)
    if not planned.offloaded:
        return requested
    return {module: device_label(device) for module, device in planned.device_map.items()}


def _from_pretrained(spec: LoadSpec, path: str, family: families.Family):
    import torch

    device_map = _device_map_for(spec)
    kwargs: dict[str, Any] = dict(
        revision=spec.revision, dtype=torch_dtype(spec.dtype), device_map=device_map,
        trust_remote_code=spec.trust_remote_code, token=source.hub_token(spec),
    )
    if spec.max_memory:
        kwargs["max_memory"] = spec.max_memory_dict
    quantization_config = bitsandbytes_config(spec.quant)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        with source.hub_errors_explained(spec):
            return family.auto_model().from_pretrained(path, **kwargs)
    except torch.OutOfMemoryError as error:
        raise OutOfMemoryError(
            "The GPU ran out of memory while loading. Quantize (nf4 needs about a quarter of bf16), lower the "
            "GPU budget so that more goes to the CPU, or pick a smaller model.") from error
    except ValueError as error:
        if "dispatched on the CPU or the disk" in str(error) or "max_memory" in str(error):
            raise explain_placement_error(error, spec) from error
        raise
    except EngineError:
        raise
    except (RuntimeError, ImportError) as error:
        if "bitsandbytes" in str(error):
            raise SpecError("quantization", spec.quant.mode,
                            f"bitsandbytes could not run here ({error}); choose 'none' or install "
                            "bitsandbytes==0.50.2") from error
        raise


def _actual_device_map(model) -> dict[str, Device]:
    found = getattr(model, "hf_device_map", None)
    if found:
        return {m: normalize_device(d) for m, d in found.items()}
    device = next(model.parameters()).device
    return {"": device.index if device.type == "cuda" else device.type}
