"""Encoder-decoder models (T5, BART) through core, `python -m core` and the app, on tiny random checkpoints.

No T5 can be downloaded here, so `conftest.tiny_seq2seq` builds a two-layer T5 (as Flan-T5 is built:
gated GELU, `wo` kept out of quantization) from a config with random weights and the embedded
model's tokenizer, without its chat template (text-to-text). Random weights say nothing about
quality; every check here is about memory, shapes, streaming and exactness.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import (QUESTION, WRITE_TOKEN, canonical_snapshot, quant_state_bytes, run_cli, subprocess_env,
                      tiny_seq2seq)
from core import compare, families, fastpath, fit, generation, hub, loading, placement, quality
from core.engine import Engine
from core.errors import SpecError
from core.spec import GenerationSpec, LoadSpec, QuantSpec, parse_max_memory

GREEDY = GenerationSpec(greedy=True, max_new_tokens=8)
NO_FACTS = hub.CardFacts()
MODES = ("none", "int8", "fp4", "nf4")


@pytest.fixture(scope="module")
def t5(t5_folder):
    """One loaded tiny T5 per quantization, loaded on first use."""
    cache = {}

    def get(mode: str):
        if mode not in cache:
            cache[mode] = loading.load(LoadSpec(model=str(t5_folder), quant=QuantSpec(mode=mode)))
        return cache[mode]

    return get


def _inputs(loaded, text=QUESTION):
    return loaded.tokenizer(text, return_tensors="pt").input_ids


def _logits(loaded, ids) -> torch.Tensor:
    start = torch.full((1, 1), loaded.model.config.decoder_start_token_id)
    with torch.inference_mode():
        return loaded.model(input_ids=ids, decoder_input_ids=torch.cat([start, ids[:, :5]], dim=1)).logits.clone()


# ----------------------------------------------------------------------------- the kind, from the config alone


def test_the_kind_comes_from_the_config_and_other_kinds_are_refused(checkpoint):
    from transformers import AutoConfig, BartConfig, BertConfig, T5Config, WhisperConfig

    assert families.of(AutoConfig.from_pretrained(checkpoint)) is families.CAUSAL
    assert families.of(T5Config()) is families.ENCODER_DECODER
    assert families.of(BartConfig(architectures=["BartForConditionalGeneration"])) is families.ENCODER_DECODER
    # the original T5 checkpoints (t5-11b among them) list a class name transformers no longer has: the config decides
    assert families.of(T5Config(architectures=["T5WithLMHeadModel"])) is families.ENCODER_DECODER
    refusals = {
        "a masked language model, encoder-only (BertForMaskedLM)": BertConfig(architectures=["BertForMaskedLM"]),
        "an encoder-only model (bert)": BertConfig(),  # transformers would load it as BertLMHeadModel
        "a sequence classifier (T5ForSequenceClassification)": T5Config(architectures=["T5ForSequenceClassification"]),
        "a speech-to-text encoder-decoder (WhisperForConditionalGeneration)":
            WhisperConfig(architectures=["WhisperForConditionalGeneration"]),
    }
    for found, config in refusals.items():
        with pytest.raises(SpecError, match="AutoModelForCausalLM.*AutoModelForSeq2SeqLM") as refused:
            families.of(config)
        assert f"it is {found};" in str(refused.value)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A BERT masked-LM config beside a weights file that is not one: a refusal that reads it would fail otherwise."""
    from transformers import BertConfig

    folder = tmp_path_factory.mktemp("bert")
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               architectures=["BertForMaskedLM"]).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not a checkpoint")
    return folder


def test_a_model_of_neither_kind_is_refused_before_any_weight_is_read(bert_folder, t5_folder):
    engine = Engine()
    loaded = engine.load(LoadSpec(model=str(t5_folder)))  # a model in memory that a refused load must not touch
    for attempt in (lambda: engine.load(LoadSpec(model=str(bert_folder))),
                    lambda: placement.plan(LoadSpec(model=str(bert_folder), quant=QuantSpec(mode="nf4"))),
                    lambda: fit.estimate(LoadSpec(model=str(bert_folder)), context_length=64)):
        with pytest.raises(SpecError, match=r"it is a masked language model, encoder-only \(BertForMaskedLM\)"):
            attempt()
    assert engine.current is loaded


# ----------------------------------------------------------------------------- loading, plan, fit


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_loads_keeps_wo_and_the_estimate_matches(t5, t5_folder, mode):
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    loaded = t5(mode)
    assert loaded.report.kind == "encoder-decoder (text-to-text)"
    assert type(loaded.model).__name__ == "T5ForConditionalGeneration"
    wo = [m for n, m in loaded.model.named_modules() if n.endswith(".wo")]
    assert len(wo) == 4 and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in wo)
    quantized = [m for m in loaded.model.modules() if isinstance(m, (Linear4bit, Linear8bitLt))]
    # per encoder block q, k, v, o, wi_0, wi_1; per decoder block those and the cross-attention's q, k, v, o
    assert len(quantized) == (2 * 6 + 2 * 10 if mode != "none" else 0)
    kept = loaded.report.kept_in_higher_precision
    assert (kept.startswith("wo: 4 modules, not quantized, float32") if mode != "none" else kept == "")
    estimate = fit.estimate(LoadSpec(model=str(t5_folder), quant=QuantSpec(mode=mode)), context_length=64)
    measured = loaded.report.footprint_bytes + quant_state_bytes(loaded)
    assert estimate.fits and abs(estimate.devices[0].weights - measured) / measured < 0.001


@pytest.mark.parametrize("arch,mode", [("t5", "none"), ("t5", "nf4"), ("bart", "int8")])
def test_kv_estimate_equals_what_generate_allocates(t5_folder, checkpoint, tmp_path, arch, mode):
    """Self-attention per generated token plus cross-attention over the input, in every decoder layer, exactly."""
    folder = t5_folder if arch == "t5" else tiny_seq2seq(tmp_path / arch, checkpoint, arch)
    spec = LoadSpec(model=str(folder), quant=QuantSpec(mode=mode))
    loaded = loading.load(spec)
    inputs = generation.build_inputs(loaded, [QUESTION, "Name a primary color."], GenerationSpec())
    length, new = inputs["input_ids"].shape[1], 9
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                    return_dict_in_generate=True)
    cache = out.past_key_values
    allocated = {name: sum(t.numel() * t.element_size() for layer in part.layers for t in (layer.keys, layer.values))
                 for name, part in (("self", cache.self_attention_cache), ("cross", cache.cross_attention_cache))}
    per_position = families.decoder_attention(loaded.model.config).bytes_per_position("float32") * 2  # batch 2
    assert allocated == {"self": new * per_position, "cross": length * per_position}
    estimate = fit.estimate(spec, context_length=length + new, batch_size=2)
    assert estimate.devices[0].kv_cache == allocated["self"] + allocated["cross"]


@pytest.fixture(scope="module")
def t5_11b(tmp_path_factory):
    """t5-11b's published config (config only: plans and estimates read nothing else)."""
    from transformers import T5Config

    folder = tmp_path_factory.mktemp("t5-11b")
    T5Config(d_model=1024, d_ff=65536, d_kv=128, num_layers=24, num_decoder_layers=24, num_heads=128,
             vocab_size=32128, feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
             architectures=["T5WithLMHeadModel"]).save_pretrained(folder)
    return folder


def test_t5_11b_planned_over_two_gpus_counts_encoder_decoder_and_where_the_cache_lives(t5_11b):
    spec = LoadSpec(model=str(t5_11b), quant=QuantSpec(mode="nf4"), device_map="sequential",
                    max_memory=parse_max_memory("0=7GiB, 1=8GiB"))
    planned = placement.plan(spec)
    assert planned.kind == "encoder-decoder (text-to-text)" and planned.gpus_planned == 2
    assert planned.device_map["encoder"] == 0 and planned.device_map["decoder.block.23"] == 1
    on_first = sum(1 for m, d in planned.device_map.items() if m.startswith("decoder.block.") and d == 0)
    assert planned.kv_layers == {0: on_first, 1: 24 - on_first} and 0 < on_first < 24  # decoder blocks only
    assert sum(planned.bytes_per_device.values()) == planned.total_bytes
    # bitsandbytes' absmax (fp32, one per 64 weights) of every quantized linear layer but T5's wo, which stays 16-bit
    linear = 24 * (4 * 1024 * 16384 + 2 * 1024 * 65536) + 24 * (8 * 1024 * 16384 + 2 * 1024 * 65536)
    kept = 48 * 65536 * 1024
    assert sum(planned.quant_state_bytes.values()) == (linear - kept) // 64 * 4
    report = fit.estimate(spec, context_length=192)
    per_layer = 2 * 128 * 128 * 192 * 2  # keys and values, 128 heads of 128, 192 positions, bf16
    assert {d.device: d.kv_cache for d in report.devices} == {0: per_layer * on_first, 1: per_layer * (24 - on_first)}


def test_the_seeds_t5_11b_figures_from_its_config(t5_11b):
    """The seed's claim, estimated from the config alone: 42 GB in fp32 (GiB, in fact); 8-bit now needs about a third,
    not a quarter, because transformers keeps wo (3.2 of the 11.3 billion parameters) out of quantization, in the load
    dtype, and in fp32 for a float16 load."""
    def weights(dtype: str, mode: str) -> int:
        spec = LoadSpec(model=str(t5_11b), dtype=dtype, quant=QuantSpec(mode=mode),
                        max_memory=parse_max_memory("0=200GB"))
        return fit.estimate(spec, context_length=192).devices[0].weights

    fp32 = weights("float32", "none")
    assert round(fp32 / 2**30) == 42
    assert 0.30 < weights("bfloat16", "int8") / fp32 < 0.34 and 0.23 < weights("bfloat16", "nf4") / fp32 < 0.26
    wo = 48 * 65536 * 1024
    assert weights("float16", "int8") - weights("bfloat16", "int8") == wo * 2  # upcast after placing, counted


# ----------------------------------------------------------------------------- generation


def test_text_to_text_streams_the_answer_of_the_last_message(t5):
    loaded = t5("nf4")
    chat = [{"role": "user", "content": "Say hello in French."}, {"role": "assistant", "content": "Bonjour."},
            {"role": "user", "content": QUESTION}]
    assert generation._as_text(loaded, chat, GenerationSpec(system_prompt="Be brief.")) == QUESTION
    forced = generation.generate(loaded, [QUESTION], GREEDY, min_new_tokens=8)
    assert forced.metrics.new_tokens == 8 and len(forced.token_ids[0]) == 8  # the decoder's start token is not new
    alone = generation.generate(loaded, [QUESTION], GREEDY)
    pieces: list[str] = []
    final = generation.generate(loaded, [chat], GREEDY, on_text=pieces.append)
    assert len(pieces) > 2 and "".join(pieces).strip() == final.texts[0] == alone.texts[0]
    assert final.metrics.ttft_s > 0
    assert final.metrics.prompt_tokens == _inputs(loaded).shape[1] and final.metrics.decode_tokens_per_s > 0


def test_a_chat_template_is_used_when_the_model_has_one(checkpoint, tmp_path):
    loaded = loading.load(LoadSpec(model=str(tiny_seq2seq(tmp_path / "t5-chat", checkpoint, chat_template=True))))
    text = generation._as_text(loaded, QUESTION, GenerationSpec())
    assert text.startswith("<|im_start|>") and QUESTION in text and text.rstrip().endswith("assistant")
    assert generation.generate(loaded, [QUESTION], GREEDY).metrics.new_tokens > 0


@pytest.mark.parametrize("mode", ["none", "nf4"])
def test_fast_path_on_a_static_encoder_decoder_cache_reverses_exactly(t5, mode):
    loaded = t5(mode)
    assert families.fast_path_support(loaded.model).cuda_graph is True  # on a GPU; tests/test_graphs.py replays it
    assert "Encoder-decoder" in families.fast_path_support(loaded.model).reason
    tree, config, state = canonical_snapshot(loaded)
    before = generation.generate(loaded, [QUESTION], GREEDY, min_new_tokens=8).token_ids
    # The GPU recipe forced on the CPU: transformers then builds an EncoderDecoderCache of two StaticCaches.
    on = fastpath.enable(loaded, fastpath.FastPathChoice("eager", "static", "test"))
    assert on.enabled and on.cache_implementation == "static"
    assert generation.generate(loaded, [QUESTION], GREEDY, min_new_tokens=8).token_ids == before
    off = fastpath.reverse(loaded)
    assert not off.enabled and off.attn_implementation == "sdpa"
    tree2, config2, state2 = canonical_snapshot(loaded)
    assert (tree2, config2) == (tree, config) and state2.keys() == state.keys()
    assert all(torch.equal(state[k], state2[k]) and state[k].dtype == state2[k].dtype for k in state)


# ----------------------------------------------------------------------------- quality and compare


def test_on_a_gpu_the_fast_path_graphs_an_encoder_decoder_with_the_reason(t5, loaded_models, monkeypatch):
    monkeypatch.setattr(fastpath, "_on_gpu", lambda loaded: True)
    monkeypatch.setattr(fastpath.kernels, "unavailable", lambda device: None)  # as on a GPU with Triton
    for mode in ("none", "int8", "nf4"):
        choice = fastpath.choose(t5(mode))
        assert choice.cuda_graph and choice.cache_implementation == "static" and choice.kernels
        assert choice.reason.startswith("Encoder-decoder model: its decoder step is captured with the encoder's output")
        assert "input lengths are kept" in choice.reason and choice.quiet_int8_log == (mode == "int8")
    assert fastpath.choose(loaded_models("nf4")).reason.startswith("4-bit NF4 decode")  # nothing to add for a causal LM


def test_quality_and_compare_run_on_an_encoder_decoder(t5_folder):
    engine = Engine()
    engine.load(LoadSpec(model=str(t5_folder), quant=QuantSpec(mode="nf4")))
    report = quality.check(engine)
    assert engine.current.spec.quant.mode == "nf4" and "teacher forcing" in report.method
    ids = engine.current.tokenizer(quality.SAMPLE.read_text()).input_ids
    assert report.tokens == len(ids) - len(ids) // 2  # the decoder is scored on the sample's second half
    assert report.perplexity > 1 and report.reference_perplexity > 1 and 0 < report.agreement <= 1
    rows = compare.compare(engine, QUESTION, ["none", "nf4"], max_new_tokens=6)
    assert [r.quantization for r in rows] == ["none", "nf4"] and not any(r.error for r in rows)
    assert rows[0].agreement == 1.0 and rows[1].footprint_bytes < rows[0].footprint_bytes
    assert engine.current.spec.quant.mode == "nf4"


# ----------------------------------------------------------------------------- save, reload, push

_RELOAD = """
import json, sys, torch
from transformers import AutoModelForSeq2SeqLM
for folder, ids, out in json.loads(sys.argv[1]):
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, device_map="cpu")
    ids = torch.load(ids)
    start = torch.full((1, 1), model.config.decoder_start_token_id)
    with torch.no_grad():
        torch.save(model(input_ids=ids, decoder_input_ids=torch.cat([start, ids[:, :5]], dim=1)).logits, out)
"""


def _reload(jobs, env=None) -> None:
    done = subprocess.run([sys.executable, "-c", _RELOAD, json.dumps(jobs)], env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_chat_save_chat_then_a_fresh_process_reloads_the_same_logits(t5_folder, tmp_path):
    """In none, int8 and nf4: save before any forward, chat, save with the fast path on, chat again; the live model
    never changes and plain transformers reloads every save to the logits the model computed before it."""
    expected, jobs = {}, []
    for mode in ("none", "int8", "nf4"):
        loaded = loading.load(LoadSpec(model=str(t5_folder), quant=QuantSpec(mode=mode)))
        ids = _inputs(loaded)
        torch.save(ids, tmp_path / "ids.pt")
        hub.save(loaded, tmp_path / f"{mode}-fresh", NO_FACTS)
        fresh = _logits(loaded, ids)
        answer = generation.generate(loaded, [QUESTION], GREEDY).token_ids
        fastpath.enable(loaded, fastpath.FastPathChoice("eager", "static", "test"))
        hub.save(loaded, tmp_path / f"{mode}-after-chat", NO_FACTS)  # after a forward: 4-bit repacked on the CPU
        assert fastpath.state(loaded).enabled
        fastpath.reverse(loaded)
        assert torch.equal(_logits(loaded, ids), fresh)
        assert generation.generate(loaded, [QUESTION], GREEDY).token_ids == answer
        config = json.loads((tmp_path / f"{mode}-after-chat" / "config.json").read_text())
        assert config["is_encoder_decoder"] and config["architectures"] == ["T5ForConditionalGeneration"]
        for name in ("fresh", "after-chat"):
            expected[f"{mode}-{name}"] = fresh
            folder = tmp_path / f"{mode}-{name}"
            jobs.append((str(folder), str(tmp_path / "ids.pt"), str(folder) + ".pt"))
    card = (tmp_path / "nf4-fresh" / "README.md").read_text()
    assert "pipeline_tag: text2text-generation" in card and "AutoModelForSeq2SeqLM.from_pretrained(repo" in card
    assert "vllm serve" not in card and "vllm-project/vllm#24907" in card  # vLLM dropped encoder-decoders
    _reload(jobs)
    for key, (_, _, out) in zip(expected, jobs):
        assert torch.equal(torch.load(out), expected[key]), key


def test_push_to_the_local_hub_and_reload(t5, hub_server, tmp_path):
    loaded = t5("nf4")
    ids = _inputs(loaded)
    torch.save(ids, tmp_path / "ids.pt")
    before = _logits(loaded, ids)
    hub.push(loaded, "alice/tiny-t5-nf4", token=WRITE_TOKEN, folder=tmp_path / "out", facts=NO_FACTS,
             endpoint=hub_server.url)
    assert torch.equal(_logits(loaded, ids), before)
    card = hub_server.read_file("alice/tiny-t5-nf4", "README.md").decode()
    assert 'repo = "alice/tiny-t5-nf4"' in card and "text2text-generation" in card and "AutoModelForSeq2SeqLM" in card
    env = subprocess_env(**{**hub_server.env(tmp_path / "hf-home"), "HF_TOKEN": WRITE_TOKEN})
    _reload([("alice/tiny-t5-nf4", str(tmp_path / "ids.pt"), str(tmp_path / "hub.pt"))], env)
    assert torch.equal(torch.load(tmp_path / "hub.pt"), before)


# ----------------------------------------------------------------------------- python -m core


def test_the_command_line_plans_generates_and_saves_a_t5(t5_folder, t5_11b, bert_folder, tmp_path):
    planned = run_cli("plan", "--model", str(t5_11b), "--quant", "int8", "--device-map", "sequential", "--max-memory",
                   "0=10GiB,1=10GiB")
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert "kind     encoder-decoder (text-to-text)" in planned.stdout and "decoder.block" in planned.stdout
    assert "cuda:1" in planned.stdout
    made = run_cli("generate", "--model", str(t5_folder), "--quant", "int8", "--greedy", "--max-new-tokens", "4",
                   QUESTION)
    assert made.returncode == 0, made.stderr[-2000:]
    metrics = json.loads(made.stderr.strip().splitlines()[-1])
    assert metrics["new_tokens"] >= 1 and made.stdout.strip()
    saved = run_cli("save", "--model", str(t5_folder), "--quant", "fp4", "--out", str(tmp_path / "fp4"))
    assert saved.returncode == 0, saved.stderr[-2000:]
    assert json.loads((tmp_path / "fp4" / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] \
        == "fp4"
    refused = run_cli("plan", "--model", str(bert_folder))
    assert refused.returncode == 2 and "masked language model" in refused.stderr and "Traceback" not in refused.stderr


# ----------------------------------------------------------------------------- the app


def test_the_app_loads_chats_and_saves_a_t5_then_loads_the_default_back(client, app, t5_folder, bert_folder):
    from gradio_client.exceptions import AppError

    shown = client.predict(model=str(t5_folder), quant="nf4", api_name="/plan")
    assert "encoder-decoder (text-to-text)" in shown
    fits = client.predict(model=str(t5_folder), quant="nf4", context_length=512, batch_size=1, api_name="/check_fit")[0]
    assert fits.startswith("**Fits**")
    try:
        report = client.predict(model=str(t5_folder), quant="nf4", api_name="/load_model")[0]
        assert "| model kind | encoder-decoder (text-to-text) |" in report
        assert "| kept in higher precision | wo: 4 modules, not quantized" in report
        history, status = client.predict(message=QUESTION, max_new_tokens=6, greedy=True, api_name="/generate")
        answer = history[-1]["content"]
        answer = answer if isinstance(answer, str) else "".join(part.get("text", "") for part in answer)
        assert "answered by" in answer and answer.split("\n\n*")[0].strip() and "tok/s" in status
        assert "Saved" in client.predict(api_name="/save_model")
        folder = max(app.save_dir.glob("tiny-t5-nf4-*"), key=lambda p: p.stat().st_mtime)
        assert json.loads((folder / "config.json").read_text())["is_encoder_decoder"] is True
        assert "AutoModelForSeq2SeqLM" in (folder / "README.md").read_text()
        with pytest.raises(AppError, match="masked language model.*AutoModelForSeq2SeqLM"):
            client.predict(model=str(bert_folder), api_name="/load_model")
    finally:
        report = client.predict(api_name="/load_model")[0]
    assert "SmolLM2-135M-Instruct" in report and "| model kind | causal LM |" in report
