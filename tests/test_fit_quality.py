"""Fit estimates against measured memory, dispatch explanations, push guardrails, and the quality check."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import QUESTION, quant_state_bytes
from core import card, fit, generation, hub, quality
from core.engine import Engine
from core.errors import SaveError
from core.spec import GenerationSpec, LoadSpec, QuantSpec, parse_max_memory


@pytest.mark.parametrize("mode", ["none", "int8", "fp4", "nf4"])
def test_estimate_matches_measured_weights_and_kv_cache(loaded_models, mode):
    loaded = loaded_models(mode)
    estimate = fit.estimate(LoadSpec(quant=QuantSpec(mode=mode)), context_length=64)
    assert estimate.fits and estimate.verdict() == "fits" and len(estimate.devices) == 1
    device = estimate.devices[0]
    measured = loaded.report.footprint_bytes
    assert abs(device.weights - measured) / measured < 0.10  # the footprint transformers reports
    assert abs(device.weights - (measured + quant_state_bytes(loaded))) / measured < 0.005
    inputs = generation.build_inputs(loaded, [QUESTION], GenerationSpec())
    new = 64 - inputs["input_ids"].shape[1]
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                    return_dict_in_generate=True)
    cache = out.past_key_values
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv == pytest.approx(device.kv_cache * 63 / 64, rel=0.02)  # the cache holds context - 1 positions


def test_does_not_fit_names_the_device_and_the_smallest_fixes(checkpoint):
    spec = LoadSpec(max_memory=parse_max_memory("0=300MB"))
    report = fit.estimate(spec, context_length=8192)
    assert not report.fits and report.verdict().startswith("does not fit: needs") and "more on cuda:0" in \
        report.verdict()
    assert report.fixes and all(fit.estimate(f.spec, f.context_length).fits for f in report.fixes)
    assert report.fixes[0].spec.quant.mode == "nf4"


def test_int8_dispatch_is_explained_with_one_action_fixes(checkpoint):
    spec = LoadSpec(quant=QuantSpec(mode="int8"), max_memory=parse_max_memory("0=100MB, cpu=8GB"))
    report = fit.estimate(spec, context_length=512)
    assert not report.fits and "fp32 CPU offload" in report.verdict()
    labels = [f.label for f in report.fixes]
    assert labels[0].startswith("Enable fp32 CPU offload")
    offloaded = fit.estimate(report.fixes[0].spec, context_length=512)
    assert offloaded.fits and offloaded.offloaded  # fits, and says which modules run on the CPU


def test_push_guardrails_refuse_unsafe_checkpoints(loaded_models, tmp_path):
    loaded = loaded_models("nf4")
    remote = dataclasses.replace(loaded, spec=loaded.spec.with_(trust_remote_code=True))
    with pytest.raises(SaveError, match="remote code"):
        hub.save(remote, tmp_path / "remote")
    on_disk = dataclasses.replace(loaded, report=dataclasses.replace(
        loaded.report, device_map={"model.embed_tokens": 0, "model.layers.0": "disk"}))
    with pytest.raises(SaveError, match="offloaded to disk"):
        hub.save(on_disk, tmp_path / "disk")
    assert not (tmp_path / "remote").exists() and not (tmp_path / "disk").exists()


def test_quality_check_against_full_precision_and_in_the_card(checkpoint, tmp_path):
    engine = Engine()
    engine.load(LoadSpec(quant=QuantSpec(mode="nf4")))
    report = quality.check(engine)
    assert engine.current.spec.quant.mode == "nf4"  # the user's model is back after the reference
    # A 135M model loses much in 4-bit (README: perplexity 8.8 -> 29, agreement 48%): check direction and range.
    assert report.tokens > 300
    assert 1 < report.reference_perplexity < report.perplexity < 10 * report.reference_perplexity
    assert 0.3 < report.agreement < 1.0
    engine.load(LoadSpec())
    same = quality.check(engine)
    assert same.agreement == 1.0 and same.perplexity == pytest.approx(same.reference_perplexity)
    engine.load(LoadSpec(quant=QuantSpec(mode="nf4")))
    quality.check(engine)
    hub.save(engine.current, tmp_path / "card", card.measure(engine.current))
    written = (tmp_path / "card" / "README.md").read_text()
    assert "next-token agreement with full precision" in written and "**Answer:**" in written and "Paris" in written
