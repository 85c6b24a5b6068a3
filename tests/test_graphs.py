"""The graphed decode's bookkeeping on the CPU: what a graph keys on, what each step copies in, which caches
are kept, and the fast path's undo record and reasons, for causal and encoder-decoder models and split ones.

CUDA graphs exist only on a GPU (tests/test_gpu.py captures real ones). Here `EagerReplay` stands in for
the capture: its "replay" runs the forward on the captured buffers, as the graph would read them. So a
step input that a step failed to copy into its buffer, a cache not reset, or a graph reused for other
shapes shows up as tokens that differ from plain decode.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import canonical_snapshot, tiny_seq2seq
from core import cuda_graphs, fastpath, generation, loading
from core.spec import GenerationSpec, LoadSpec, QuantSpec

GREEDY = GenerationSpec(greedy=True, max_new_tokens=8, use_chat_template=False)
GRAPHED = fastpath.FastPathChoice("sdpa", "static", "test: the graphed step, replayed eagerly", cuda_graph=True)
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
           "Water boils at", "The three primary colours are red,", "Three things a good cook keeps close:"]


class EagerReplay(cuda_graphs.GraphedDecode):
    """The graphed step with its capture replaced by a forward over the captured buffers."""

    def _record(self, captured: cuda_graphs.Captured, layers: list) -> None:
        self.recorded = getattr(self, "recorded", 0) + 1

        def replay() -> None:
            captured.out = self.forward(**captured.kwargs)

        captured.replay = replay


@pytest.fixture()
def eager_graphs(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "GraphedDecode", EagerReplay)
    monkeypatch.setattr(cuda_graphs, "defer_stop_checks", lambda: lambda: None)  # its events exist on GPUs only


@pytest.fixture(scope="module")
def t5(checkpoint, tmp_path_factory):
    folder = tiny_seq2seq(tmp_path_factory.mktemp("t5") / "tiny-t5", checkpoint)
    return {mode: loading.load(LoadSpec(model=str(folder), quant=QuantSpec(mode=mode))) for mode in ("none", "nf4")}


def _tokens(loaded, prompts) -> list:
    return [generation.generate(loaded, [p], GREEDY, min_new_tokens=8).token_ids for p in prompts]


def test_the_graphed_step_decodes_as_plain_decode_and_reverses_exactly(loaded_models, eager_graphs):
    loaded = loaded_models("none")
    tree, config, state = canonical_snapshot(loaded)
    plain, plain_batch = _tokens(loaded, PROMPTS[:2]), generation.generate(loaded, PROMPTS[:2], GREEDY).token_ids
    on = fastpath.enable(loaded, GRAPHED)
    try:
        assert on.cuda_graph and on.cache_implementation == "static"
        assert _tokens(loaded, PROMPTS[:2]) == plain  # two prompts of different lengths through one graph
        assert generation.generate(loaded, PROMPTS[:2], GREEDY).token_ids == plain_batch
        graph = fastpath.graph_of(loaded)
        assert sorted(c.batch for c in graph.graphs.values()) == [1, 2] and graph.recorded == 2
        assert set(graph.caches) == {(1,), (2,)}
    finally:
        off = fastpath.reverse(loaded)
    assert not off.enabled and loaded.canonical is None
    assert "get_compiled_call" not in loaded.model.__dict__
    tree2, config2, state2 = canonical_snapshot(loaded)
    assert (tree2, config2) == (tree, config) and all(torch.equal(state[k], state2[k]) for k in state)


@pytest.mark.parametrize("mode", ["none", "nf4"])
def test_an_encoder_decoder_graph_holds_one_input_length_and_decodes_as_plain(t5, eager_graphs, mode, monkeypatch):
    loaded = t5[mode]
    lengths = [loaded.tokenizer(p, return_tensors="pt").input_ids.shape[1] for p in PROMPTS]
    assert len(set(lengths)) == len(PROMPTS)  # each prompt is an input length of its own
    plain = _tokens(loaded, PROMPTS)
    tree, config, state = canonical_snapshot(loaded)
    monkeypatch.setattr(cuda_graphs, "KEPT_INPUT_LENGTHS", 3)
    on = fastpath.enable(loaded, GRAPHED)
    try:
        assert on.cuda_graph
        graph = fastpath.graph_of(loaded)
        assert _tokens(loaded, PROMPTS[:2] + PROMPTS[:2]) == plain[:2] + plain[:2]
        assert graph.recorded == 2  # one graph per input length, reused by the same length
        captured = next(iter(graph.graphs.values()))
        encoder = captured.kwargs["encoder_outputs"]
        assert encoder.last_hidden_state is captured.inputs["encoder_outputs.last_hidden_state"]
        assert {"decoder_input_ids", "decoder_attention_mask", "attention_mask"} <= set(captured.inputs)
        cross = [c.cross_attention_cache.layers[0].max_cache_len for c in graph.caches.values()]
        assert sorted(cross) == sorted(lengths[:2])  # cross-attention over each input exactly
        assert _tokens(loaded, PROMPTS[2:]) == plain[2:]  # five lengths: the caches start over at the fourth
        assert sorted(k[1] for k in graph.caches) == sorted(lengths[3:]) and len(graph.graphs) == 2
    finally:
        fastpath.reverse(loaded)
    tree2, config2, state2 = canonical_snapshot(loaded)
    assert (tree2, config2) == (tree, config) and all(torch.equal(state[k], state2[k]) for k in state)


def test_step_inputs_key_on_shapes_and_values_and_refuse_what_no_graph_holds():
    from transformers.modeling_outputs import BaseModelOutput

    ids, mask = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)
    encoder = BaseModelOutput(last_hidden_state=torch.zeros(1, 7, 4))
    step = cuda_graphs.split_inputs(dict(decoder_input_ids=ids, attention_mask=mask, encoder_outputs=encoder,
                                         use_cache=True))
    assert set(step.tensors) == {"decoder_input_ids", "attention_mask", "encoder_outputs.last_hidden_state"}
    assert step.fixed == {"use_cache": True} and step.outputs == {"encoder_outputs": BaseModelOutput}
    cache = object()
    longer = cuda_graphs.split_inputs(dict(decoder_input_ids=ids, attention_mask=torch.ones(1, 8, dtype=torch.long),
                                           encoder_outputs=BaseModelOutput(last_hidden_state=torch.zeros(1, 8, 4)),
                                           use_cache=True))
    assert longer.key(cache) != step.key(cache) and step.key(object()) != step.key(cache)
    assert cuda_graphs.split_inputs(dict(decoder_input_ids=ids, use_cache=False)).key(cache) != \
        cuda_graphs.split_inputs(dict(decoder_input_ids=ids, use_cache=True)).key(cache)
    buffers = {name: t.clone() for name, t in step.tensors.items()}
    kwargs = cuda_graphs.with_buffers(step, buffers, cache)
    assert kwargs["encoder_outputs"].last_hidden_state is buffers["encoder_outputs.last_hidden_state"]
    assert kwargs["cache"] is cache and kwargs["use_cache"] is True
    assert cuda_graphs.split_inputs(dict(input_ids=ids, extra=[1, 2])) is None  # no graph: the plain forward runs


def test_the_undo_record_is_frozen_and_holds_the_reason_once(loaded_models):
    loaded = loaded_models("none")
    assert loaded.canonical is None
    on = fastpath.enable(loaded, fastpath.FastPathChoice("eager", "static", "test reason"))
    try:
        undo = loaded.canonical
        assert isinstance(undo, fastpath.FastPathUndo) and on.reason == undo.choice.reason == "test reason"
        assert [f.name for f in dataclasses.fields(undo) if getattr(undo, f.name) == "test reason"] == []
        with pytest.raises(dataclasses.FrozenInstanceError):
            undo.graph = None
        assert undo.attn_implementation == "sdpa" and undo.graph is None and undo.kernels == ()
    finally:
        off = fastpath.reverse(loaded)
    assert loaded.canonical is None and off.reason == "Canonical model as loaded." and not off.enabled


def _placed(loaded, device_map: dict) -> loading.LoadedModel:
    return dataclasses.replace(loaded, report=dataclasses.replace(loaded.report, device_map=device_map))


def _split_map(layers: int, cut: int, last: int | str = 1) -> dict:
    placed = {"model.embed_tokens": 0, "model.rotary_emb": 0}
    placed.update({f"model.layers.{i}": 0 if i < cut else last for i in range(layers)})
    placed.update({"model.norm": last, "lm_head": last})
    return placed


def test_on_two_gpus_the_reason_says_what_runs_where_and_the_step_is_not_compiled(loaded_models, monkeypatch):
    monkeypatch.setattr(fastpath, "_on_gpu", lambda loaded: True)
    monkeypatch.setattr(fastpath.kernels, "unavailable", lambda device: None)  # as on a GPU with Triton
    loaded = loaded_models("nf4")
    layers = loaded.model.config.num_hidden_layers
    split = _placed(loaded, _split_map(layers, 12))
    choice = fastpath.choose(split, compile_step=True)
    assert choice.cuda_graph and choice.kernels and not choice.compile_step
    assert (f"Split across 2 GPUs (cuda:0: model.embed_tokens, model.rotary_emb, model.layers.0-11; cuda:1: "
            f"model.layers.12-{layers - 1}, model.norm, lm_head)") in choice.reason
    assert "runs the fast path's kernels on them" in choice.reason and "not compiled" in choice.reason
    one = fastpath.choose(_placed(loaded, {"": 0}), compile_step=True)
    assert one.compile_step and "Split" not in one.reason
    offloaded = fastpath.choose(_placed(loaded, _split_map(layers, 20, "cpu")))
    assert not offloaded.cuda_graph and not offloaded.kernels
    assert offloaded.reason.startswith(f"{layers - 20 + 2} module(s) are offloaded to the CPU or disk "
                                       f"(model.layers.20-{layers - 1}, model.norm, lm_head) and stay plain")
    assert "its layers on cuda:0 too, decodes as loaded" in offloaded.reason


def test_a_split_model_gets_kernels_per_gpu_inside_its_device_map_entries(loaded_models, monkeypatch):
    model = loaded_models("none").model
    layers = model.config.num_hidden_layers
    monkeypatch.setattr(model, "hf_device_map", _split_map(layers, 12), raising=False)
    segments = fastpath._segments(model)
    assert [d.index for d in segments] == [0, 1]
    first, second = segments.values()
    assert model.model.layers[11].self_attn in first and model.model.layers[11].mlp in first
    assert model.model.layers[12].self_attn in second and model.model.layers[12].self_attn not in first
    entries = [model.model.layers[11], model.model.layers[12], model.model.embed_tokens, model.lm_head]
    assert not [m for m in entries if m in first or m in second]  # an entry's own forward moves its inputs
    monkeypatch.setattr(model, "hf_device_map", {"": 0})
    assert fastpath._segments(model) is None  # one device: the kernels install on the whole model as before


def test_the_encoder_decoder_cache_crops_its_self_attention_half_only(t5):
    """generate()'s deferred stop check crops the cache each step and undoes its one extra step at the end."""
    graph = cuda_graphs.GraphedDecode(t5["none"].model)
    cache = graph.cache_for(1, 10, input_length=6)
    assert isinstance(cache, cuda_graphs.StaticEncoderDecoderCache)
    keys = torch.zeros(1, 4, 1, 16)
    cache.cross_attention_cache.update(torch.zeros(1, 4, 6, 16), torch.zeros(1, 4, 6, 16), 0)
    for _ in range(3):
        cache.self_attention_cache.update(keys, keys, 0)
    cache.crop(0)
    cache.crop(-1)
    assert int(cache.self_attention_cache.layers[0].cumulative_length) == 2
    assert int(cache.cross_attention_cache.layers[0].cumulative_length) == 6
    assert graph.cache_for(1, 10, input_length=6) is cache and cache.get_seq_length() == 0  # reset for the next answer


def test_the_graphed_cache_skips_the_stop_checks_crop_by_zero_and_still_crops(loaded_models):
    """generate()'s deferred stop check crops the graphed cache by 0 after every step: no kernel at all (on a GPU,
    one per layer between two replays), while a real crop still shortens every layer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.count += 1
            return func(*args, **(kwargs or {}))

    graph = cuda_graphs.GraphedDecode(loaded_models("none").model)
    cache = graph.cache_for(1, 10)
    config = loaded_models("none").model.config
    keys = torch.zeros(1, config.num_key_value_heads, 1, config.hidden_size // config.num_attention_heads)
    for _ in range(3):
        for layer in range(len(cache.layers)):
            cache.update(keys, keys, layer)
    with Ops():
        cache.crop(0)
    assert Ops.count == 0
    cache.crop(-1)
    assert {int(layer.cumulative_length) for layer in cache.layers} == {2}


def test_on_a_split_model_the_kernels_stand_in_for_accelerates_hooks_and_reverse_puts_them_back(checkpoint, tmp_path,
                                                                                                monkeypatch):
    """accelerate's dispatch sets a forward on every module with weights; the kernels' forwards replace those inside
    the device-map entries (never an entry's own, which moves activations between GPUs), and reverse restores each."""
    import contextlib

    from accelerate.hooks import attach_execution_device_hook

    from conftest import tiny_model
    from core.kernels import modules

    loaded = loading.load(LoadSpec(model=str(tiny_model(tmp_path / "tiny", checkpoint))))
    model = loaded.model
    attach_execution_device_hook(model, "cpu")  # as dispatch_model hooks a split model, here with the CPU for GPUs
    placed = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
              "model.norm": 1, "lm_head": 1}
    monkeypatch.setattr(model, "hf_device_map", placed, raising=False)
    monkeypatch.setattr(fastpath, "_current", lambda device: contextlib.nullcontext())

    def install(segment):  # what modules.install does to the layers it serves, without measuring kernels
        linears = tuple(m for m in segment.modules() if isinstance(m, torch.nn.Linear))
        for linear in linears:
            linear.forward = lambda x: x
        return modules.Installed(linears, (f"{len(linears)} layers",))

    monkeypatch.setattr(modules, "install", install)
    before = [(m, m.__dict__.get("forward"), len(m._forward_pre_hooks)) for m in model.modules()]
    accelerates = {m: f for m, f, _ in before}
    q_proj = model.model.layers[1].self_attn.q_proj
    assert accelerates[q_proj] is not None and accelerates[model.lm_head] is not None
    on = fastpath.enable(loaded, fastpath.FastPathChoice("sdpa", None, "test", kernels=True))
    assert on.kernels == "cuda:0: 7 layers. cuda:1: 7 layers"  # q, k, v, o, gate, up, down on each GPU
    assert q_proj.__dict__["forward"] is not accelerates[q_proj]  # a kernel's forward stands in for accelerate's
    assert model.lm_head.__dict__["forward"] is accelerates[model.lm_head]  # a leaf entry keeps its hook
    assert len(model.model.layers[1]._forward_pre_hooks) == 1  # its GPU current around the layer
    fastpath.reverse(loaded)
    assert [(m, m.__dict__.get("forward"), len(m._forward_pre_hooks)) for m in model.modules()] == before
