"""The load form, defined once: each field's name, type, default, label and help, and where it goes in a LoadSpec.

The Model tab's components, the named parameters of its handlers (`/plan`, `/check_fit`, `/load_model`) and the
command line's load options are all built from `FIELDS`, so an option is added here, once, and a value can never
land in the wrong field by position. `spec_from` turns the form's values (strings and booleans, as a browser or
an API client sends them) into a `LoadSpec`; `values_of` is its inverse, for showing a loaded model's settings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields as dataclass_fields

from core.spec import (COMPUTE_DTYPES, DEVICE_MAP_NAMES, DTYPES, EMBEDDED_MODEL, QUANT_STORAGES, QUANTIZATIONS,
                       Device, LoadSpec, QuantSpec, max_memory_text, parse_device_map, parse_max_memory, parse_model,
                       parse_names, parse_number)


@dataclass(frozen=True)
class Field:
    name: str  # the API parameter, the form's key and (with '-') the command-line option
    kind: type  # str, bool or float: what the form and the command line hold
    default: str | bool | float
    label: str  # the form's label
    help: str  # the command line's help and the form's hint
    example: str = ""  # a value to show as the form's placeholder
    choices: tuple[str, ...] = ()  # the values offered; `open_choices` also allows others (checked on parsing)
    open_choices: bool = False
    choice_labels: tuple[tuple[str, str], ...] = ()  # (what the form shows, value), when they differ
    parse: Callable[[str, object], object] | None = None  # form value -> spec value (default: by `kind`)
    show: Callable[[object], object] | None = None  # spec value -> form value (default: as is)

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    def to_spec(self, value: object) -> object:
        if self.parse is not None:
            return self.parse(self.name, value)
        if self.kind is bool:
            return bool(value)
        if self.kind is float:
            return parse_number(self.name, value, float)
        return str(value if value is not None else "").strip()


QUANT_FIELDS = frozenset(f.name for f in dataclass_fields(QuantSpec)) - {"mode"}


def _device_map_text(value: str | tuple[tuple[str, Device], ...]) -> str:
    if isinstance(value, str):
        return value
    if len(value) == 1 and value[0][0] == "":
        device = value[0][1]
        return f"cuda:{device}" if isinstance(device, int) else str(device)
    return "auto"  # an explicit module map comes from scripts only; the form offers the planner's names


FIELDS: tuple[Field, ...] = (
    Field("model", str, "", "Model", "A Hub id or a local folder of a causal LM (Llama, Qwen, SmolLM, ...) or an "
          "encoder-decoder (T5, Flan-T5, BART, ...); empty: the embedded SmolLM2-135M-Instruct.",
          "HuggingFaceTB/SmolLM2-360M-Instruct", parse=lambda name, value: parse_model(str(value or "")),
          show=lambda model: "" if model == EMBEDDED_MODEL else model),
    Field("revision", str, "", "Revision", "A branch, tag or commit of a Hub model.", "main",
          parse=lambda name, value: str(value or "").strip() or None, show=lambda revision: revision or ""),
    Field("dtype", str, "auto", "dtype", "The weights' dtype ('auto': bfloat16 on a GPU, float32 on the CPU).",
          choices=DTYPES),
    Field("quant", str, "none", "Quantization (bitsandbytes)", "none, LLM.int8() 8-bit, or 4-bit FP4/NF4.",
          choices=QUANTIZATIONS, choice_labels=(("none (full precision)", "none"), ("LLM.int8() 8-bit", "int8"),
                                                ("FP4 4-bit", "fp4"), ("NF4 4-bit", "nf4"))),
    Field("compute_dtype", str, "auto", "4-bit compute dtype", "4-bit: the dtype of the matmul after "
          "dequantization ('auto': the model's dtype).", choices=COMPUTE_DTYPES),
    Field("double_quant", bool, False, "4-bit double quantization",
          "4-bit: quantize the quantization constants too (about 0.4 bit per parameter saved)."),
    Field("quant_storage", str, "uint8", "4-bit quant storage", "4-bit: the dtype the packed weights are stored in.",
          choices=QUANT_STORAGES),
    Field("int8_threshold", float, 6.0, "LLM.int8() outlier threshold",
          "LLM.int8(): activations above this stay in 16-bit (6.0 is the paper's; 0 turns outliers off)."),
    Field("skip_modules", str, "", "Modules to skip (comma-separated)",
          "Module names left unquantized, comma-separated (lm_head always is).", "lm_head",
          parse=lambda name, value: parse_names(value), show=lambda names: ", ".join(names)),
    Field("fp32_cpu_offload", bool, False, "fp32 CPU offload",
          "int8: modules that do not fit the GPU budget run on the CPU, kept in fp32."),
    Field("device_map", str, "auto", "Device map", "Where modules go: auto, balanced, sequential, cpu or cuda:N.",
          choices=(*DEVICE_MAP_NAMES, "cuda:0"), open_choices=True,
          parse=lambda name, value: parse_device_map(str(value or "")), show=_device_map_text),
    Field("max_memory", str, "", "Max memory per device",
          "A budget per device: GPU index or cpu = size (empty: no limit).", "0=600MB, 1=1GiB, cpu=8GB",
          parse=lambda name, value: parse_max_memory(str(value or "")),
          show=lambda budget: max_memory_text(dict(budget))),
    Field("fast_path", bool, False, "Fast path",
          "The attention fast path: graphed decode from a static cache and the fast path's kernels on a GPU."),
    Field("fast_path_compile", bool, False, "GPU: compile the decode step (~40 s once, +25%)",
          "GPU: also torch.compile the graphed decode step."),
)
NAMES = tuple(f.name for f in FIELDS)
DEFAULTS: dict[str, object] = {f.name: f.default for f in FIELDS}
_BY_NAME = {f.name: f for f in FIELDS}


def field(name: str) -> Field:
    return _BY_NAME[name]


def _spec_attribute(name: str) -> str:
    return "mode" if name == "quant" else name


def spec_from(values: Mapping[str, object], **decided: object) -> LoadSpec:
    """A LoadSpec from the form's values (missing ones take their defaults). `decided` holds spec fields the caller
    has already settled, which the form's values never override: the model as checked for this caller, and the
    launch options (`trust_remote_code`, `use_server_token`)."""
    top: dict[str, object] = dict(decided)
    quant: dict[str, object] = {}
    for f in FIELDS:
        if f.name in decided:
            continue
        value = f.to_spec(values.get(f.name, f.default))
        if f.name == "quant" or f.name in QUANT_FIELDS:
            quant[_spec_attribute(f.name)] = value
        else:
            top[f.name] = value
    return LoadSpec(quant=QuantSpec(**quant), **top)


def values_of(spec: LoadSpec) -> dict[str, object]:
    """The form's values that load `spec` again: the inverse of `spec_from`."""
    shown = {}
    for f in FIELDS:
        owner = spec.quant if (f.name == "quant" or f.name in QUANT_FIELDS) else spec
        value = getattr(owner, _spec_attribute(f.name))
        shown[f.name] = f.show(value) if f.show is not None else value
    return shown
