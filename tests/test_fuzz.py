"""Property-based fuzzing of /plan, /check_fit, /load_model and /generate (history and system prompt included) and of
the OpenAI-compatible /v1 routes, against real app processes (hypothesis).

Each example changes one to three fields from their defaults to valid, odd or hostile values. Every
response must be a result or a readable refusal, never "Unexpected error" or a 500, and the server log must
not gain a single unexpected-error traceback. The example counts are bounded (and derandomized) so
that CI takes about a minute for the lot; the model must still answer afterwards.
"""

from __future__ import annotations

import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import QUESTION, SHARED_API_KEY
from test_app import answer

ODD_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
SIZES = st.sampled_from(["", "0=1GB", "cpu=100MB", "cpu=8GB", "disk=1GB", "0=-1GB", "cpu=1e9GB", "1=2GiB, cpu=4GB",
                         "cpu=0MB", "x", "0=1GB,0=1GB", "{}", "cpu:8GB"])
LOAD_FIELDS = {
    "model": st.one_of(st.sampled_from(["", "embedded", "HuggingFaceTB/nope", "a" * 300, "../x", "/nonexistent",
                                        "org/na me", "x/y/z", "~", "/", "org/" + "b" * 97]), ODD_TEXT),
    "revision": st.one_of(st.sampled_from(["", "main", "v1", "../..", "a" * 300]), ODD_TEXT),
    "dtype": st.sampled_from(["auto", "float32", "bfloat16", "float16", "int4", ""]),
    "quant": st.sampled_from(["none", "int8", "fp4", "nf4", "int4", ""]),
    "compute_dtype": st.sampled_from(["auto", "float32", "bfloat16", "float16", "uint8"]),
    "double_quant": st.booleans(),
    "quant_storage": st.sampled_from(["uint8", "bfloat16", "float16", "float32", "int8"]),
    "int8_threshold": st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.integers(-(10**12), 10**12)),
    "skip_modules": st.one_of(st.sampled_from(["lm_head", "model.layers.0", ",,,"]), ODD_TEXT),
    "fp32_cpu_offload": st.booleans(),
    "device_map": st.one_of(st.sampled_from(["auto", "balanced", "sequential", "cpu", "cuda:0", "cuda:7", "disk",
                                             "meta", "", "-1"]), ODD_TEXT),
    "max_memory": st.one_of(SIZES, ODD_TEXT),
    "fast_path": st.booleans(),
    "fast_path_compile": st.booleans(),
}
FIT_FIELDS = {**LOAD_FIELDS, "context_length": st.integers(-(10**13), 10**13),
              "batch_size": st.integers(-5, 10**7)}
CONTENT = st.one_of(ODD_TEXT, st.none(), st.integers(), st.just("z" * 17_000),
                    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": ODD_TEXT}), max_size=2))
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", ""]),
                                 "content": CONTENT})
HISTORY = st.one_of(st.none(), st.lists(MESSAGE, max_size=4), st.sampled_from(["text", 5, {"role": "user"}, [[1]],
                                                                               [{"content": "x"}], {}]),
                    st.just([{"role": "user", "content": "hi"}] * 250),
                    st.just([{"role": "user", "content": "w" * 15_000}] * 5))
CHAT_FIELDS = {
    "message": st.one_of(st.just(QUESTION), st.just(""), ODD_TEXT, st.text(min_size=2000, max_size=3000)),
    "history": HISTORY,
    "max_new_tokens": st.one_of(st.integers(-5, 12), st.sampled_from([513, 10**9])),
    "greedy": st.booleans(),
    "temperature": st.one_of(st.floats(-1, 3, allow_nan=False), st.sampled_from([0.0, 1e-9])),
    "top_p": st.floats(-0.5, 1.5, allow_nan=False),
    "top_k": st.integers(-10, 500),
    "repetition_penalty": st.floats(-1, 5, allow_nan=False),
    "seed": st.one_of(st.integers(-(2**40), 2**40), st.just(-1)),
    "system_prompt": st.one_of(ODD_TEXT, st.just("s" * 20_000)),
}
MODEL = "SmolLM2-135M-Instruct"
V1_TEXT = st.one_of(ODD_TEXT, st.just("\ud800"), ODD_TEXT.map(lambda text: text + "\udfff"), st.just("x" * 17_000))
V1_NUMBER = st.one_of(st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
                      st.sampled_from([513, 10**30, 2.5, "2", "two", True, None, [1], {}]))
V1_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", 5]),
                                    "content": st.one_of(V1_TEXT, st.none(), st.just([{"type": "text", "text": "hi"}]),
                                                         st.just([{"type": "image_url", "image_url": {"url": "x"}}]))})
V1_COMMON = {
    "model": st.one_of(st.just(MODEL), st.sampled_from(["", "gpt-4", "m" * 2000, None, 5, [MODEL]]), V1_TEXT),
    "max_tokens": st.one_of(st.integers(-3, 3), st.sampled_from([513, 10**30, 2.5, "2", True, float("inf"),
                                                                 float("nan"), [2]])),
    "temperature": V1_NUMBER, "top_p": V1_NUMBER, "seed": st.one_of(V1_NUMBER, st.integers(-(2**70), 2**70)),
    "n": V1_NUMBER,
    "stop": st.one_of(st.none(), V1_TEXT, st.lists(V1_TEXT, max_size=6), st.just(["y" * 200]), st.just(5)),
    "stream": st.one_of(st.booleans(), st.just("yes")),
    "stream_options": st.sampled_from([None, {"include_usage": True}, "yes", []]),
}
V1_CHAT = {**V1_COMMON, "messages": st.one_of(
    st.lists(V1_MESSAGE, min_size=1, max_size=3),
    st.sampled_from([[], "hi", None, {"role": "user"}, [["user", "hi"]]]),
    st.just([{"role": "user", "content": "hi"}] * 300))}
V1_COMPLETION = {**V1_COMMON, "prompt": st.one_of(V1_TEXT, st.lists(V1_TEXT, max_size=2), st.none(), st.just(5))}
FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck),
                print_blob=True)


def some_of(fields: dict) -> st.SearchStrategy[dict]:
    names = st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3, unique=True)
    return names.flatmap(lambda chosen: st.fixed_dictionaries({name: fields[name] for name in chosen}))


def call(client, api: str, **fields):
    from gradio_client.exceptions import AppError

    try:
        return client.predict(**fields, api_name=api)
    except AppError as refused:
        message = str(refused)
        assert "Unexpected error" not in message and "Traceback" not in message, (api, fields, message)
        return None


def test_fuzzed_fields_get_results_or_readable_refusals(client, app):
    start = len(app.log())

    for api, fields, examples in (("/plan", LOAD_FIELDS, 40), ("/check_fit", FIT_FIELDS, 40),
                                  ("/load_model", LOAD_FIELDS, 20), ("/generate", CHAT_FIELDS, 30)):
        base = {"message": QUESTION} if api == "/generate" else {}

        @settings(FUZZ, max_examples=examples)
        @given(some_of(fields))
        def fuzz(chosen):
            call(client, api, **{**base, **chosen})

        fuzz()
    new_log = app.log()[start:]
    assert "unexpected error in" not in new_log, new_log[new_log.find("unexpected error in"):][:3000]
    client.predict(api_name="/load_model")
    assert "Paris" in answer(client)[0]


def post_v1(app, path: str, body: dict) -> None:
    """One request with a JSON body the json module writes (NaN, Infinity and lone surrogates included)."""
    response = httpx.post(f"{app.url}v1/{path}", content=json.dumps(body, allow_nan=True).encode(), timeout=120,
                          headers={"Authorization": f"Bearer {SHARED_API_KEY}", "Content-Type": "application/json"})
    assert response.status_code != 500 and "Internal Server Error" not in response.text, (path, body, response.text)
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]"), (body, response.text)  # an error arrives as an event
    else:
        reply = response.json()
        assert ("error" in reply) == (response.status_code >= 400), (body, reply)
        assert "Unexpected error" not in response.text


def test_fuzzed_v1_requests_get_completions_or_openai_shaped_refusals(shared_app):
    start = len(shared_app.log())
    for path, fields, base, examples in (
            ("chat/completions", V1_CHAT, {"messages": [{"role": "user", "content": "Hi"}]}, 24),
            ("completions", V1_COMPLETION, {"prompt": "The capital of France is"}, 12)):

        @settings(FUZZ, max_examples=examples)
        @given(some_of(fields))
        def fuzz(chosen):
            post_v1(shared_app, path, {"model": MODEL, "max_tokens": 2, **base, **chosen})

        fuzz()
    new_log = shared_app.log()[start:]
    for sign in ("unexpected error in", "Exception in ASGI application", "Traceback"):
        assert sign not in new_log, new_log[new_log.find(sign):][:3000]
    assert "Paris" in answer(shared_app.client())[0]
