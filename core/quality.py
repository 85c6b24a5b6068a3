"""Quality check: perplexity and next-token agreement of a quantized model against full precision.

Both are computed on `core/data/sample.txt` (public domain) in one forward pass each, with teacher
forcing. Agreement is the share of positions where the quantized model's most likely next token
equals the full-precision model's. The reference (full precision, same model and revision) is
computed once per model and cached in memory; on a GPU it is loaded in turn with the user's model,
never beside it.

For an encoder-decoder the encoder reads the sample's first half and the decoder is scored on the
second half (its labels shifted right, as in training). Continuing prose is not what a text-to-text
model was trained for, so its absolute perplexity says little about the model; but the check
exists to compare a quantized model with the same model in full precision on the same targets, and
the ratio of the two perplexities and the agreement measure exactly what quantization changed. So
the figures are given, with the method beside them, rather than refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from core.engine import Engine
from core.loading import LoadedModel
from core.spec import OnProgress, QuantSpec

SAMPLE = Path(__file__).with_name("data") / "sample.txt"


@dataclass(frozen=True)
class Scores:
    perplexity: float
    predictions: tuple[int, ...]  # argmax next token at each position
    tokens: int


@dataclass(frozen=True)
class QualityReport:
    quantization: str
    perplexity: float
    reference_perplexity: float
    agreement: float  # share of next-token predictions equal to full precision
    tokens: int
    method: str  # what was scored, in words

    def as_card_facts(self) -> dict[str, float]:
        return {"perplexity (sample)": self.perplexity, "perplexity, full precision": self.reference_perplexity,
                "next-token agreement with full precision": self.agreement}


def score(loaded: LoadedModel, text: str | None = None) -> Scores:
    text = text if text is not None else SAMPLE.read_text()
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids.to(loaded.input_device)
    with torch.inference_mode():
        logits, targets = _teacher_forced(loaded, ids)
    log_probs = torch.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(1, targets[:, None]).mean().item()
    return Scores(perplexity=math.exp(nll), predictions=tuple(logits.argmax(-1).tolist()),
                  tokens=int(targets.numel()))


def _teacher_forced(loaded: LoadedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits, target ids), one row per scored position."""
    if loaded.family.is_encoder_decoder:
        half = ids.shape[1] // 2
        source, target = ids[:, :half], ids[:, half:]
        return loaded.model(input_ids=source, labels=target).logits.float()[0], target[0]
    return loaded.model(ids).logits.float()[0, :-1], ids[0, 1:]


def method(loaded: LoadedModel) -> str:
    if loaded.family.is_encoder_decoder:
        return ("decoder perplexity with teacher forcing: the encoder reads the sample's first half, the decoder is "
                "scored on its second half (a text-to-text model was not trained to continue prose, so compare the "
                "two columns rather than read the figure alone)")
    return "next-token perplexity over the sample"


_references: dict[tuple, Scores] = {}


def reference(engine: Engine, progress: OnProgress | None = None) -> Scores:
    """Full-precision scores for the loaded model's weights; loads that variant in turn if needed."""
    progress = progress or (lambda fraction, message: None)
    current = engine.current.spec
    key = (current.model, current.revision, current.dtype)
    if key not in _references:
        if not current.quant.enabled:
            _references[key] = score(engine.current)
        else:
            progress(0.1, "Loading the full-precision reference")
            try:
                _references[key] = score(engine.load(current.with_(quant=QuantSpec(), fast_path=False)))
            finally:
                progress(0.6, "Loading your model back")
                engine.load(current)
    return _references[key]


def check(engine: Engine, progress: OnProgress | None = None) -> QualityReport:
    ref = reference(engine, progress)
    loaded = engine.current
    mine = score(loaded)
    same = sum(a == b for a, b in zip(ref.predictions, mine.predictions))
    report = QualityReport(quantization=loaded.spec.quant.mode, perplexity=mine.perplexity,
                           reference_perplexity=ref.perplexity, agreement=same / max(1, len(ref.predictions)),
                           tokens=mine.tokens, method=method(loaded))
    loaded.facts = replace(loaded.facts, quality=report)
    return report
