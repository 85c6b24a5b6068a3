"""The real app in its own process on a free port, driven through gradio_client (and a local Hub server)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import OTHER_TOKEN, QUESTION, WRITE_TOKEN

DEFAULT_FIELDS = dict(model="", revision="", dtype="auto", quant="none", compute_dtype="auto", double_quant=False,
                      quant_storage="uint8", int8_threshold=6.0, skip_modules="", fp32_cpu_offload=False,
                      device_map="auto", max_memory="", fast_path=False, fast_path_compile=False,
                      trust_remote_code=False)
GREEDY = dict(max_new_tokens=16, greedy=True, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.0,
              seed=-1, system_prompt="")


def fields(**changes) -> list:
    return list({**DEFAULT_FIELDS, **changes}.values())


def ask(client, message=QUESTION, history=()) -> tuple[list[dict], str]:
    return client.predict(message, list(history), *GREEDY.values(), api_name="/generate")


def answer(client, message=QUESTION) -> str:
    """The text of the assistant's reply (gradio 6 sends content as a list of typed parts)."""
    content = ask(client, message)[0][-1]["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def test_api_names_are_stable(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/plan", "/load_model", "/generate", "/set_fast_path", "/save_model", "/push_to_hub",
            "/compare"} <= names


def test_preloaded_default_model_answers(client):
    history, metrics = ask(client)
    assert history[-1]["role"] == "assistant" and "Paris" in answer(client)
    assert "tok/s" in metrics and "TTFT" in metrics


def test_plan_shows_two_gpu_split_without_gpus(client):
    shown = client.predict(*fields(quant="nf4", max_memory="0=100MB, 1=1GiB"), api_name="/plan")
    assert "cuda:0" in shown and "cuda:1" in shown and "model.layers." in shown


def test_load_nf4_generate_toggle_fast_path_and_save(client, tmp_path):
    status, fast = client.predict(*fields(quant="nf4"), api_name="/load_model")
    assert "4-bit NF4" in status and "footprint" in status and fast is False
    assert "Paris" in answer(client)
    assert "Fast path on" in client.predict(True, api_name="/set_fast_path")
    assert "Paris" in answer(client)
    saved = client.predict(str(tmp_path / "nf4"), api_name="/save_model")
    assert "Saved" in saved and (tmp_path / "nf4" / "model.safetensors").is_file()
    assert "Fast path off" in client.predict(False, api_name="/set_fast_path")


def test_bad_inputs_get_readable_errors_and_model_keeps_answering(client, tmp_path):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"max_memory=.*like '600MB'") as bad_budget:
        client.predict(*fields(max_memory="0=lots"), api_name="/load_model")
    assert "Traceback" not in str(bad_budget.value)
    with pytest.raises(AppError, match="no such local folder"):
        client.predict(*fields(model=str(tmp_path / "nowhere")), api_name="/load_model")
    with pytest.raises(AppError, match="names GPU 0, but this machine has no GPU"):
        client.predict(*fields(device_map="cuda:0"), api_name="/load_model")
    assert "Paris" in answer(client)


def test_eight_concurrent_generate_calls_all_answer(client):
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: answer(client), range(8)))
    assert len(answers) == 8 and all("Paris" in a for a in answers)


def test_compare_runs_variants_side_by_side(client):
    table = client.predict(QUESTION, ["none", "nf4"], 12, api_name="/compare")
    assert "| none |" in table and "| nf4 |" in table and "100%" in table  # full precision agrees with itself
    assert "Paris" in answer(client)  # the user's model is back


def test_push_to_local_hub_and_bad_repo(client, hub_server):
    shown = client.predict("alice/smollm2-app-push", True, "From the app", api_name="/push_to_hub")
    assert "Pushed" in shown and "/commit/" in shown
    assert "model.safetensors" in hub_server.list_files("alice/smollm2-app-push")
    assert WRITE_TOKEN not in shown
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="may not write to 'bob'"):
        client.predict("bob/not-mine", True, "x", api_name="/push_to_hub")
    with pytest.raises(AppError, match="not valid"):
        client.predict("no namespace here!", True, "x", api_name="/push_to_hub")
    assert OTHER_TOKEN  # bob exists on the server; alice's token just may not write there


def test_check_fit_says_what_is_missing_and_offers_fixes(client):
    result = client.predict(*fields(max_memory="0=300MB"), 8192, 1, api_name="/check_fit")
    shown = result[0] if isinstance(result, (list, tuple)) else result
    assert "Does not fit: needs" in shown and "more on cuda:0" in shown and "KV cache" in shown
    assert "Quantize to 4-bit NF4" in shown
    fits = client.predict(*fields(quant="nf4"), 512, 1, api_name="/check_fit")
    assert "✅ **Fits**" in (fits[0] if isinstance(fits, (list, tuple)) else fits)


def test_quality_check_compares_with_full_precision(client):
    client.predict(*fields(quant="int8"), api_name="/load_model")
    shown = client.predict(api_name="/quality")
    assert "Quality of int8" in shown and "next-token agreement" in shown and "| 100% |" in shown
    assert "Paris" in answer(client)
