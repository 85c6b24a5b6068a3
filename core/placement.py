"""Placement planning: which module goes to which device under a memory budget, without loading weights.

The plan builds the model on the meta device (accelerate's `init_empty_weights`), swaps in the
bitsandbytes layers exactly as `from_pretrained` would (the quantizer's `preprocess_model`), and runs
the same device-map inference transformers runs when loading (`_get_device_map`: balanced budgets,
the quantizer's 10% reserve, accelerate's `infer_auto_device_map`). So the plan is the placement the
load will get. GPUs only need to exist in the budget, not in the machine: a two-GPU split can be
planned on a laptop.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from core.errors import BudgetTooSmallError
from core.spec import Device, LoadSpec, for_planning


@dataclass(frozen=True)
class PlacementPlan:
    model: str
    quantization: str
    dtype: str
    device_map: dict[str, Device]  # module name -> device, as from_pretrained will use it
    bytes_per_device: dict[Device, int]  # weights and buffers on each device
    budget: dict[Device, int]  # the user's budget in bytes (empty: whatever the machine has)
    total_bytes: int

    @property
    def gpus_planned(self) -> int:
        return len({d for d in self.device_map.values() if isinstance(d, int)})

    @property
    def offloaded(self) -> dict[str, Device]:
        """Modules that land on the CPU or disk while GPUs are in the plan."""
        if not any(isinstance(d, int) for d in self.device_map.values()):
            return {}
        return {m: d for m, d in self.device_map.items() if d in ("cpu", "disk")}

    def table(self) -> list[tuple[str, str, int]]:
        """(device, modules, bytes) rows, modules compressed to ranges like 'model.layers.0-11'."""
        grouped: dict[Device, list[str]] = defaultdict(list)
        for module, device in self.device_map.items():
            grouped[device].append(module)
        return [(device_label(d), compress_names(mods), self.bytes_per_device.get(d, 0))
                for d, mods in sorted(grouped.items(), key=lambda kv: _device_order(kv[0]))]


def device_label(device: Device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def _device_order(device: Device) -> tuple[int, int]:
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
    from transformers import AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    from core.quantization import bitsandbytes_config, torch_dtype

    dtype = torch_dtype(spec.dtype)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=spec.trust_remote_code)
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
    per_device: dict[Device, int] = defaultdict(int)
    for module, device in device_map.items():
        per_device[normalize_device(device)] += int(sizes.get(module, 0))
    return PlacementPlan(
        model=checked.model, quantization=checked.quant.mode, dtype=checked.dtype,
        device_map={m: normalize_device(d) for m, d in device_map.items()},
        bytes_per_device=dict(per_device), budget=dict(checked.max_memory), total_bytes=int(sizes.get("", 0)),
    )


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
