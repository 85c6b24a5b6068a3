"""Will it fit, before loading: weights, KV cache and activation headroom per device, and the smallest fix.

Weights come from the placement plan (quantized layers at their packed size, embeddings, lm_head
and norms at their real 16/32-bit size), plus what bitsandbytes stores beside the packed weights:
4-bit keeps one fp32 absmax per block of 64 weights (or a uint8 one plus a small fp32 table with
double quantization), int8 one fp32 scale per output row. The KV cache is
2 × layers × kv_heads × head_dim × context × batch × bytes, on the devices that hold the layers.
Activation headroom is the largest transient of one forward pass over the context (the MLP's
intermediate tensors and the last-position logits), on the first device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from core import source
from core.errors import BudgetTooSmallError, SpecError
from core.placement import PlacementPlan, device_label, plan
from core.spec import Device, LoadSpec, QuantSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class DeviceFit:
    device: Device
    weights: int
    kv_cache: int
    activations: int
    budget: int | None  # None: no budget given for this device

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    @property
    def shortfall(self) -> int:
        return max(0, self.total - self.budget) if self.budget else 0


@dataclass(frozen=True)
class Fix:
    label: str
    spec: LoadSpec
    context_length: int


@dataclass(frozen=True)
class FitReport:
    model: str
    quantization: str
    context_length: int
    batch_size: int
    devices: tuple[DeviceFit, ...]
    offloaded: tuple[str, ...]  # modules the plan puts on the CPU or disk while GPUs are budgeted
    fixes: tuple[Fix, ...]
    problem: str | None = None  # why no placement exists at all (from the planner)

    @property
    def gpus_planned(self) -> int:
        return len({d.device for d in self.devices if isinstance(d.device, int)})

    @property
    def fits(self) -> bool:
        return (self.problem is None and all(d.shortfall == 0 for d in self.devices)
                and not any(d.device == "disk" for d in self.devices))

    def verdict(self) -> str:
        if self.problem:
            return f"does not fit: {self.problem}"
        if self.fits:
            return "fits"
        worst = max(self.devices, key=lambda d: d.shortfall)
        if worst.shortfall == 0:
            return "does not fit: some weights would go to disk"
        return f"does not fit: needs {worst.shortfall / 2**20:,.0f} MiB more on {device_label(worst.device)}"


def quant_overhead(numel_quantized: int, quant: QuantSpec, out_features: int) -> int:
    """Bytes bitsandbytes stores beside the packed weights of quantized layers."""
    if quant.bits == 4:
        blocks = numel_quantized // 64
        return blocks + (blocks // 256) * 4 if quant.double_quant else blocks * 4
    if quant.bits == 8:
        return out_features * 4
    return 0


def _quantized_linears(config) -> tuple[int, int]:
    """(weights in the decoder's linear layers, their total output features), from the config alone."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    inter = config.intermediate_size
    per_layer = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * inter
    outs = heads * head_dim + 2 * kv * head_dim + hidden + 2 * inter + hidden
    return per_layer * config.num_hidden_layers, outs * config.num_hidden_layers


def kv_cache_bytes(config, context: int, batch: int, dtype: str) -> int:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv * head_dim * context * batch * DTYPE_BYTES[dtype]


def activation_bytes(config, context: int, batch: int, dtype: str) -> int:
    width = DTYPE_BYTES[dtype]
    mlp = 3 * context * batch * config.intermediate_size * width  # gate, up, and their product
    residual = 4 * context * batch * config.hidden_size * width
    logits = batch * config.vocab_size * 4 * 2  # fp32 last-position logits and their softmax
    return mlp + residual + logits


MAX_CONTEXT = 2**20  # a million tokens: beyond any model's window, and the estimate's arithmetic stays sane
MAX_BATCH = 1024


def check_sizes(context_length: int, batch_size: int) -> None:
    if not 1 <= context_length <= MAX_CONTEXT:
        raise SpecError("context_length", context_length, f"use a number of tokens from 1 to {MAX_CONTEXT:,}")
    if not 1 <= batch_size <= MAX_BATCH:
        raise SpecError("batch_size", batch_size, f"use a batch size from 1 to {MAX_BATCH}")


def estimate(spec: LoadSpec, context_length: int = 2048, batch_size: int = 1, config=None,
             with_fixes: bool = True) -> FitReport:
    check_sizes(context_length, batch_size)
    config = config if config is not None else source.load_config(spec)
    try:
        placed: PlacementPlan = plan(spec, config=config)
    except BudgetTooSmallError as error:
        fixes = suggest_fixes(spec, context_length, batch_size, config) if with_fixes else []
        return FitReport(model=spec.model, quantization=spec.quant.mode, context_length=context_length,
                         batch_size=batch_size, devices=(), offloaded=(), fixes=tuple(fixes), problem=str(error))
    layers_on: dict[Device, int] = {}
    for module, device in placed.device_map.items():
        if ".layers." in f".{module}." or module.endswith("layers"):
            layers_on[device] = layers_on.get(device, 0) + _layer_count(module, config)
    if not layers_on:  # the whole model on one device
        layers_on = {next(iter(placed.bytes_per_device)): config.num_hidden_layers}
    linear_numel, outs = _quantized_linears(config)
    overhead = quant_overhead(linear_numel, spec.quant, outs) if spec.quant.enabled else 0
    kv_total = kv_cache_bytes(config, context_length, batch_size, placed.dtype)
    first = min(placed.bytes_per_device, key=_order)
    budget = dict(placed.budget)
    devices = []
    for device, weights in sorted(placed.bytes_per_device.items(), key=lambda kv: _order(kv[0])):
        share = layers_on.get(device, 0) / config.num_hidden_layers
        devices.append(DeviceFit(
            device=device, weights=weights + int(overhead * share), kv_cache=int(kv_total * share),
            activations=activation_bytes(config, context_length, batch_size, placed.dtype) if device == first else 0,
            budget=budget.get(device)))
    report = FitReport(model=placed.model, quantization=spec.quant.mode, context_length=context_length,
                       batch_size=batch_size, devices=tuple(devices), offloaded=tuple(placed.offloaded), fixes=())
    if with_fixes and (not report.fits or report.offloaded):
        report = replace(report, fixes=tuple(suggest_fixes(spec, context_length, batch_size, config)))
    return report


def _layer_count(module: str, config) -> int:
    return 1 if module.rsplit(".", 1)[-1].isdigit() else config.num_hidden_layers


def _order(device: Device) -> tuple[int, int]:
    return (0, device) if isinstance(device, int) else (1, 0 if device == "cpu" else 1)


def suggest_fixes(spec: LoadSpec, context: int, batch: int, config, limit: int = 3) -> list[Fix]:
    """Up to `limit` changes that fit, smallest first: a shorter context, 4-bit, both, a CPU share,
    and, always last, the budget that this exact request needs."""
    shorter = [c for c in (context // 2, context // 4, context // 8) if c >= 256]
    nf4 = spec.with_(quant=replace(spec.quant, mode="nf4", fp32_cpu_offload=False))
    candidates: list[Fix] = []
    if spec.quant.mode == "int8" and not spec.quant.fp32_cpu_offload:
        candidates.append(Fix("Enable fp32 CPU offload (int8 modules that don't fit run on the CPU)",
                              spec.with_(quant=replace(spec.quant, fp32_cpu_offload=True)), context))
    candidates += [Fix(f"Shorten the context to {c} tokens", spec, c) for c in shorter]
    if spec.quant.bits != 4:
        candidates.append(Fix("Quantize to 4-bit NF4", nf4, context))
        candidates += [Fix(f"Quantize to 4-bit NF4 and shorten the context to {c} tokens", nf4, c) for c in shorter]
    budget = dict(spec.max_memory)
    if budget and "cpu" not in budget and spec.quant.bits != 4:  # 4-bit + CPU offload fails (see loading.py)
        candidates.append(Fix("Give the CPU a share (cpu=16GB) for what does not fit on the GPU",
                              spec.with_(max_memory=tuple({**budget, "cpu": 16 * 10**9}.items()),
                                         quant=replace(spec.quant, fp32_cpu_offload=spec.quant.enabled)), context))
    working: list[Fix] = []
    for fix in candidates:
        try:
            if estimate(fix.spec, fix.context_length, batch, config=config, with_fixes=False).fits:
                working.append(fix)
        except BudgetTooSmallError:
            continue
        if len(working) == limit:
            break
    return working
