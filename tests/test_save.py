"""Saving never changes the live model, and what it writes reloads to the same logits; staging and verified reuse.

The order is what users do: load, save at once or chat first, save (fast path on or off), chat
again, then reload the saved folder in a fresh process with plain transformers. Logits are captured
*before* each save: bitsandbytes repacks 4-bit weights on the CPU at the first forward, and a
broken save shows only when compared with what the model computed before it (core/bnb_repack.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import QUESTION, subprocess_env
from core import fastpath, generation, hub, loading, saves
from core.errors import SaveError
from core.spec import GenerationSpec, LoadSpec, QuantSpec

GREEDY = GenerationSpec(greedy=True, max_new_tokens=12)
NO_FACTS = hub.CardFacts()  # the card's sample answer is tested elsewhere; a generation here would slow every save
MODES = {"none": QuantSpec(), "int8": QuantSpec(mode="int8"), "fp4": QuantSpec(mode="fp4"),
         "nf4": QuantSpec(mode="nf4"), "nf4-double-quant": QuantSpec(mode="nf4", double_quant=True)}
# The CPU fast path keeps the canonical settings; force the GPU recipe so that saving has something to reverse.
FORCED = fastpath.FastPathChoice("eager", "static", "test: the GPU recipe on the CPU")

_RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
for folder, ids, out in json.loads(sys.argv[1]):
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    with torch.no_grad():
        torch.save(model(torch.load(ids)).logits, out)
"""


def _logits(loaded, ids) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(ids).logits.clone()


def _reload_logits(jobs: list[tuple[str, str, str]]) -> None:
    done = subprocess.run([sys.executable, "-c", _RELOAD, json.dumps(jobs)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _same_files_then_remove(folder, reference) -> None:
    """The later save holds byte for byte what the save before any forward held, so it reloads to the same
    logits; removed at once, because three full fp32 saves would need 1.5 GB of a CI machine's disk."""
    assert saves.manifest(folder) == saves.manifest(reference), folder.name
    shutil.rmtree(folder)


@pytest.mark.parametrize("mode", list(MODES))
def test_chat_save_chat_reload_gives_the_same_logits(checkpoint, tmp_path, mode):
    loaded = loading.load(LoadSpec(quant=MODES[mode]))
    ids = loaded.tokenizer(QUESTION, return_tensors="pt").input_ids
    torch.save(ids, tmp_path / "ids.pt")

    hub.save(loaded, tmp_path / "fresh", NO_FACTS)  # before any forward
    fresh = _logits(loaded, ids)
    answer = generation.generate(loaded, [QUESTION], GREEDY)
    assert "Paris" in answer.texts[0]
    assert torch.equal(_logits(loaded, ids), fresh)

    on = fastpath.enable(loaded, FORCED)
    answer_on = generation.generate(loaded, [QUESTION], GREEDY)
    before_on = _logits(loaded, ids)  # eager attention: close to, not bitwise equal to, sdpa's
    hub.save(loaded, tmp_path / "fast-on", NO_FACTS)  # after a chat, fast path on: the case that corrupted 4-bit
    _same_files_then_remove(tmp_path / "fast-on", tmp_path / "fresh")
    assert fastpath.state(loaded) == on  # the user's fast path is back as it was
    assert torch.equal(_logits(loaded, ids), before_on)
    assert generation.generate(loaded, [QUESTION], GREEDY).token_ids == answer_on.token_ids

    fastpath.reverse(loaded)
    hub.save(loaded, tmp_path / "fast-off", NO_FACTS)
    _same_files_then_remove(tmp_path / "fast-off", tmp_path / "fresh")
    assert torch.equal(_logits(loaded, ids), fresh)
    assert generation.generate(loaded, [QUESTION], GREEDY).texts == answer.texts

    _reload_logits([(str(tmp_path / "fresh"), str(tmp_path / "ids.pt"), str(tmp_path / "fresh.pt"))])
    assert torch.equal(torch.load(tmp_path / "fresh.pt"), fresh)


def test_push_after_chat_publishes_the_model_that_answered(checkpoint, hub_server, tmp_path):
    from conftest import WRITE_TOKEN

    loaded = loading.load(LoadSpec(quant=QuantSpec(mode="nf4")))
    ids = loaded.tokenizer(QUESTION, return_tensors="pt").input_ids
    torch.save(ids, tmp_path / "ids.pt")
    assert "Paris" in generation.generate(loaded, [QUESTION], GREEDY).texts[0]
    before = _logits(loaded, ids)
    hub.push(loaded, "alice/after-chat", token=WRITE_TOKEN, folder=tmp_path / "out", facts=NO_FACTS,
             endpoint=hub_server.url)
    assert torch.equal(_logits(loaded, ids), before)
    env = subprocess_env(**{**hub_server.env(tmp_path / "hf-home"), "HF_TOKEN": WRITE_TOKEN})
    done = subprocess.run([sys.executable, "-c", _RELOAD, json.dumps([("alice/after-chat", str(tmp_path / "ids.pt"),
                                                                      str(tmp_path / "hub.pt"))])],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "hub.pt"), before)


# ----------------------------------------------------------------------------- staging and verified reuse


def test_a_save_that_fails_midway_leaves_no_folder(loaded_models, tmp_path, monkeypatch):
    loaded = loaded_models("nf4")
    target = tmp_path / "crash"

    def partial_then_fail(folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half a checkpoint")
        raise OSError("disk unplugged")

    monkeypatch.setattr(loaded.model, "save_pretrained", partial_then_fail)
    with pytest.raises(OSError, match="disk unplugged"):
        hub.save(loaded, target, NO_FACTS)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_push_reuses_only_a_verified_save(loaded_models, hub_server, tmp_path):
    from conftest import WRITE_TOKEN

    loaded = loaded_models("nf4")
    folder = tmp_path / "saved"
    hub.save(loaded, folder, NO_FACTS)

    def push() -> bool:
        return hub.push(loaded, "alice/reuse", token=WRITE_TOKEN, folder=folder, facts=NO_FACTS,
                        endpoint=hub_server.url).saved_again

    assert push() is False  # intact: uploaded as saved
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    weights.write_bytes(bytes(data))
    assert saves.verify(folder, saves.fingerprint(loaded.spec)) is False
    assert push() is True and saves.verify(folder, saves.fingerprint(loaded.spec))
    (folder / "extra.txt").write_text("not part of the save")
    assert push() is True and not (folder / "extra.txt").exists()
    marker = json.loads((folder / saves.MARKER).read_text())
    marker["fingerprint"]["quant"]["mode"] = "fp4"  # a save of another model
    (folder / saves.MARKER).write_text(json.dumps(marker))
    assert push() is True


def test_a_folder_left_by_a_killed_save_is_never_taken_for_a_finished_one(loaded_models, tmp_path):
    loaded = loaded_models("nf4")
    target = saves.target_for(loaded.spec, tmp_path)
    leftover = tmp_path / f"{saves.STAGING}{target.name}-deadbeef"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    assert not saves.verify(leftover, saves.fingerprint(loaded.spec)) and not target.exists()
    result = hub.save(loaded, target, NO_FACTS)
    assert not leftover.exists() and saves.verify(target, saves.fingerprint(loaded.spec))
    assert result.total_bytes == saves.size_of(target) and "model.safetensors" in result.files


def test_never_writes_into_a_folder_that_is_not_an_app_save(loaded_models, tmp_path):
    loaded = loaded_models("nf4")
    theirs = tmp_path / "someone-elses"
    theirs.mkdir()
    (theirs / "model-00001-of-00002.safetensors").write_bytes(b"the owner's shard")
    with pytest.raises(SaveError, match="not a save of this app"):
        hub.save(loaded, theirs, NO_FACTS)
    assert [p.name for p in theirs.iterdir()] == ["model-00001-of-00002.safetensors"]
    file_target = tmp_path / "a-file"
    file_target.write_text("x")
    with pytest.raises(SaveError, match="not a folder"):
        hub.save(loaded, file_target, NO_FACTS)


def test_save_names_come_from_the_spec_and_stay_under_the_root(tmp_path):
    spec = LoadSpec(quant=QuantSpec(mode="nf4"))
    target = saves.target_for(spec, tmp_path)
    assert target.parent == tmp_path.resolve() and target.name.startswith("SmolLM2-135M-Instruct-nf4-")
    double = saves.target_for(LoadSpec(quant=QuantSpec(mode="nf4", double_quant=True)), tmp_path)
    assert double != target  # different settings never share a folder
    odd = LoadSpec(model="../../etc/x", revision="../../..", quant=QuantSpec(mode="int8"))
    escaped = saves.target_for(odd, tmp_path)
    assert escaped.parent == tmp_path.resolve() and ".." not in escaped.name.split("-")[0]


def test_a_save_needs_free_disk_space(loaded_models, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    loaded = loaded_models("nf4")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(SaveError, match="Not enough disk space"):
        hub.save(loaded, tmp_path / "full", NO_FACTS)
    assert not (tmp_path / "full").exists()
