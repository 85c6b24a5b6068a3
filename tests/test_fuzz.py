"""Property-based fuzzing of /plan, /check_fit, /load_model and /generate against the real app (hypothesis).

Each example changes one to three fields from their defaults to valid, odd or hostile values. Every
response must be a result or a readable refusal, never "Unexpected error", and the server log must
not gain a single unexpected-error traceback. The example counts are bounded (and derandomized) so
that CI takes about a minute for the lot; the model must still answer afterwards.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import QUESTION
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
CHAT_FIELDS = {
    "message": st.one_of(st.just(QUESTION), st.just(""), ODD_TEXT, st.text(min_size=2000, max_size=3000)),
    "max_new_tokens": st.one_of(st.integers(-5, 12), st.sampled_from([513, 10**9])),
    "greedy": st.booleans(),
    "temperature": st.one_of(st.floats(-1, 3, allow_nan=False), st.sampled_from([0.0, 1e-9])),
    "top_p": st.floats(-0.5, 1.5, allow_nan=False),
    "top_k": st.integers(-10, 500),
    "repetition_penalty": st.floats(-1, 5, allow_nan=False),
    "seed": st.one_of(st.integers(-(2**40), 2**40), st.just(-1)),
    "system_prompt": ODD_TEXT,
}
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
