"""Kernel-backed forwards on a loaded model's layers: installed as instance attributes, removed exactly.

A `forward` set on a module instance wins over its class's, so a layer can compute through a kernel
without any change to its parameters, buffers, class or place in the tree: `str(model)` and the
state dict stay bitwise equal, and deleting the attribute restores the original. The closures hold
views of the tensors the layers store: no copies, no extra GPU memory (the 4-bit decode table is a
kernel constant).

- LLM.int8() layers (`Linear8bitLt`) always run as W8A16 (core.kernels.w8a16), at every batch size.
- 4-bit layers (`Linear4bit`) and 16-bit layers run through our kernels for 1 row, and for 2-16 rows
  (a batched decode step: flattened token rows [N, K] or sequences [B, 1, K] alike), wherever one
  measurement per shape (core.kernels.select) found them faster than bitsandbytes' kernel or cuBLAS;
  prefill (more rows) keeps the library.
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
from core.kernels.layers import FEW_ROWS, Layer, find_layers


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
    always = [layer for layer in layers.values() if layer.always]
    for layer in always:
        forwards[layer.module] = _single_forward(layer, True, True, reference)
    if always:
        notes.append(f"{len(always)} LLM.int8() layers run as W8A16 (weight-only int8, Triton)")
    groups: dict[tuple, list[Layer]] = defaultdict(list)
    for layer in layers.values():
        if not layer.always:
            groups[layer.key].append(layer)
    for members in groups.values():
        measured = members[0].measured_rows
        if reference:
            wins = {rows: True for rows in measured}
        else:
            decisions = {rows: _measure(members, rows, timer) for rows in measured}
            notes.append(f"{len(members)}x " + "; ".join(d.describe() for d in decisions.values()))
            wins = {rows: d.ours for rows, d in decisions.items()}
        one = wins.get(1, False)
        few = [rows for rows in wins if rows > 1]
        few_wins = bool(few) and all(wins[rows] for rows in few)  # ours flat over 2-16 rows, theirs rising
        if one or few_wins:
            for layer in members:
                forwards[layer.module] = _single_forward(layer, one, few_wins, reference)
    for module, forward in forwards.items():
        module.forward = forward
    if not reference:
        fused = fusion.install(model, layers, timer)
        forwards.update(fused.forwards)
        notes += fused.notes
    return Installed(tuple(forwards), tuple(notes))


def _single_forward(layer: Layer, one_row: bool, few_rows: bool, reference: bool) -> Callable:
    """Our kernel for 1 row (and for 2-16 rows when `few_rows`), the layer's own forward otherwise;
    `always` layers (LLM.int8()) take the kernel at every size (W8A16: no host syncs, one numerics)."""
    module = layer.module
    original = type(module).forward
    compute = layer.reference if reference else layer.kernel
    always = layer.always

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
    return select.decide(key, label, ours, theirs, timer, first.library)
