"""Core engine on the CPU with the real embedded model: loading, fast path, save/reload, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import QUESTION, ROOT, canonical_snapshot, run_cli, subprocess_env
from core import fastpath, generation
from core.engine import Engine
from core.errors import BudgetTooSmallError, EnvironmentNotSupportedError, OutOfMemoryError, SpecError
from core.spec import GenerationSpec, LoadSpec, QuantSpec, parse_max_memory, parse_model, parse_size

GREEDY = GenerationSpec(greedy=True, max_new_tokens=12)


@pytest.mark.parametrize("mode", ["none", "int8", "fp4", "nf4"])
def test_each_quantization_answers_paris(loaded_models, mode):
    loaded = loaded_models(mode)
    result = generation.generate(loaded, [QUESTION], GREEDY)
    assert "Paris" in result.texts[0]
    assert result.metrics.new_tokens > 1 and result.metrics.decode_tokens_per_s > 0
    assert result.metrics.ttft_s > 0 and result.metrics.peak_memory_bytes > 0


def test_footprints_are_ordered_fp32_int8_4bit(loaded_models):
    sizes = {m: loaded_models(m).report.footprint_bytes for m in ("none", "int8", "nf4", "fp4")}
    assert sizes["none"] > sizes["int8"] > sizes["nf4"]
    assert sizes["nf4"] == sizes["fp4"]
    assert "4-bit NF4" in loaded_models("nf4").report.quantization


@pytest.mark.parametrize("mode", ["none", "nf4"])
def test_fast_path_reverse_is_bitwise_exact(loaded_models, mode):
    loaded = loaded_models(mode)
    tree, config, state = canonical_snapshot(loaded)
    before = generation.generate(loaded, [QUESTION], GREEDY).token_ids
    # Force the GPU recipe (eager attention + static cache) so the change is real on the CPU too.
    on = fastpath.enable(loaded, fastpath.FastPathChoice("eager", "static", "test"))
    assert on.enabled and on.attn_implementation == "eager" and on.cache_implementation == "static"
    assert loaded.model.config._attn_implementation == "eager"
    assert generation.generate(loaded, [QUESTION], GREEDY).token_ids == before
    off = fastpath.reverse(loaded)
    assert not off.enabled and off.attn_implementation == "sdpa" and off.cache_implementation == "dynamic"
    tree2, config2, state2 = canonical_snapshot(loaded)
    assert tree2 == tree and config2 == config
    assert state2.keys() == state.keys()
    assert all(torch.equal(state[k], state2[k]) and state[k].dtype == state2[k].dtype for k in state)


def test_automatic_fast_path_on_cpu_explains_its_choice(loaded_models):
    loaded = loaded_models("none")
    state = fastpath.enable(loaded)
    try:
        assert state.enabled and "CPU" in state.reason and not state.compiled
        assert "Fast path on" in state.summary()
    finally:
        fastpath.reverse(loaded)


# ----------------------------------------------------------------------------- placement


SMOL_LAYER_BF16 = (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536) * 2 + 2 * 576 * 2  # 7,080,192
SMOL_LAYER_NF4 = (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536) // 2 + 2 * 576 * 2  # 1,771,776
SMOL_EMBED_BF16 = 49152 * 576 * 2  # tied with lm_head, counted once; bitsandbytes leaves it in 16-bit


@pytest.mark.parametrize("mode,layer", [("none", SMOL_LAYER_BF16), ("nf4", SMOL_LAYER_NF4)])
def test_two_gpu_plan_matches_hand_computed_sizes(checkpoint, mode, layer):
    from core.placement import plan

    result = plan(LoadSpec(quant=QuantSpec(mode=mode), max_memory=parse_max_memory("0=100MB, 1=1GiB")))
    assert result.dtype == "bfloat16"  # planned for GPUs that this machine does not have
    layers = {d: sum(1 for m, dd in result.device_map.items() if dd == d and ".layers." in m) for d in (0, 1)}
    assert layers[0] + layers[1] == 30 and layers[0] > 0 and layers[1] > 0
    assert result.device_map["model.embed_tokens"] == 0
    small = 576 * 2 + 2 * 32 * 4  # final norm (bf16) and the rotary inv_freq buffers (fp32)
    assert result.bytes_per_device[0] == SMOL_EMBED_BF16 + layers[0] * layer
    assert result.bytes_per_device[1] == layers[1] * layer + small
    assert result.bytes_per_device[0] <= 100e6 * 0.9 or mode == "none"
    assert result.total_bytes == SMOL_EMBED_BF16 + 30 * layer + small


def test_int8_plan_that_spills_to_cpu_explains_the_fix(checkpoint):
    from core.placement import plan

    spec = LoadSpec(quant=QuantSpec(mode="int8"), max_memory=parse_max_memory("0=70MB, cpu=4GB"))
    with pytest.raises(BudgetTooSmallError, match="fp32 CPU offload.*4-bit"):
        plan(spec)
    offloaded = plan(spec.with_(quant=QuantSpec(mode="int8", fp32_cpu_offload=True)))
    assert offloaded.offloaded and set(offloaded.offloaded.values()) == {"cpu"}


# ----------------------------------------------------------------------------- errors


def test_bad_budget_strings_name_field_value_and_fix():
    with pytest.raises(SpecError, match=r"max_memory='600 megs'.*like '600MB'"):
        parse_max_memory("0=600 megs")
    with pytest.raises(SpecError, match="device=size pairs"):
        parse_max_memory("600MB")
    with pytest.raises(SpecError, match="GPU index"):
        parse_max_memory("gpu0=1GB")
    assert parse_size("600MB") == 600_000_000 and parse_size("1GiB") == 2**30
    assert parse_max_memory({0: "600MB", "cpu": "1GB"}) == ((0, 600_000_000), ("cpu", 10**9))


def test_unknown_local_folder_is_refused_before_loading(tmp_path):
    with pytest.raises(SpecError, match="no such local folder"):
        parse_model(str(tmp_path / "missing"))
    with pytest.raises(SpecError, match="a Hub id looks like"):
        parse_model("not a model id!")


def test_gpu_only_options_on_a_cpu_machine_say_so(checkpoint):
    engine = Engine()
    with pytest.raises(EnvironmentNotSupportedError, match="names GPU 0, but this machine has no GPU"):
        engine.load(LoadSpec(device_map=(("", 0),)))
    with pytest.raises(EnvironmentNotSupportedError, match="float16 needs a GPU"):
        engine.load(LoadSpec(dtype="float16"))


def test_unreachable_hub_and_unknown_model_give_one_clear_message(hub_server):
    import time

    started = time.perf_counter()
    unreachable = run_cli("plan", "--model", "someone/some-model", timeout=120, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    assert time.perf_counter() - started < 20  # imports included; huggingface_hub alone retried for 25 s
    assert unreachable.returncode == 2
    assert "Could not reach the Hugging Face Hub" in unreachable.stderr and "Traceback" not in unreachable.stderr
    unknown = run_cli("plan", "--model", "someone/does-not-exist", timeout=120, HF_HUB_OFFLINE="0",
                      HF_ENDPOINT=hub_server.url, HF_HUB_DISABLE_XET="1")
    assert unknown.returncode == 2
    assert "was found neither as a local folder nor on the Hub" in unknown.stderr


def test_out_of_memory_during_generation_is_explained(loaded_models, monkeypatch):
    loaded = loaded_models("none")

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loaded.model, "generate", exhausted)
    with pytest.raises(OutOfMemoryError, match="Lower max_new_tokens"):
        generation.generate(loaded, [QUESTION], GREEDY)


def test_failed_load_keeps_previous_model_usable(checkpoint, monkeypatch):
    from core import loading

    engine = Engine()
    engine.load(LoadSpec(quant=QuantSpec(mode="nf4")))
    with pytest.raises(SpecError):
        engine.load(LoadSpec(max_memory=parse_max_memory("0=lots")))
    assert "Paris" in generation.generate(engine.current, [QUESTION], GREEDY).texts[0]
    real_load = loading.load
    calls = []

    def oom_once(spec, progress=None):
        calls.append(spec.quant.mode)
        if len(calls) == 1:
            raise OutOfMemoryError("The GPU ran out of memory while loading.")
        return real_load(spec, progress)

    monkeypatch.setattr(loading, "load", oom_once)
    with pytest.raises(OutOfMemoryError, match="previous model was loaded again"):
        engine.load(LoadSpec(quant=QuantSpec(mode="int8")))
    assert calls == ["int8", "nf4"] and engine.current.spec.quant.mode == "nf4"
    assert "Paris" in generation.generate(engine.current, [QUESTION], GREEDY).texts[0]


def test_streaming_hands_over_growing_text_and_can_be_cancelled(loaded_models):
    import threading

    loaded = loaded_models("none")
    pieces: list[str] = []
    result = generation.generate(loaded, [QUESTION], GREEDY, on_text=pieces.append)
    assert len(pieces) > 3 and "".join(pieces).strip() == result.texts[0] and "Paris" in result.texts[0]
    assert result.metrics.ttft_s > 0 and not result.cancelled
    cancel = threading.Event()
    stopped = generation.generate(loaded, ["Write a long poem about the sea."],
                                  GenerationSpec(greedy=True, max_new_tokens=200), on_text=lambda _: cancel.set(),
                                  cancel=cancel)
    assert stopped.cancelled and stopped.metrics.new_tokens < 50


def test_batch_of_prompts_pads_left_and_matches_single(loaded_models):
    loaded = loaded_models("none")
    single = generation.generate(loaded, [QUESTION], GREEDY)
    batch = generation.generate(loaded, [QUESTION, "Name a primary color."], GREEDY)
    assert batch.metrics.batch_size == 2 and "Paris" in batch.texts[0] and batch.texts[1]
    assert single.texts[0] == batch.texts[0]


def test_sampling_with_a_seed_is_reproducible(loaded_models):
    loaded = loaded_models("none")
    spec = GenerationSpec(max_new_tokens=16, temperature=1.0, seed=1234)
    assert generation.generate(loaded, [QUESTION], spec).texts == generation.generate(loaded, [QUESTION], spec).texts


_PROGRESS = """
import json, sys
from core import loading
from core.spec import LoadSpec, QuantSpec
seen = []
loading.load(LoadSpec(model=sys.argv[1], quant=QuantSpec(mode="nf4")), progress=lambda f, m: seen.append((f, m)))
print(json.dumps(seen))
"""


def test_a_load_reports_each_phase_with_progress_that_moves(checkpoint, hub_server, tmp_path):
    import json

    from conftest import WRITE_TOKEN
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_server.url, token=WRITE_TOKEN)
    api.create_repo("alice/progress", exist_ok=True)
    api.upload_folder(folder_path=checkpoint, repo_id="alice/progress")
    env = subprocess_env(**{**hub_server.env(tmp_path / "hf-home"), "HF_TOKEN": WRITE_TOKEN})
    done = subprocess.run([sys.executable, "-c", _PROGRESS, "alice/progress"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    messages = [m for _, m in seen]
    assert "Looking up alice/progress on the Hub" in messages
    downloads = [m for m in messages if m.startswith("Downloading alice/progress: ")]
    assert "Downloading alice/progress: 6/6" in downloads and any(m.endswith(" of 517 MiB") for m in downloads)
    weights = [f for f, m in seen if m.startswith("Loading weights and quantizing them (4-bit NF4")]
    assert len(set(weights)) > 100  # one step a tensor
    assert messages[-1] == "Measuring footprint" and [f for f, _ in seen] == sorted(f for f, _ in seen)
