"""Compare: one prompt through the current model in full precision and in each quantized variant that fits.

Variants load one after another in the engine (one model in memory at a time), each answering the
same greedy prompt after a short warm-up generation (the first forward of a freshly loaded model
is slow: on the CPU the first variant measured 7.6 tok/s cold against 18.7 for the next). Agreement
is the share of token positions equal to the full-precision answer over the length both answers
have; the table says over how many tokens. The user's model is loaded back at the end, fast path
included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from core import generation
from core.engine import Engine
from core.errors import EngineError
from core.spec import GenerationSpec, OnProgress, QuantSpec



@dataclass(frozen=True)
class VariantResult:
    quantization: str
    text: str
    decode_tokens_per_s: float
    footprint_bytes: int
    agreement: float | None  # share of token positions equal to the full-precision answer
    compared_tokens: int = 0  # over how many tokens: the length both answers have
    error: str | None = None
    answer_tokens: int = 0  # how long this answer is


def token_agreement(reference: Sequence[int], other: Sequence[int]) -> tuple[float, int]:
    """Positions where both have the same token, over the length both have; and that length."""
    length = min(len(reference), len(other))
    if length == 0:
        return (1.0 if len(reference) == len(other) else 0.0), 0
    return sum(a == b for a, b in zip(reference, other)) / length, length


def compare(engine: Engine, prompt: str, modes: Sequence[str] = ("none", "int8", "fp4", "nf4"),
            max_new_tokens: int = 48, progress: OnProgress | None = None) -> list[VariantResult]:
    progress = progress or (lambda fraction, message: None)
    original = engine.current.spec
    spec = GenerationSpec(greedy=True, max_new_tokens=max_new_tokens)
    ordered = ["none"] + [m for m in dict.fromkeys(modes) if m != "none"]  # the reference first, each mode once
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
            progress((index + 0.5) / len(ordered), f"Answering with the {mode} variant")
            generation.generate(loaded, [prompt], GenerationSpec(greedy=True, max_new_tokens=2))  # warm-up
            answer = generation.generate(loaded, [prompt], spec)
            ids = answer.token_ids[0]
            if mode == "none":
                reference = ids
            agreement, compared = token_agreement(reference, ids) if reference is not None else (None, 0)
            results.append(VariantResult(
                quantization=mode, text=answer.texts[0], decode_tokens_per_s=answer.metrics.decode_tokens_per_s,
                footprint_bytes=loaded.report.footprint_bytes, agreement=agreement, compared_tokens=compared,
                answer_tokens=len(ids)))
    finally:
        progress(0.95, "Loading your model back")
        engine.load(original)
    return results
