"""Compare: one prompt through the current model in full precision and in each quantized variant that fits.

Variants load one after another in the engine (one model in memory at a time), each answering the
same greedy prompt; agreement is the share of generated token positions equal to the full-precision
answer. The user's model is loaded back at the end, fast path included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from core import generation
from core.engine import Engine
from core.errors import EngineError
from core.spec import GenerationSpec, QuantSpec

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class VariantResult:
    quantization: str
    text: str
    decode_tokens_per_s: float
    footprint_bytes: int
    agreement: float | None  # share of token positions equal to the full-precision answer
    error: str | None = None


def token_agreement(reference: Sequence[int], other: Sequence[int]) -> float:
    """Positions where both have the same token, over the longer length (a shorter answer disagrees)."""
    length = max(len(reference), len(other))
    if length == 0:
        return 1.0
    return sum(a == b for a, b in zip(reference, other)) / length


def compare(engine: Engine, prompt: str, modes: Sequence[str] = ("none", "int8", "fp4", "nf4"),
            max_new_tokens: int = 48, progress: Progress | None = None) -> list[VariantResult]:
    progress = progress or (lambda fraction, message: None)
    original = engine.current.spec
    spec = GenerationSpec(greedy=True, max_new_tokens=max_new_tokens)
    ordered = ["none"] + [m for m in modes if m != "none"]  # the reference first
    results: list[VariantResult] = []
    reference: tuple[int, ...] | None = None
    try:
        for index, mode in enumerate(ordered):
            progress(index / len(ordered), f"Loading the {mode} variant")
            variant = replace(original, quant=replace(original.quant, mode=mode) if mode != "none" else QuantSpec(),
                              fast_path=False)
            try:
                loaded = engine.load(variant)
            except EngineError as error:
                results.append(VariantResult(mode, "", 0.0, 0, None, error=str(error)))
                continue
            answer = generation.generate(loaded, [prompt], spec)
            ids = answer.token_ids[0]
            if mode == "none":
                reference = ids
            results.append(VariantResult(
                quantization=mode, text=answer.texts[0], decode_tokens_per_s=answer.metrics.decode_tokens_per_s,
                footprint_bytes=loaded.report.footprint_bytes,
                agreement=token_agreement(reference, ids) if reference is not None else None))
    finally:
        progress(0.95, "Loading your model back")
        engine.load(original)
    return results
