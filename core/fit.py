"""Will it fit, before loading: weights, KV cache and activation headroom per device, and the smallest fix.

Weights come from the placement plan (quantized layers at their packed size, embeddings, lm_head
and norms at their real 16/32-bit size), plus what transformers' placement sizes leave out, counted
per device on the same meta model (core.placement): bitsandbytes' scales beside the packed weights
(4-bit: one fp32 absmax per block of 64 weights, or a uint8 one plus a small fp32 table with double
quantization; int8: one fp32 scale per output row), and the keep-in-fp32 modules transformers
upcasts after placing. The KV cache is 2 × decoder layers × kv_heads × head_dim × context × batch ×
bytes, on the devices that hold the decoder layers; for an encoder-decoder the context is the input
(cross-attention) plus the answer (self-attention), for a causal model the prompt plus the answer
(core.families). Activation headroom is the largest transient of one forward pass over the context
(the MLP's intermediate tensors and the last-position logits; for an encoder-decoder also the
encoder's output and T5's position bias), on the first device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from core import families, source
from core.errors import BudgetTooSmallError, SpecError
from core.placement import PlacementPlan, device_label, device_order, plan
from core.spec import Device, LoadSpec


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
    layers_on = placed.kv_layers or {next(iter(placed.bytes_per_device)): 1}
    layers = sum(layers_on.values())
    kv_total = families.kv_cache_bytes(config, context_length, batch_size, placed.dtype)
    activations = families.activation_bytes(config, context_length, batch_size, placed.dtype)
    first = min(placed.bytes_per_device, key=device_order)
    budget = dict(placed.budget)
    devices = []
    for device, weights in sorted(placed.bytes_per_device.items(), key=lambda kv: device_order(kv[0])):
        extra = placed.quant_state_bytes.get(device, 0) + placed.upcast_bytes.get(device, 0)
        devices.append(DeviceFit(
            device=device, weights=weights + extra, kv_cache=kv_total * layers_on.get(device, 0) // layers,
            activations=activations if device == first else 0, budget=budget.get(device)))
    report = FitReport(model=placed.model, quantization=spec.quant.mode, context_length=context_length,
                       batch_size=batch_size, devices=tuple(devices), offloaded=tuple(placed.offloaded), fixes=())
    if with_fixes and (not report.fits or report.offloaded):
        report = replace(report, fixes=tuple(suggest_fixes(spec, context_length, batch_size, config, report=report)))
    return report


def move_layers(spec: LoadSpec, report: FitReport, context: int, batch: int, config) -> Fix | None:
    """When a budgeted GPU is short while another has room: layers moved to the other GPU, every budget kept.

    A budget here is a device's whole memory (weights, KV cache, activations), while the planner fills a GPU's
    budget with weights; so layers move by asking the planner for a balanced split, or, when even that leaves the
    short GPU too full (its first module is large, as the embeddings of a small model are), by putting the whole
    model on the GPU with the most room."""
    short = [d.device for d in report.devices if isinstance(d.device, int) and d.shortfall]
    roomy = [d for d in report.devices if isinstance(d.device, int) and d.budget and d.total < d.budget]
    if not short or not roomy:
        return None
    target = max(roomy, key=lambda d: d.budget - d.total).device
    candidates = []
    if spec.device_map != "balanced":
        candidates.append(Fix(f"Move layers to {device_label(target)}: spread them evenly over the GPUs (device map "
                              "balanced)", spec.with_(device_map="balanced"), context))
    candidates.append(Fix(f"Put the whole model on {device_label(target)} (device map cuda:{target}), which has room "
                          "for it", spec.with_(device_map=(("", target),)), context))
    for fix in candidates:
        try:
            moved = estimate(fix.spec, context, batch, config=config, with_fixes=False)
        except BudgetTooSmallError:
            continue
        if moved.fits and not moved.offloaded:
            return fix
    return None


def suggest_fixes(spec: LoadSpec, context: int, batch: int, config, limit: int = 3,
                  report: FitReport | None = None) -> list[Fix]:
    """Up to `limit` changes that fit, smallest first: layers moved to a GPU with room, a shorter context, 4-bit,
    both, a CPU share, and, always last, the budget that this exact request needs."""
    shorter = [c for c in (context // 2, context // 4, context // 8) if c >= 256]
    nf4 = spec.with_(quant=replace(spec.quant, mode="nf4", fp32_cpu_offload=False))
    candidates: list[Fix] = []
    moved = move_layers(spec, report, context, batch, config) if report is not None else None
    if moved is not None:
        candidates.append(moved)
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
