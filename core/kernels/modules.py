"""Kernel-backed forwards on a loaded model's layers: installed as instance attributes, removed exactly.

A `forward` set on a module instance wins over its class's, so a layer can compute through a kernel
without any change to its parameters, buffers, class or place in the tree: `str(model)` and the
state dict stay bitwise equal, and deleting the attribute restores the original. The closures hold
views of the tensors the layers store: no copies, no extra GPU memory (the 4-bit decode table is a
kernel constant).

- LLM.int8() layers (`Linear8bitLt`) always run as W8A16 (core.kernels.w8a16), at every batch size.
- 4-bit layers (`Linear4bit`) run through core.kernels.w4a16 for 1 row and for 2-16 rows wherever one
  measurement per shape (core.kernels.select) found it faster than bitsandbytes' kernel; prefill (more
  rows) keeps bitsandbytes' dequantize-then-cuBLAS.
- 16-bit layers keep cuBLAS, except one-token GEMVs measured faster in core.kernels.gemv16.
- For one token, a Llama attention's q/k/v and an MLP's gate/up (with SiLU) can each be one launch
  (core.kernels.fusion), where measured faster than the separate layers.
- `reference=True` installs the kernels' PyTorch reference instead (same math; CPU quality check).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from core.kernels import fusion, select
from core.kernels.layers import Layer, find_layers

FEW_ROWS = 16  # batch sizes the skinny tl.dot kernels serve; more rows are prefill


@dataclass(frozen=True)
class Installed:
    modules: tuple[torch.nn.Module, ...]
    notes: tuple[str, ...]

    def summary(self) -> str:
        return "; ".join(self.notes)

    def remove(self) -> None:
        for module in self.modules:
            module.__dict__.pop("forward", None)


def install(model, reference: bool = False, timer=None) -> Installed:
    """Installs kernel-backed forwards on every supported layer; `timer` (default: CUDA-graph timing)
    measures the choices."""
    timer = timer or select.graph_time_us
    layers = find_layers(model)
    forwards: dict[torch.nn.Module, Callable] = {}
    notes: list[str] = []
    int8 = [layer for layer in layers.values() if layer.kind == "int8"]
    for layer in int8:
        forwards[layer.module] = _single_forward(layer, True, True, reference)
    if int8:
        notes.append(f"{len(int8)} LLM.int8() layers run as W8A16 (weight-only int8, Triton)")
    groups: dict[tuple, list[Layer]] = defaultdict(list)
    for layer in layers.values():
        if layer.kind != "int8":
            groups[layer.key].append(layer)
    for members in groups.values():
        if reference:
            one, few = True, members[0].kind == "4bit"
        else:
            decisions = [_measure(members, rows, timer) for rows in ((1, 8) if members[0].kind == "4bit" else (1,))]
            notes.append(f"{len(members)}x " + "; ".join(d.describe() for d in decisions))
            one, few = decisions[0].ours, len(decisions) > 1 and decisions[1].ours
        if one or few:
            for layer in members:
                forwards[layer.module] = _single_forward(layer, one, few, reference)
    for module, forward in forwards.items():
        module.forward = forward
    if not reference:
        fused = fusion.install(model, layers, timer)
        forwards.update(fused.forwards)
        notes += fused.notes
    return Installed(tuple(forwards), tuple(notes))


def _single_forward(layer: Layer, one_row: bool, few_rows: bool, reference: bool) -> Callable:
    """Our kernel for 1 row (and for 2-16 rows when `few_rows`), the layer's own forward otherwise;
    LLM.int8() layers always take the kernel (W8A16 at every size: no host syncs, one numerics)."""
    module = layer.module
    original = type(module).forward
    compute = layer.reference if reference else layer.kernel
    always = layer.kind == "int8"

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if always or (rows == 1 and one_row) or (1 < rows <= FEW_ROWS and few_rows):
            return compute(x)
        return original(module, x)

    return forward


def _measure(members: list[Layer], rows: int, timer) -> select.Decision:
    first = members[0]
    x = torch.randn(rows, first.in_features, device=first.device, dtype=first.compute_dtype)
    label = f"{first.label} {first.out_features}x{first.in_features}, {rows} row{'s' if rows > 1 else ''}"
    key = (first.device_name, first.key, rows, len(members))
    ours = [lambda layer=layer: layer.kernel(x) for layer in members]
    theirs = [lambda layer=layer: type(layer.module).forward(layer.module, x) for layer in members]
    who = "bitsandbytes'" if first.kind == "4bit" else "cuBLAS'"
    return select.decide(key, label, ours, theirs, timer, who)
