"""Placement planning: which module goes to which device under a memory budget, without loading weights.

The plan builds the model on the meta device (accelerate's `init_empty_weights`), swaps in the
bitsandbytes layers exactly as `from_pretrained` would (the quantizer's `preprocess_model`), and runs
the same device-map inference transformers runs when loading (`_get_device_map`: balanced budgets,
the quantizer's 10% reserve, accelerate's `infer_auto_device_map`). So the plan is the placement the
load will get. GPUs only need to exist in the budget, not in the machine: a two-GPU split can be
planned on a laptop. The model class comes from the model's family (core.families): causal LMs and
encoder-decoders alike, encoder, decoder and cross-attention included.

From the same meta model the plan also counts, per device, what transformers' placement sizes leave
out and the fit check adds: bitsandbytes' scales beside the packed weights, the modules transformers
upcasts to fp32 after placing (a model's keep-in-fp32 modules in a float16 load), and the decoder
layers, which hold the KV cache.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from core import families
from core.errors import BudgetTooSmallError, SpecError, first_line
from core.spec import Device, LoadSpec, QuantSpec, for_planning, model_name, size_text


@dataclass(frozen=True)
class PlacementPlan:
    model: str
    quantization: str
    dtype: str
    device_map: dict[str, Device]  # module name -> device, as from_pretrained will use it
    bytes_per_device: dict[Device, int]  # weights and buffers on each device
    budget: dict[Device, int]  # the user's budget in bytes (empty: whatever the machine has)
    total_bytes: int
    kind: str  # the model's family, in words (core.families)
    quant_state_bytes: dict[Device, int]  # bitsandbytes' absmax / row scales beside the packed weights
    upcast_bytes: dict[Device, int]  # keep-in-fp32 modules: what their upcast adds to their planned size
    kv_layers: dict[Device, int]  # decoder layers, where the KV cache lives

    @property
    def gpus_planned(self) -> int:
        return len({d for d in self.device_map.values() if isinstance(d, int)})

    @property
    def offloaded(self) -> dict[str, Device]:
        """Modules that land on the CPU or disk while GPUs are in the plan."""
        return offloaded(self.device_map)

    def table(self) -> list[tuple[str, str, int]]:
        """(device, modules, bytes) rows, modules compressed to ranges like 'model.layers.0-11'."""
        grouped: dict[Device, list[str]] = defaultdict(list)
        for module, device in self.device_map.items():
            grouped[device].append(module)
        return [(device_label(d), compress_names(mods), self.bytes_per_device.get(d, 0))
                for d, mods in sorted(grouped.items(), key=lambda kv: device_order(kv[0]))]


def device_label(device: Device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def offloaded(device_map: dict[str, Device]) -> dict[str, Device]:
    """Modules on the CPU or disk while others are on a GPU: the source of most speed surprises."""
    if not any(isinstance(d, int) for d in device_map.values()):
        return {}
    return {m: d for m, d in device_map.items() if d in ("cpu", "disk")}


def device_order(device: Device) -> tuple[int, int]:
    """GPUs by index, then the CPU, then the disk."""
    return (0, device) if isinstance(device, int) else (1, ["cpu", "disk"].index(device) if device in ("cpu", "disk")
                                                         else 9)


def compress_names(names: list[str]) -> str:
    """['model.layers.0', 'model.layers.1', 'model.norm'] -> 'model.layers.0-1, model.norm'."""
    out: list[str] = []
    run: tuple[str, int, int] | None = None
    for name in names:
        prefix, _, last = name.rpartition(".")
        if last.isdigit() and run and run[0] == prefix and int(last) == run[2] + 1:
            run = (prefix, run[1], int(last))
            continue
        if run:
            out.append(_run_text(run))
            run = None
        if last.isdigit():
            run = (prefix, int(last), int(last))
        else:
            out.append(name or "(whole model)")
    if run:
        out.append(_run_text(run))
    return ", ".join(out)


def _run_text(run: tuple[str, int, int]) -> str:
    prefix, first, last = run
    return f"{prefix}.{first}" if first == last else f"{prefix}.{first}-{last}"


def empty_model(spec: LoadSpec, config):
    """The model on the meta device, with bitsandbytes layers in place when quantized; and its quantizer."""
    from accelerate import init_empty_weights
    from transformers.quantizers import AutoHfQuantizer

    from core.quantization import bitsandbytes_config, torch_dtype

    dtype = torch_dtype(spec.dtype)
    auto_model = families.of(config).auto_model()
    try:
        with init_empty_weights():
            model = auto_model.from_config(config, dtype=dtype, trust_remote_code=spec.trust_remote_code)
    except (RuntimeError, ValueError, ArithmeticError) as error:  # sizes that contradict each other, or too big
        raise SpecError("model", model_name(spec.model), "transformers cannot build a model from its config.json "
                                                         f"({first_line(error, 200)})") from error
    quantizer = None
    qconfig = bitsandbytes_config(spec.quant)
    if qconfig is not None:
        quantizer = AutoHfQuantizer.from_config(qconfig, pre_quantized=False)
        quantizer.preprocess_model(model=model, dtype=dtype, device_map=spec.device_map_value, checkpoint_files=None)
    return model, quantizer


def plan(spec: LoadSpec, config=None) -> PlacementPlan:
    """Where each module of `spec.model` would go. Reads only the config (a few KB)."""
    from transformers.integrations.accelerate import _get_device_map, compute_module_sizes

    from core import source

    checked = for_planning(spec)
    config = config if config is not None else source.load_config(checked)
    model, quantizer = empty_model(checked, config)
    requested = checked.device_map_value
    if requested == "cpu":
        requested = {"": "cpu"}
    try:
        with _quiet_absent_gpus():
            device_map = _get_device_map(model, requested, checked.max_memory_dict, quantizer)
    except ValueError as error:
        raise explain_placement_error(error, checked) from error
    if not isinstance(device_map, dict):
        device_map = {"": device_map}
    sizes, _ = compute_module_sizes(model, quantizer)
    placed = {m: normalize_device(d) for m, d in device_map.items()}
    per_device: dict[Device, int] = defaultdict(int)
    for module, device in placed.items():
        per_device[device] += int(sizes.get(module, 0))
    return PlacementPlan(
        model=checked.model, quantization=checked.quant.mode, dtype=checked.dtype, device_map=placed,
        bytes_per_device=dict(per_device), budget=dict(checked.max_memory), total_bytes=int(sizes.get("", 0)),
        kind=families.of(config).label, quant_state_bytes=_quant_state_bytes(model, checked.quant, placed),
        upcast_bytes=_upcast_bytes(model, checked.dtype, placed), kv_layers=_kv_layers(model, placed),
    )


def device_of(name: str, device_map: dict[str, Device]) -> Device:
    """The device of a module or parameter: that of the longest module name in the map that contains it."""
    best, device = -1, next(iter(device_map.values()))
    for module, where in device_map.items():
        if (not module or name == module or name.startswith(module + ".")) and len(module) > best:
            best, device = len(module), where
    return device


def quant_overhead(numel_quantized: int, quant: QuantSpec, out_features: int) -> int:
    """Bytes bitsandbytes stores beside the packed weights of a quantized layer: 4-bit keeps one fp32 absmax per
    block of 64 weights (or a uint8 one plus a small fp32 table with double quantization), int8 one fp32 scale per
    output row."""
    if quant.bits == 4:
        blocks = numel_quantized // 64
        return blocks + (blocks // 256) * 4 if quant.double_quant else blocks * 4
    if quant.bits == 8:
        return out_features * 4
    return 0


def _quant_state_bytes(model, quant: QuantSpec, placed: dict[str, Device]) -> dict[Device, int]:
    if not quant.enabled:
        return {}
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    per_device: dict[Device, int] = defaultdict(int)
    for name, module in model.named_modules():
        if isinstance(module, (Linear4bit, Linear8bitLt)):
            numel = module.in_features * module.out_features
            per_device[device_of(name, placed)] += quant_overhead(numel, quant, module.out_features)
    return dict(per_device)


def _upcast_bytes(model, dtype: str, placed: dict[str, Device]) -> dict[Device, int]:
    """transformers sizes its placement before it upcasts keep-in-fp32 modules; what that upcast adds per device."""
    from core.quantization import fp32_upcast

    upcast = fp32_upcast(model, dtype)
    per_device: dict[Device, int] = defaultdict(int)
    for name, parameter in model.named_parameters():
        if upcast(name) and parameter.element_size() < 4:
            per_device[device_of(name, placed)] += parameter.numel() * (4 - parameter.element_size())
    return dict(per_device)


def _kv_layers(model, placed: dict[str, Device]) -> dict[Device, int]:
    """The decoder's layers per device (all layers of a causal model, the decoder's of an encoder-decoder): the
    modules of its unsplittable layer class under the decoder."""
    decoder = model.get_decoder()
    prefix = next((name for name, module in model.named_modules() if module is decoder), "")
    layer_classes = set(model._no_split_modules or ())
    per_device: dict[Device, int] = defaultdict(int)
    for name, module in model.named_modules():
        if type(module).__name__ in layer_classes and (not prefix or name.startswith(prefix + ".")):
            per_device[device_of(name, placed)] += 1
    return dict(per_device)


class _AbsentGpuFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith(tuple(f"available devices are {list(range(n))}" for n in range(9)))


@contextmanager
def _quiet_absent_gpus() -> Iterator[None]:
    """accelerate warns once per GPU and call when the budget names GPUs this machine lacks; planning for them is the
    point here (and says so in the plan), so those lines stay out of the log."""
    logger = logging.getLogger("accelerate.utils.modeling")
    quiet = _AbsentGpuFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def normalize_device(device) -> Device:
    text = str(device)
    if text.startswith("cuda:"):
        return int(text.split(":")[1])
    if text.isdigit():
        return int(text)
    return device if isinstance(device, int) else text


def explain_placement_error(error: Exception, spec: LoadSpec) -> BudgetTooSmallError:
    """bitsandbytes' 'Some modules are dispatched on the CPU or the disk' explained, with the fixes."""
    text = str(error)
    if "dispatched on the CPU or the disk" in text and not any(isinstance(d, int) for d, _ in spec.max_memory):
        cpu = dict(spec.max_memory).get("cpu")
        budget = f"The CPU budget (cpu={size_text(cpu)})" if cpu else "The memory budget"
        return BudgetTooSmallError(
            f"{budget} cannot hold the whole {spec.quant.mode} model, so some modules would go to disk, which this "
            "app does not run from. Raise the CPU budget, or leave max memory empty to let the model use the "
            "memory it needs.")
    if "dispatched on the CPU or the disk" in text:
        smaller = (" or switch to 4-bit (nf4), about half the memory of int8," if spec.quant.mode == "int8"
                   else "")
        return BudgetTooSmallError(
            f"The GPU budget cannot hold the whole {spec.quant.mode} model, so some modules would land on the CPU "
            "or disk, where bitsandbytes cannot run them quantized. Fixes: turn on 'fp32 CPU offload' (those "
            f"modules then stay unquantized on the CPU, slower), raise the GPU budget,{smaller} or give the "
            "whole model to the CPU (device map 'cpu').")
    if "not enough" in text.lower() or "does not fit" in text.lower() or "too small" in text.lower():
        return BudgetTooSmallError(f"The memory budget cannot hold the model: {text}. Raise the budget, add a "
                                   "CPU share (cpu=8GB), or quantize to 4-bit.")
    return BudgetTooSmallError(f"No placement fits this budget: {text}")
