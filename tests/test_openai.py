"""The OpenAI-compatible endpoint, driven by the real `openai` client against a real app process.

The app starts with no model (so the first request meets "no model loaded"), then its owner loads the
embedded model through the UI's API, and collaborators' tools take over: a greedy chat, a stream, raw
completions with a stop string, refused keys, OpenAI-shaped errors, a browser chat and an API stream
sent together, and a stream whose client goes away; then what their programs ask for: log-probabilities,
tool calls (forced, streamed, answered), the /metrics page, parameters refused by name, and JSON-schema
answers in each quantization, last, since it reloads the model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import QUESTION, ROOT, AppProcess, subprocess_env
from test_app import content

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
    send(page, "Write a long story about a lighthouse keeper.")  # long: the API stream joins while it runs
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


WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                      "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                            "parameters": WEATHER_PARAMETERS}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a city",
                                         "parameters": WEATHER_PARAMETERS}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_top_logprobs_give_three_alternatives_per_token_with_the_greedy_token_first(client):
    reply = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3,
                                           messages=[{"role": "user", "content": QUESTION}])
    tokens = reply.choices[0].logprobs.content
    assert len(tokens) == reply.usage.completion_tokens == 8
    for token in tokens:
        assert len(token.top_logprobs) == 3 and token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == token.logprob >= token.top_logprobs[1].logprob
        assert bytes(token.bytes).decode() == token.token
    # one entry per generated token: the model's end token, when it chose one, is the last
    assert "".join(t.token for t in tokens).strip().startswith(reply.choices[0].message.content)
    streamed = [c.choices[0].logprobs.content for c in client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3, stream=True,
        messages=[{"role": "user", "content": QUESTION}]) if c.choices and c.choices[0].logprobs]
    assert [t.token for part in streamed for t in part] == [t.token for t in tokens] and len(streamed) > 1
    raw = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                    logprobs=2)
    logprobs = raw.choices[0].logprobs
    assert len(logprobs.tokens) == 4 and all(len(top) == 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(4)]
    plain = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=2,
                                           messages=[{"role": "user", "content": QUESTION}])
    assert plain.choices[0].logprobs is None


def test_a_required_tool_call_is_valid_streams_as_deltas_and_its_result_is_answered(client):
    jsonschema = pytest.importorskip("jsonschema")
    reply = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=60, tools=[WEATHER, TIME],
                                           tool_choice="required", messages=ASK_WEATHER)
    choice = reply.choices[0]
    (call,) = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and call.id.startswith("call_") and call.type == "function"
    assert call.function.name in ("get_weather", "get_time") and choice.message.content is None
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)

    named = {"type": "function", "function": {"name": "get_time"}}
    chunks = list(client.chat.completions.create(model=MODEL, temperature=0, max_tokens=60, tools=[WEATHER, TIME],
                                                 tool_choice=named, stream=True, messages=ASK_WEATHER))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_time" and len(deltas) > 2
    assert all(d.index == 0 and d.id is None for d in deltas[1:])  # OpenAI's shape: id and name come once
    jsonschema.validate(json.loads("".join(d.function.arguments for d in deltas)), WEATHER_PARAMETERS)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    follow_up = ASK_WEATHER + [choice.message.model_dump(exclude_none=True),
                               {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"}]
    answer = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=40, tools=[WEATHER, TIME],
                                            messages=follow_up)
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    assert "sunny" in answer.choices[0].message.content.lower()


def test_metrics_parse_with_prometheus_clients_parser_and_move_after_a_request(api_app, client):
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{api_app.url}metrics").status_code == 401  # behind the API's key

    def scrape() -> tuple[dict, str]:
        page = httpx.get(f"{api_app.url}metrics", headers=headers)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
        samples = {}
        for family in text_string_to_metric_families(page.text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples, page.text

    route = ("app_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))
    tokens = ("app_generated_tokens_total", (("source", "api"),))
    ttft = ("app_time_to_first_token_seconds_count", (("source", "api"),))
    before, _ = scrape()
    secret = "My locker code is 4417, what is the capital of France?"
    reply = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=5,
                                           messages=[{"role": "user", "content": secret}])
    api_app.client().predict(message=secret, greedy=True, max_new_tokens=3, api_name="/generate")  # the page's chat
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, n=2, messages=[{"role": "user", "content": "hi"}])
    after, text = scrape()
    assert after[route] == before.get(route, 0) + 1
    assert after[("app_requests_total", (("route", "/v1/chat/completions"), ("status", "400")))] >= 1
    assert after[tokens] == before.get(tokens, 0) + reply.usage.completion_tokens
    assert after[ttft] == before.get(ttft, 0) + 1
    ui_tokens = ("app_generated_tokens_total", (("source", "ui"),))
    assert after[ui_tokens] == before.get(ui_tokens, 0) + 3
    assert after[("app_model_info", (("dtype", "float32"), ("kind", "causal LM"), ("quantization", "none")))] == 1
    assert after[("app_queue_waiting", ())] == 0 and ("app_batch_running", ()) in after
    assert after[("process_resident_memory_bytes", ())] > 10**8 and after[("app_model_footprint_bytes", ())] > 10**7
    assert "4417" not in text and KEY not in text and "127.0.0.1" not in text


def test_what_is_not_implemented_is_refused_naming_the_parameter(client):
    hi = [{"role": "user", "content": "hi"}]
    for extra, param in (({"n": 2}, "n"), ({"logit_bias": {"15": 5}}, "logit_bias"),
                         ({"presence_penalty": 0.5}, "presence_penalty"), ({"top_logprobs": 2}, "top_logprobs"),
                         ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                         ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                          "tool_choice"),
                         ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                             "type": "array", "uniqueItems": True}}}}, "response_format.json_schema.schema"),
                         ({"response_format": {"type": "json_object"}, "tools": [WEATHER], "tool_choice": "required"},
                          "response_format")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=hi, **extra)
        assert refused.value.body["param"] == param, refused.value.body
    with pytest.raises(openai.BadRequestError, match="uniqueItems"):
        client.chat.completions.create(model=MODEL, messages=hi, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}})
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="hi", echo=True)
    assert refused.value.body["param"] == "echo"


CITY = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30},
    "population": {"type": "integer", "minimum": 0, "maximum": 100_000_000}},
    "required": ["city", "country", "population"], "additionalProperties": False}


def test_json_schema_answers_validate_in_each_quantization_and_a_text_to_text_model_refuses_them(
        api_app, client, t5_folder):
    jsonschema = pytest.importorskip("jsonschema")
    from gradio_client.exceptions import AppError

    owner = api_app.client()
    history, _ = owner.predict(message="Describe Paris.", greedy=True, max_new_tokens=80, answer_json=True,
                               json_schema=json.dumps(CITY), api_name="/generate")  # the page's "Answer as JSON"
    shown = content(history[-1])
    assert shown.startswith("```json\n"), shown
    jsonschema.validate(json.loads(shown.split("```json\n", 1)[1].split("\n```", 1)[0]), CITY)
    with pytest.raises(AppError, match="uniqueItems"):
        owner.predict(message="hi", answer_json=True, json_schema='{"type": "array", "uniqueItems": true}',
                      api_name="/generate")
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    for quant in ("none", "int8", "nf4"):
        if quant != "none":
            assert "Loaded" in owner.predict(quant=quant, api_name="/load_model")[0]
        reply = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=80, response_format=fmt,
                                               messages=[{"role": "user", "content": "Describe Paris."}])
        assert reply.choices[0].finish_reason == "stop", (quant, reply.choices[0].message.content)
        jsonschema.validate(json.loads(reply.choices[0].message.content), CITY)
    sampled = client.chat.completions.create(model=MODEL, temperature=1.0, seed=3, max_tokens=80, response_format=fmt,
                                             messages=[{"role": "user", "content": "Describe Lyon."}])
    jsonschema.validate(json.loads(sampled.choices[0].message.content), CITY)  # sampled from the masked row too

    assert "Loaded" in owner.predict(model=str(t5_folder), api_name="/load_model")[0]
    t5 = client.models.list().data[0].id
    for extra, param in (({"logprobs": True}, "logprobs"), ({"response_format": {"type": "json_object"}},
                                                            "response_format")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=t5, messages=[{"role": "user", "content": "hi"}], **extra)
        assert refused.value.body["param"] == param
    assert client.chat.completions.create(model=t5, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
