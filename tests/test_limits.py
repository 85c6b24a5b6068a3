"""Strangers' load and input, replayed against real app processes: every limit refuses with its name and value,
a failed load never loses the model, every field is validated, and names reach the page escaped.

Each test checks that nothing was lost afterwards: the model still answers, the queue still moves.
"""

from __future__ import annotations

import json
import re
import shutil
import time

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from conftest import QUESTION, WRITE_TOKEN, AppProcess, tiny_model
from test_app import STORY, answer, content


def still_answers(client) -> None:
    assert "Paris" in answer(client)[0]  # an answer at all: a stuck queue or a lost model would never give one


# ----------------------------------------------------------------------------- limits


def test_oversized_input_is_refused_with_its_limit_and_others_are_served(shared_app):
    visitor = shared_app.client()
    with pytest.raises(AppError, match=r"1,000,000 characters; the limit is 16,000 \(APP_MAX_MESSAGE_CHARS=16000\)"):
        answer(visitor, "x" * 1_000_000)
    with pytest.raises(AppError, match=r"at most 2,048 fit: the app's limit \(APP_MAX_INPUT_TOKENS=2048\)"):
        answer(visitor, "Paris is lovely. " * 900)  # 15,300 characters, about 4,500 tokens
    with pytest.raises(AppError, match=r"Value 1024 is greater than maximum value 512"):  # the slider's own bound
        answer(visitor, QUESTION, max_new_tokens=1024)
    still_answers(shared_app.client())


@pytest.fixture(scope="module")
def busy_app(checkpoint, hub_server, session_dir):
    """A visitor app with a tiny queue and a low rate, to reach both limits. It also carries a Space's settings copied
    to a machine that is not a Space (SPACE_ID, SPACE_AUTHOR_NAME, the OAuth variables, no SYSTEM=spaces), with the
    owner's HF_TOKEN: where Gradio would mount its mocked sign-in, which logs anyone in as the token's user."""
    env = {**hub_server.env(session_dir / "busy-hf-home"), **hub_server.oauth_client("copied", "copied-secret"),
           "SPACE_ID": "alice/quantized-llm", "SPACE_AUTHOR_NAME": "alice", "HF_TOKEN": WRITE_TOKEN,
           "APP_SHARED": "1", "APP_QUEUE_SIZE": "2", "APP_RATE_LIMIT": "12"}
    process = AppProcess("busy-app", session_dir, env)
    yield process
    process.stop()


def test_the_queue_and_the_visitor_rate_are_bounded(busy_app):
    clients = [busy_app.client() for _ in range(4)]
    running = clients[0].submit(message=STORY, max_new_tokens=300, greedy=True, api_name="/generate")
    while not running.outputs():
        time.sleep(0.05)
    waiting = [c.submit(message=QUESTION, max_new_tokens=8, greedy=True, api_name="/generate") for c in clients[1:3]]
    for job in waiting:
        while not job.outputs():
            time.sleep(0.05)
    with pytest.raises(AppError, match=r"queue is full: 2 requests are waiting .*limit 2, APP_QUEUE_SIZE=2"):
        answer(clients[3])
    with pytest.raises(AppError, match=r"visitors may send 12 a minute \(APP_RATE_LIMIT=12\)"):
        answer(clients[3])  # the fifth request from this address within a second
    clients[0].predict(api_name="/stop")
    assert running.result(timeout=60)[1].startswith("Stopped")
    assert all("Paris" in content(job.result(timeout=60)[0][-1]) for job in waiting)
    time.sleep(5.5)  # one request's worth of the rate comes back
    still_answers(busy_app.client())


def test_copied_space_settings_give_no_sign_in_and_no_owner(busy_app):
    with httpx.Client(base_url=busy_app.url) as http:
        login = http.get("login/huggingface", follow_redirects=True)
    assert login.status_code == 404  # Gradio's mocked sign-in, which would log anyone in as alice, is not mounted
    set_cookies = [c for r in (*login.history, login) for c in r.headers.get_list("set-cookie")]
    sessions = [m.group(1) for c in set_cookies if (m := re.match(r"session=([^;]+)", c))]
    visitor = Client(busy_app.url, headers={"Cookie": f"session={sessions[-1]}"} if sessions else {}, verbose=False)
    for api, args in (("/set_fast_path", (True,)), ("/save_model", ())):
        with pytest.raises(AppError, match="Only the owner of this app may"):
            visitor.predict(*args, api_name=api)
    assert "SPACE_ID=alice/quantized-llm is set, but this is not a Hugging Face Space" in busy_app.log()
    assert not busy_app.save_dir.exists() or not any(busy_app.save_dir.iterdir())


def test_without_a_trusted_proxy_a_forged_address_gets_no_new_allowance(busy_app):
    from test_space import spend_the_burst

    visitor = busy_app.client()
    spend_the_burst(visitor, {})
    for forged in ("203.0.113.5", "203.0.113.6, 198.51.100.7"):  # uvicorn would believe these from a loopback peer
        with pytest.raises(AppError, match=r"visitors may send 12 a minute \(APP_RATE_LIMIT=12\)"):
            visitor.predict(message="", api_name="/generate", headers={"X-Forwarded-For": forged})


# ----------------------------------------------------------------------------- loads that fail


def test_a_load_that_fails_in_any_way_keeps_the_previous_model(client, checkpoint, tmp_path):
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(checkpoint / "config.json", no_weights / "config.json")
    corrupt = tiny_model(tmp_path / "corrupt", checkpoint)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    config_only = tmp_path / "bad-config"
    config_only.mkdir()
    (config_only / "config.json").write_text("{not json")
    for folder, refusal in ((no_weights, "previous model was loaded again"),
                            (corrupt, r"Loading failed .*previous model was loaded again"),
                            (config_only, "config.json is not valid JSON")):
        with pytest.raises(AppError, match=refusal):
            client.predict(model=str(folder), api_name="/load_model")
        still_answers(client)


@pytest.mark.parametrize("budget,quant,offload", [("cpu=100MB", "none", False), ("disk=1GB", "none", False),
                                                  ("cpu=50MB", "int8", True)])
def test_budgets_that_would_strand_weights_are_refused_before_loading(client, budget, quant, offload):
    with pytest.raises(AppError, match="no room on a GPU or the CPU"):
        client.predict(max_memory=budget, quant=quant, fp32_cpu_offload=offload, api_name="/load_model")
    still_answers(client)


# ----------------------------------------------------------------------------- escaping


@pytest.fixture()
def default_model_after(client):
    yield
    client.predict(api_name="/load_model")


def test_names_reach_the_page_as_text(client, app, checkpoint, tmp_path, default_model_after, browser):
    folder = tiny_model(tmp_path / "m`<img src=x onerror=alert(1)>`", checkpoint)
    shown = client.predict(model=str(folder), api_name="/load_model")[0]
    assert "<img" not in shown and "&lt;img src=x onerror=alert\\(1\\)&gt;" in shown and "\\`" in shown
    history, metrics = client.predict(message="Hi", max_new_tokens=4, greedy=True, api_name="/generate")
    assert "<img" not in content(history[-1]) and "<img" not in metrics
    page = browser.new_page()
    page.goto(app.url)
    page.get_by_text("footprint").first.wait_for(timeout=60_000)
    assert page.locator("img[src='x']").count() == 0
    assert "<img src=x onerror=alert(1)>" in page.locator("body").inner_text()  # shown, as text
    page.close()


# ----------------------------------------------------------------------------- every field validated


@pytest.mark.parametrize("fields,refusal", [
    (dict(model="a" * 500), r"model='a{77}\.\.\.' is not valid: .*Hub id"),
    (dict(revision="v9"), r"revision='v9' is not valid: a revision applies to Hub models only"),
    (dict(int8_threshold=-1, quant="int8"), r"int8_threshold=-1.0 is not valid"),
    (dict(max_memory="0=1GB, 0=2GB"), r"max_memory=.* is not valid: device 0 is named twice"),
])
def test_load_fields_are_validated_by_name(client, fields, refusal):
    with pytest.raises(AppError, match=refusal):
        client.predict(**fields, api_name="/load_model")


@pytest.mark.parametrize("seed", [-5, 2**32])
def test_seed_range(client, seed):
    with pytest.raises(AppError, match=rf"seed={seed} is not valid: use -1 \(random\) or a whole number from 0"):
        client.predict(message=QUESTION, seed=seed, api_name="/generate")


@pytest.mark.parametrize("context,refusal", [(-4, "context_length=-4"), (10**12, "context_length=1000000000000"),
                                             (0, "context_length=0")])
def test_fit_inputs(client, context, refusal):
    with pytest.raises(AppError, match=refusal + r" is not valid: use a number of tokens from 1 to 1,048,576"):
        client.predict(context_length=context, api_name="/check_fit")


def test_missing_revision_and_malformed_history(client, hub_server):
    if ("model", "alice/revisioned") not in hub_server.repos:
        hub_server.create_repo("alice/revisioned")
        hub_server.add_files("alice/revisioned", {"config.json": json.dumps({"model_type": "llama"}).encode()})
    with pytest.raises(AppError, match="has no revision 'nope'"):
        client.predict(model="alice/revisioned", revision="nope", api_name="/plan")
    for history in ([{"role": "wizard", "content": "x"}], {"role": "user"}, ["hi"]):
        with pytest.raises(AppError, match=r"history=.* is not valid: send a list of \{'role': 'user'") as malformed:
            client.predict(message=QUESTION, history=history, api_name="/generate")
        assert "Unexpected" not in str(malformed.value) and "pydantic" not in str(malformed.value)
    still_answers(client)
