"""The real app in its own process, as its owner uses it locally, driven through gradio_client and raw HTTP.

Tests follow what users do, in that order: chat, save, chat again, reload the save elsewhere; press
Stop, then chat from another client; sixteen visitors at once with a load sent among them; a client
that goes away mid-answer.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from gradio_client.exceptions import AppError

from conftest import OTHER_TOKEN, QUESTION, WRITE_TOKEN, subprocess_env

GREEDY = dict(max_new_tokens=16, greedy=True)
LONG = dict(max_new_tokens=500, greedy=True)
STORY = "Write a very long story about a lighthouse keeper and his cat."
FOOTER = re.compile(r"\n\n\*(stopped · )?answered by (?P<by>[^\n]*)\*\s*$")


def content(message: dict) -> str:
    value = message["content"]
    return value if isinstance(value, str) else "".join(part.get("text", "") for part in value)


def ask(client, message=QUESTION, **sampling) -> tuple[list[dict], str]:
    return client.predict(message=message, **{**GREEDY, **sampling}, api_name="/generate")


def answer(client, message=QUESTION, **sampling) -> tuple[str, str]:
    """(the reply without its footer, who answered it)."""
    history, _ = ask(client, message, **sampling)
    text = content(history[-1])
    footer = FOOTER.search(text)
    assert footer, text  # every answer says which model and quantization produced it
    return text[:footer.start()], footer.group("by").replace("\\", "")


def test_api_names_and_named_parameters(client):
    from core import load_form

    names = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/plan", "/load_model", "/generate", "/stop", "/set_fast_path", "/save_model", "/push_to_hub",
            "/compare", "/check_fit", "/quality"} <= set(names)
    params = {name: [p["parameter_name"] for p in names[name]["parameters"]] for name in names}
    form = ["model", "revision", "dtype", "quant", "compute_dtype", "double_quant", "quant_storage", "int8_threshold",
            "skip_modules", "fp32_cpu_offload", "device_map", "max_memory", "fast_path", "fast_path_compile"]
    assert list(load_form.NAMES) == form  # the names scripts use, from the form's one table
    assert params["/load_model"] == params["/plan"] == form and "trust_remote_code" not in params["/load_model"]
    assert params["/check_fit"] == [*form, "context_length", "batch_size"]
    defaults = {p["parameter_name"]: p["parameter_default"] for p in names["/load_model"]["parameters"]}
    assert defaults == load_form.DEFAULTS
    shown = client.predict(quant="nf4", max_memory="0=100MB, 1=1GiB", api_name="/plan")  # two fields named
    assert "cuda:0" in shown and "cuda:1" in shown and "nf4" in shown
    assert "Planned for 2 GPUs; this machine has no GPU" in shown


def test_the_default_settings_answer_paris_in_at_least_19_of_20_seeded_runs(app):
    visitor = app.client()  # only the message and a seed: everything else as the form starts
    answers = [content(visitor.predict(message=QUESTION, seed=seed, api_name="/generate")[0][-1])
               for seed in range(20)]
    assert sum("Paris" in a for a in answers) >= 19, answers


def test_sampling_defaults_come_from_the_models_generation_config(client, checkpoint, tmp_path):
    from conftest import tiny_model

    folder = tiny_model(tmp_path / "sampler", checkpoint, do_sample=True, temperature=0.6, top_p=0.95, top_k=20)
    try:
        _, _, greedy, temperature, top_p, top_k, _, note = client.predict(model=str(folder), api_name="/load_model")
        assert (greedy, temperature, top_p, top_k) == (False, 0.6, 0.95, 20)
        assert "from the model's generation config (do_sample True, temperature 0.6, top_p 0.95, top_k 20)" in note
    finally:
        _, _, greedy, *_, note = client.predict(api_name="/load_model")
    assert greedy is True and "sets none, so greedy" in note


def test_preloaded_default_model_answers_and_every_answer_keeps_its_author(client):
    history, metrics = ask(client)
    assert history[-1]["role"] == "assistant" and "Paris" in content(history[-1])
    assert "tok/s" in metrics and "TTFT" in metrics and "answered by" in metrics
    longer, _ = ask(client, "And of Italy?", history=history)
    labels = [FOOTER.search(content(m)) for m in longer if m["role"] == "assistant"]
    assert len(labels) == 2 and all(labels)  # the earlier answer keeps its label in the returned chat


_RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu")
text = tokenizer.apply_chat_template([{"role": "user", "content": sys.argv[2]}], add_generation_prompt=True,
                                     tokenize=False)
ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
out = model.generate(**ids, max_new_tokens=16, do_sample=False)
print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
"""


def test_chat_save_chat_again_then_reload_the_save_elsewhere(client, app):
    status, fast = client.predict(quant="nf4", api_name="/load_model")[:2]
    assert "4-bit NF4" in status and fast is False
    first, by = answer(client)
    assert "Paris" in first and by.endswith("nf4")
    assert "Fast path on" in client.predict(True, api_name="/set_fast_path")
    saved = client.predict(api_name="/save_model")
    assert "Saved" in saved and "model.safetensors" in saved.replace("\\", "")
    assert answer(client) == (first, by)  # the save changed nothing
    folder = max(app.save_dir.glob("*-nf4-*"), key=lambda p: p.stat().st_mtime)
    done = subprocess.run([sys.executable, "-c", _RELOAD, str(folder), QUESTION], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == first.strip()
    assert "Fast path off" in client.predict(False, api_name="/set_fast_path")


def test_stop_mid_answer_then_other_clients_and_actions_complete(app, client):
    job = client.submit(message=STORY, **LONG, api_name="/generate")
    deadline = time.time() + 60
    while time.time() < deadline and not any("Generating" in str(out[1]) for out in job.outputs()):
        time.sleep(0.2)
    time.sleep(1.0)
    client.predict(api_name="/stop")
    history, status = job.result(timeout=30)
    assert status.startswith("Stopped") and "stopped · answered by" in content(history[-1])
    partial = FOOTER.sub("", content(history[-1]))
    assert 0 < len(partial.split()) < 300  # a partial answer, not the whole story
    other = app.client()  # another client's chat, fast-path toggle and save all complete after the Stop
    assert "Paris" in answer(other)[0]
    assert other.predict(False, api_name="/set_fast_path").startswith("Fast path off")
    assert "Saved" in other.predict(api_name="/save_model")


def test_sixteen_visitors_at_once_and_a_load_sent_among_them(app):
    prompts = [QUESTION, "Name a primary color.", "What is 2 + 2?", "Say hello in French."]
    alone = {p: answer(app.client(), p) for p in prompts}
    assert all(by == alone[QUESTION][1] for _, by in alone.values())
    clients = [app.client() for _ in range(16)]
    jobs = [c.submit(message=prompts[i % 4], **GREEDY, api_name="/generate") for i, c in enumerate(clients)]
    for job in jobs:  # each has had its first update, so it is in the worker's queue before the load
        deadline = time.time() + 60
        while not job.outputs() and time.time() < deadline:
            time.sleep(0.05)
    loader = app.client()
    load = loader.submit(quant="fp4", api_name="/load_model")
    for i, job in enumerate(jobs):
        history, _ = job.result(timeout=300)
        text = content(history[-1])
        reply = FOOTER.sub("", text)
        assert (reply, FOOTER.search(text).group("by").replace("\\", "")) == alone[prompts[i % 4]], i
    assert "4-bit FP4" in load.result(timeout=300)[0]
    assert answer(app.client())[1].endswith("fp4")  # the load took effect after the sixteen, not among them
    app.client().predict(api_name="/load_model")  # back to the default


def test_a_client_that_disconnects_mid_stream_stops_its_generation(app):
    import httpx

    probe = app.client()
    fn_index = probe._infer_fn_index("/generate", None)
    session = "disconnect-test"
    payload = {"data": [STORY, [], 500, True, 0.7, 0.9, 50, 1.0, -1, "", False, ""], "fn_index": fn_index,
               "session_hash": session, "event_data": None, "trigger_id": None}
    with httpx.Client(base_url=app.url, timeout=30) as http:
        assert http.post("gradio_api/queue/join", json=payload).status_code == 200
        with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if "Generating" in line:
                    break  # tokens are flowing: now go away, as a closed tab does
    deadline = time.time() + 60
    while "went away; the answer stops" not in app.log() and time.time() < deadline:
        time.sleep(0.2)
    assert "went away; the answer stops" in app.log()  # the handler was closed and cancelled its request
    history, status = ask(app.client())
    assert "Paris" in content(history[-1])
    assert "answered together" not in status  # the story left the batch: this answer ran alone


def test_bad_inputs_get_readable_errors_and_the_model_keeps_answering(client, app, tmp_path):
    start = len(app.log())
    with pytest.raises(AppError, match=r"max_memory=.*like '600MB'") as bad_budget:
        client.predict(max_memory="0=lots", api_name="/load_model")
    assert "Traceback" not in str(bad_budget.value)
    with pytest.raises(AppError, match="no such local folder"):
        client.predict(model=str(tmp_path / "nowhere"), api_name="/load_model")
    with pytest.raises(AppError, match="names GPU 0, but this machine has no GPU"):
        client.predict(device_map="cuda:0", api_name="/load_model")
    with pytest.raises(AppError, match=r"The CPU budget \(cpu=100MB\) cannot hold the whole int8") as cpu_only:
        client.predict(quant="int8", max_memory="cpu=100MB", api_name="/load_model")
    assert "GPU" not in str(cpu_only.value)  # a budget that names no GPU gets no GPU advice
    with pytest.raises(AppError, match="type a message first"):
        client.predict(message="  ", api_name="/generate")
    with pytest.raises(AppError, match="not valid: write it as 'your-name/model-name'"):
        client.predict(repo_id="no-namespace", api_name="/push_to_hub")
    assert "Paris" in answer(client)[0]
    logged = app.log()[start:]
    assert "Traceback" not in logged  # ordinary user errors: one line each, no stack trace
    assert logged.count(" refused: ") == 6, logged


def test_compare_runs_variants_side_by_side(client):
    table = client.predict(QUESTION, ["none", "nf4", "nf4"], 12, api_name="/compare")
    assert "| none |" in table and "| nf4 |" in table and "100%" in table  # full precision agrees with itself
    assert table.count("| nf4 |") == 1  # each variant once
    header, _, reference, nf4 = table.splitlines()[:4]
    assert header.split("|")[3].strip() == "tokens"
    length = int(reference.split("|")[3])
    assert 0 < length <= 12 and f"100% of the first {length} |" in reference  # says how long the answer was
    assert int(nf4.split("|")[3]) > 0 and "% of the first " in nf4
    assert "Paris" in answer(client)[0]  # the user's model is back


def test_push_to_local_hub_and_bad_repo(client, hub_server):
    shown = client.predict("alice/smollm2-app-push", True, "From the app", api_name="/push_to_hub")
    assert "Pushed" in shown and "/commit/" in shown and WRITE_TOKEN not in shown
    assert "model.safetensors" in hub_server.list_files("alice/smollm2-app-push")
    card = hub_server.read_file("alice/smollm2-app-push", "README.md").decode()
    assert 'repo = "alice/smollm2-app-push"' in card
    with pytest.raises(AppError, match="may not write to 'bob'"):
        client.predict("bob/not-mine", True, "x", api_name="/push_to_hub")
    with pytest.raises(AppError, match="not valid"):
        client.predict("no namespace here!", True, "x", api_name="/push_to_hub")
    assert OTHER_TOKEN  # bob exists on the server; alice's token just may not write there


def test_check_fit_says_what_is_missing_and_offers_fixes(client, app):
    shown, fixes, *_ = client.predict(max_memory="0=300MB", context_length=8192, batch_size=1, api_name="/check_fit")
    assert "**Does not fit**: needs" in shown and "MiB more on cuda:0" in shown and "KV cache" in shown
    assert "Quantize to 4-bit NF4" in shown
    assert "Planned for 1 GPU; this machine has no GPU" in shown
    fits = client.predict(quant="nf4", context_length=512, batch_size=1, api_name="/check_fit")[0]
    assert fits.startswith("**Fits**")
    two = client.predict(quant="int8", max_memory="0=150MB, 1=1GiB", api_name="/check_fit")[0]
    assert "needs 41 MiB more on cuda:0" in two  # while cuda:1 has room: the first fix moves the model there
    assert two.split("press *Apply fix*):\n")[1].startswith("- Put the whole model on cuda:1")
    assert "is not available, available devices are" not in app.log()  # planning for absent GPUs is the point


def test_int8_chats_leave_a_quiet_log_and_the_quality_check_compares_with_full_precision(client, app):
    client.predict(quant="int8", api_name="/load_model")
    start = len(app.log())
    for _ in range(5):
        assert answer(client, max_new_tokens=4)[1].endswith("int8")
    logged = app.log()[start:]
    cast = [line for line in logged.splitlines() if "inputs will be cast" in line]
    assert 1 <= len(cast) <= 2, len(cast)  # said once (bitsandbytes says it at every int8 matmul), with its meaning
    assert "LLM.int8() quantizes each layer's input from float16" in cast[0]
    assert "Failed to load CPU gemm_4bit_forward" not in app.log()  # (said only on CPUs with AVX512-BF16)
    shown = client.predict(api_name="/quality")
    assert "Quality of int8" in shown and "next-token agreement" in shown and "| 100% |" in shown
    assert "lower perplexity is better" in shown
    assert "Paris" in answer(client)[0]
    client.predict(api_name="/load_model")
