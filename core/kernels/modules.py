"""Kernel-backed forwards on a loaded model's layers: installed as instance attributes, removed exactly.

A `forward` set on a module instance wins over its class's, so a layer can compute through a kernel
without any change to its class or place in the tree, and deleting the attribute restores the
original. The closures hold views of the tensors the layers store: no copies, no extra GPU memory
(the 4-bit decode table is a kernel constant). The one change to stored tensors: 4-bit layers that
move to the tensor-core kernel have their bytes and absmax permuted in place (`Installed.shuffled`),
and `Installed.remove` permutes them back, so the state dict is bitwise equal again.

- LLM.int8() layers (`Linear8bitLt`) always run as W8A16 (core.kernels.w8a16), at every batch size.
- 4-bit layers (`Linear4bit`) and 16-bit layers run through our kernels for 1 row, and for 2-16 rows
  (a batched decode step: flattened token rows [N, K] or sequences [B, 1, K] alike), wherever one
  measurement per shape (core.kernels.select) found them faster than bitsandbytes' kernel or cuBLAS;
  prefill (more rows) keeps the library.
- On a GPU with NVRTC, the 4-bit layers move together to the tensor-core kernel (core.kernels.w4mma)
  for 1-16 rows where their per-step total measured faster at 1 and at 16 rows than what was installed;
  their prefill then dequantizes an unshuffled copy with bitsandbytes.
- For one token, a Llama attention's q/k/v and an MLP's gate/up (with SiLU) can each be one launch
  (core.kernels.fusion), where measured faster than the separate layers.
- `reference=True` installs the kernels' PyTorch reference instead (same math; CPU quality check).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from core.kernels import fusion, select, w4mma
from core.kernels.layers import FEW_ROWS, FourBitLayer, Layer, ShuffledFourBitLayer, find_layers


@dataclass(frozen=True)
class Installed:
    modules: tuple[torch.nn.Module, ...]
    notes: tuple[str, ...]
    shuffled: tuple[ShuffledFourBitLayer, ...] = ()  # 4-bit layers whose bytes are in the tensor-core layout

    def summary(self) -> str:
        return "; ".join(self.notes)

    def remove(self) -> None:
        for module in self.modules:
            module.__dict__.pop("forward", None)
        for layer in self.shuffled:  # the stored bytes and absmax back, exactly
            layer.unshuffle()


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
    shuffled: list[ShuffledFourBitLayer] = []
    before: dict[torch.nn.Module, Callable | None] = {}
    try:
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
        four_bit = [members for members in groups.values()
                    if isinstance(members[0], FourBitLayer) and all(m.tensor_cores() for m in members)]
        if four_bit and not reference:
            found, found_notes = _tensor_cores(four_bit, forwards, timer)
            notes += found_notes
            names = {layer.module: name for name, layer in layers.items()}
            for layer in found:
                forwards[layer.module] = _single_forward(layer, True, True, False)
                layers[names[layer.module]] = layer
            shuffled += found
        for module, forward in forwards.items():
            before[module] = module.__dict__.get("forward")
            module.forward = forward
        if not reference:
            fused = fusion.install(model, layers, timer)
            forwards.update(fused.forwards)
            notes += fused.notes
    except BaseException:  # the layers as they were: their forwards, and their bytes unshuffled
        for module, forward in before.items():
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
        for layer in shuffled:
            layer.unshuffle()
        raise
    return Installed(tuple(forwards), tuple(notes), tuple(shuffled))


def _single_forward(layer: Layer, one_row: bool, few_rows: bool, reference: bool) -> Callable:
    """Our kernel for 1 row (and for 2-16 rows when `few_rows`), the layer's own forward otherwise;
    `always` layers take the kernel at every size: LLM.int8() (W8A16: no host syncs, one numerics), and a
    4-bit layer whose bytes were shuffled (it routes prefill itself)."""
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


TENSOR_CORE_VARIANTS = ((8, 1), (8, 4), (16, 2), (16, 4))  # (warps, K blocks loaded ahead), decode_sweep.py's best


def _tensor_cores(groups: list[list[FourBitLayer]], forwards: dict, timer) -> tuple[list[ShuffledFourBitLayer],
                                                                                    list[str]]:
    """Moves the 4-bit layers to the tensor-core kernel together, or leaves them all: shuffles their bytes, times
    each shape at 1 and 16 rows (the best of a few variants) against what is installed (timing does not depend
    on the bytes' values), and keeps the shuffle where the layers' total is faster at both row counts. All
    together because one launch serves a layer's q/k/v (and gate/up) only when all of them are shuffled: an
    8B model's k/v alone lose 0.2 µs at one row where the fused q/k/v gains 4-7 µs. Returns the shuffled layers
    (none when the bytes were restored) and notes."""
    shuffled = [[layer.shuffled() for layer in members] for members in groups]
    moved: list[ShuffledFourBitLayer] = []
    try:
        totals, notes, chosen = {1: [0.0, 0.0], FEW_ROWS: [0.0, 0.0]}, [], []
        for members, layers in zip(groups, shuffled):
            first, verdicts, variants = members[0], [], {}
            for rows in (1, FEW_ROWS):
                x = torch.randn(rows, first.in_features, device=first.device, dtype=first.compute_dtype)
                times = {variant: timer([lambda layer=layer, v=variant: w4mma.apply(x, layer.packed, v)
                                         for layer in layers]) for variant in TENSOR_CORE_VARIANTS}
                variants[rows] = min(times, key=times.get)
                now = timer([lambda f=forwards.get(m.module) or functools.partial(type(m.module).forward, m.module):
                             f(x) for m in members])
                verdicts.append(select.Decision(f"{rows} row{'s' if rows > 1 else ''}", times[variants[rows]], now,
                                                "as installed"))
                totals[rows][0] += times[variants[rows]] * len(members)
                totals[rows][1] += now * len(members)
            chosen.append((variants[1], variants[FEW_ROWS]))
            notes.append(f"{len(members)}x {first.label} {first.out_features}x{first.in_features} on tensor cores: "
                         + "; ".join(d.describe() for d in verdicts))
        wins = all(ours < theirs for ours, theirs in totals.values())
        summary = (f"4-bit layers {'moved' if wins else 'not moved'} to the tensor-core layout (all of them, per "
                   "step: " + "; ".join(f"{rows} row{'s' if rows > 1 else ''} {ours:.0f} µs against {theirs:.0f}"
                                        for rows, (ours, theirs) in totals.items()) + ")")
        if wins:
            moved = [replace(layer, variants=variants) for layers, variants in zip(shuffled, chosen)
                     for layer in layers]
        return moved, [summary, *notes]
    except Exception as failure:  # e.g. NVRTC cannot build for this driver: the layers stay as installed
        return [], [f"4-bit layers not moved to tensor cores: {type(failure).__name__}: {str(failure)[:200]}"]
    finally:
        if not moved:  # lost, failed or interrupted: the stored bytes back
            for layer in (layer for layers in shuffled for layer in layers):
                layer.unshuffle()


def _measure(members: list[Layer], rows: int, timer) -> select.Decision:
    first = members[0]
    x = torch.randn(rows, first.in_features, device=first.device, dtype=first.compute_dtype)
    label = f"{first.label} {first.out_features}x{first.in_features}, {rows} row{'s' if rows > 1 else ''}"
    key = (first.device_name, first.key, rows, len(members))
    ours = [lambda layer=layer: layer.kernel(x) for layer in members]
    theirs = [lambda layer=layer: type(layer.module).forward(layer.module, x) for layer in members]
    return select.decide(key, label, ours, theirs, timer, first.library)
