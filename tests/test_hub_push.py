"""Push to a local Hub server with the real huggingface_hub client, then load back with from_pretrained."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from conftest import OTHER_TOKEN, QUESTION, ROOT, WRITE_TOKEN, subprocess_env
from core import fastpath, hub, saves
from core.errors import PushError

_LOAD_BACK = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu")
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def test_push_nf4_round_trip_and_card(loaded_models, hub_server, tmp_path):
    loaded = loaded_models("nf4")
    ids = loaded.tokenizer(QUESTION, return_tensors="pt").input_ids
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = loaded.model(ids).logits  # the canonical model, before the fast path
    fastpath.enable(loaded, fastpath.FastPathChoice("eager", "static", "test"))
    facts = hub.CardFacts(decode_tokens_per_s=12.5, device="cpu", sample_prompt=QUESTION,
                          sample_answer="The capital of France is Paris.")
    result = hub.push(loaded, "alice/smollm2-nf4", token=WRITE_TOKEN, folder=tmp_path / "out", facts=facts,
                      endpoint=hub_server.url)
    assert result.saved_again and "/commit/" in result.commit_url and fastpath.state(loaded).enabled  # as before
    fastpath.reverse(loaded)
    files = hub_server.list_files("alice/smollm2-nf4")
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "generation_config.json"} <= set(files)
    assert saves.MARKER not in files

    card = hub_server.read_file("alice/smollm2-nf4", "README.md").decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["license"] == "apache-2.0"
    assert "nf4" in front["tags"] and "bitsandbytes" in front["tags"]
    assert '"bnb_4bit_quant_type": "nf4"' in card and 'repo = "alice/smollm2-nf4"' in card
    assert 'vllm serve "alice/smollm2-nf4"' in card and "--quantize bitsandbytes-nf4" in card
    assert "12.5 tokens/s" in card and "Paris" in card and "| bitsandbytes | 0.50.2 |" in card

    env = subprocess_env(**{**hub_server.env(tmp_path / "hf-home"), "HF_TOKEN": WRITE_TOKEN})
    done = subprocess.run([sys.executable, "-c", _LOAD_BACK, "alice/smollm2-nf4", str(tmp_path / "ids.pt"),
                           str(tmp_path / "logits.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_failed_push_keeps_folder_and_retry_does_not_save_again(loaded_models, hub_server, tmp_path):
    loaded = loaded_models("nf4")
    folder = tmp_path / "retry"
    with pytest.raises(PushError, match=r"rejected the token \(401\)") as bad:
        hub.push(loaded, "alice/retry-me", token="hf_wrong_token", folder=folder, endpoint=hub_server.url)
    assert "hf_wrong_token" not in str(bad.value) and "kept for a retry" in str(bad.value)
    assert (folder / "model.safetensors").is_file() and bad.value.saved_folder == str(folder)
    with pytest.raises(PushError, match=r"may not write to 'bob' \(403\)"):
        hub.push(loaded, "bob/not-alices", token=WRITE_TOKEN, folder=folder, endpoint=hub_server.url)
    assert OTHER_TOKEN not in str(bad.value)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    retry = hub.push(loaded, "alice/retry-me", token=WRITE_TOKEN, folder=folder, endpoint=hub_server.url)
    assert not retry.saved_again and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert "model.safetensors" in hub_server.list_files("alice/retry-me")


def test_push_refuses_bad_names_missing_tokens_and_unsafe_models(loaded_models, tmp_path):
    loaded = loaded_models("nf4")
    with pytest.raises(PushError, match="not valid: write it as 'your-name/model-name'"):
        hub.push(loaded, "no-namespace", token=WRITE_TOKEN, folder=tmp_path)
    with pytest.raises(PushError, match="No Hugging Face token"):
        hub.push(loaded, "alice/x", token=None, folder=tmp_path)


def test_publish_space_to_local_hub(hub_server, tmp_path):
    env = subprocess_env(**{**hub_server.env(tmp_path / "hf-home"), "HF_TOKEN": WRITE_TOKEN})
    done = subprocess.run([sys.executable, "-m", "space.publish", "alice/quantized-llm"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "published:" in done.stdout and WRITE_TOKEN not in done.stdout + done.stderr
    from space.publish import space_files

    files = set(hub_server.list_files("alice/quantized-llm", repo_type="space"))
    assert files == set(space_files()) | {".gitattributes"}
    front = yaml.safe_load(hub_server.read_file("alice/quantized-llm", "README.md", repo_type="space")
                           .decode().split("---")[1])
    assert front["sdk"] == "gradio" and front["app_file"] == "app.py" and front["hf_oauth"] is True
    import gradio

    assert front["sdk_version"] == gradio.__version__ and "write-repos" in front["hf_oauth_scopes"]
    space = tmp_path / "space"
    for name in files - {".gitattributes"}:
        (space / name).parent.mkdir(parents=True, exist_ok=True)
        (space / name).write_bytes(hub_server.read_file("alice/quantized-llm", name, repo_type="space"))
    build = ("import app; from server.settings import parse_args; from ui.blocks import build; "
             "from server.context import AppContext; build(AppContext.create(parse_args([]))); print('ok')")
    imported = subprocess.run([sys.executable, "-c", build], cwd=space,
                              env={**env, "PYTHONPATH": str(space)}, capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0 and imported.stdout.strip().endswith("ok"), imported.stderr[-2000:]
