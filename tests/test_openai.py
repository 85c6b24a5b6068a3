"""The OpenAI-compatible endpoint, driven by the real `openai` client against a real app process.

The app starts with no model (so the first request meets "no model loaded"), then its owner loads the
embedded model through the UI's API, and collaborators' tools take over: a greedy chat, a stream, raw
completions with a stop string, refused keys, OpenAI-shaped errors, a browser chat and an API stream
sent together, and a stream whose client goes away.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import QUESTION, ROOT, AppProcess, subprocess_env

KEY = "sk-test-0123456789"
MODEL = "SmolLM2-135M-Instruct"
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def api_app(checkpoint, session_dir):
    process = AppProcess("api-app", session_dir, {"APP_OPENAI_API": "1", "APP_API_KEY": KEY, "APP_PRELOAD": "0"})
    empty = httpx.post(f"{process.url}v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert empty.status_code == 503 and empty.json()["error"]["code"] == "model_not_loaded"
    assert "Loaded" in process.client().predict(api_name="/load_model")[0]  # the owner loads, in the UI
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(api_app):
    return openai.OpenAI(base_url=f"{api_app.url}v1", api_key=KEY, max_retries=0)


def test_models_lists_the_loaded_model(client):
    (model,) = client.models.list().data
    assert model.id == MODEL and model.model_extra["quantization"] == "none"


def test_a_greedy_chat_completion_answers_with_usage_and_metrics(client):
    reply = client.chat.completions.create(model=MODEL, temperature=0, messages=[{"role": "user", "content": QUESTION}])
    assert "Paris" in reply.choices[0].message.content and reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 10 and reply.usage.completion_tokens > 2
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    metrics = reply.model_extra["metrics"]
    assert metrics["ttft_s"] > 0 and metrics["decode_tokens_per_s"] > 0


def test_streaming_yields_several_chunks_then_the_whole_answer(client):
    whole = client.chat.completions.create(model=MODEL, temperature=0,
                                           messages=[{"role": "user", "content": QUESTION}]).choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": QUESTION}]))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 2


def test_raw_completions_with_a_stop_string_and_a_length_limit(client):
    stopped = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
                                        stop=["."])
    assert stopped.choices[0].text.strip() == "Paris" and stopped.choices[0].finish_reason == "stop"
    long = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 5


def test_a_wrong_or_missing_key_is_refused(api_app):
    for key in ("sk-wrong", ""):
        with pytest.raises(openai.AuthenticationError, match="Incorrect or missing API key"):
            openai.OpenAI(base_url=f"{api_app.url}v1", api_key=key or "x", max_retries=0,
                          default_headers={} if key else {"Authorization": ""}).models.list()


def test_errors_have_openais_shape_and_a_fitting_status(api_app, client):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bad_json = httpx.post(f"{api_app.url}v1/chat/completions", headers=headers, content=b"{not json")
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError, match="'gpt-4' is not loaded here"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match=r"max_tokens=4096 is over the limit of 512 \(APP_MAX_NEW_TOKENS"):
        client.chat.completions.create(model=MODEL, max_tokens=4096, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="only text content"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])


def test_a_browser_chat_and_an_api_stream_sent_together_are_answered_together(api_app, client, browser):
    from test_browser import open_page, send

    page = open_page(browser, api_app.url)
    page.evaluate("""() => { window.__times = []; setInterval(() => {
        const t = (document.querySelector('#chat-status') || {}).innerText || '';
        if (!window.__times.length || window.__times[window.__times.length - 1][1] !== t)
            window.__times.push([Date.now(), t]); }, 10); }""")
    api_times: list[float] = []
    api_text: list[str] = []

    def stream() -> None:
        for chunk in client.chat.completions.create(model=MODEL, temperature=0, stream=True, max_tokens=60,
                                                    messages=[{"role": "user", "content": "Tell me about Paris."}]):
            if chunk.choices and chunk.choices[0].delta.content:
                api_times.append(time.time() * 1000)
                api_text.append(chunk.choices[0].delta.content)

    worker = threading.Thread(target=stream)
    send(page, QUESTION)
    worker.start()
    worker.join(120)
    page.wait_for_function("() => window.__times.some(([_, t]) => t.includes('tok/s'))", timeout=120_000)
    times = page.evaluate("window.__times")
    browser_start = min(t for t, text in times if text.startswith("Generating"))
    browser_end = min(t for t, text in times if "tok/s" in text)
    assert "Paris" in "".join(api_text) and api_times
    assert api_times[0] < browser_end and browser_start < api_times[-1]  # one running batch: they overlap
    assert any("answered together with 1 other" in text for _, text in times)
    page.close()


def test_a_client_that_disconnects_mid_stream_frees_the_worker(api_app, client):
    body = {"model": MODEL, "stream": True, "max_tokens": 500, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}]}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{api_app.url}v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {KEY}"}) as response:
            for line in response.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # the story has begun: hang up
    started = time.perf_counter()
    reply = client.chat.completions.create(model=MODEL, temperature=0, messages=[{"role": "user", "content": QUESTION}])
    assert "Paris" in reply.choices[0].message.content
    assert time.perf_counter() - started < 8  # the story (500 tokens, about 20 s here) was stopped


def test_the_api_never_opens_a_way_around_a_login(session_dir):
    for extra, env in ((["--api"], {"APP_SHARED": "1"}), (["--api", "--auth", "alice:pw"], {})):
        done = subprocess.run([sys.executable, "app.py", *extra], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env=subprocess_env(**env, APP_PRELOAD="0"))
        assert done.returncode != 0 and "needs APP_API_KEY" in done.stderr, done.stderr[-1000:]


def test_the_api_is_off_unless_enabled(app):
    assert httpx.get(f"{app.url}v1/models").status_code == 404  # the owner's app, started without --api
