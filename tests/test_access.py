"""What a visitor of a shared app can and cannot do, replayed against real app processes.

The shared app runs with APP_SHARED=1 and no login, the owner's HF_TOKEN in its environment, a local
Hub server, and its save folder placed inside Gradio's own temp folder (the worst place it could be).
Each promise of the README's Security model is tried as an anonymous visitor, with gradio_client and raw
HTTP, and the test checks both the refusal and that nothing was written, run, pushed or lost. The owner of an
unshared app, and the owner who logs in to a shared one, can still do everything.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from gradio_client.exceptions import AppError

from conftest import QUESTION, ROOT, SHARED_API_KEY, WRITE_TOKEN, AppProcess
from test_app import STORY, answer, content

VISITOR_REFUSED = "Only the owner of this app may"


@pytest.fixture(scope="module")
def visitor(shared_app):
    return shared_app.client()


def _evil_folder(root: Path, model_type: str) -> tuple[Path, Path]:
    """A model folder whose config points transformers at its own code, which would leave a marker if run."""
    folder = root / f"evil-{model_type}"
    folder.mkdir(parents=True)
    marker = root / f"evil-ran-{model_type}"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n"
                                    "    model_type = 'evil'\n")
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}, "architectures": ["Evil"],
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 1000}))
    return folder, marker


def test_uploaded_code_never_runs(shared_app, visitor, client, tmp_path):
    folder, marker = _evil_folder(tmp_path, "evil")
    with httpx.Client(base_url=shared_app.url) as http:  # the app takes no files: uploads are refused (see below)
        files = [("files", (p.name, p.read_bytes())) for p in folder.iterdir()]
        assert http.post("gradio_api/upload", files=files).status_code == 403
    uploaded = shared_app.gradio_tmp / "upload-of-an-earlier-version" / "evil"  # as if one had landed anyway
    shutil.copytree(folder, uploaded)
    uploaded_dir = str(uploaded)
    for api, refusal in (("/plan", "folders on the server are for the owner"), ("/load_model", VISITOR_REFUSED)):
        with pytest.raises(AppError, match=refusal) as refused:
            visitor.predict(model=uploaded_dir, api_name=api)
        assert uploaded_dir not in str(refused.value)  # no server path in a visitor's error
    names = visitor.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert not any("trust" in p["parameter_name"] for e in names.values() for p in e["parameters"])
    # The owner of an unshared app, started without --trust-remote-code: the code is never imported either.
    with pytest.raises(AppError, match="only when started with --trust-remote-code"):
        client.predict(model=str(folder), api_name="/plan")
    known, known_marker = _evil_folder(tmp_path, "llama")  # a known architecture: transformers' own code is used
    assert "Plan for" in client.predict(model=str(known), api_name="/plan")
    assert not marker.exists() and not known_marker.exists()


def test_no_visitor_loads_or_pushes_with_the_owners_token(shared_app, visitor, hub_server):
    hub_server.create_repo("alice/private-model", private=True)
    hub_server.add_files("alice/private-model", {"config.json": b'{"model_type": "llama"}'})
    if ("model", "alice/existing") not in hub_server.repos:
        hub_server.create_repo("alice/existing")
        hub_server.add_files("alice/existing", {"README.md": b"the owner's card"})
    before = set(hub_server.repos)
    with pytest.raises(AppError, match=VISITOR_REFUSED):
        visitor.predict(model="alice/private-model", api_name="/load_model")
    with pytest.raises(AppError, match="found neither"):  # planning reaches the Hub anonymously: private stays private
        visitor.predict(model="alice/private-model", api_name="/plan")
    for repo in ("alice/leaked-copy", "alice/existing"):
        with pytest.raises(AppError, match="Only the owner may push with the server's token"):
            visitor.predict(repo, False, "leak", api_name="/push_to_hub")
    assert set(hub_server.repos) == before
    assert hub_server.read_file("alice/existing", "README.md") == b"the owner's card"


def test_visitors_write_nothing_on_the_server(shared_app, visitor, tmp_path):
    names = visitor.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert names["/save_model"]["parameters"] == []  # no request carries a path
    with pytest.raises(AppError, match=VISITOR_REFUSED):
        visitor.predict(api_name="/save_model")
    for api, args in (("/set_fast_path", (True,)), ("/compare", (QUESTION, ["none"], 8)), ("/quality", ())):
        with pytest.raises(AppError, match=VISITOR_REFUSED):
            visitor.predict(*args, api_name=api)
    assert not shared_app.save_dir.exists() or not any(shared_app.save_dir.iterdir())


def test_saves_and_caches_are_never_served(shared_app, checkpoint):
    shared_app.gradio_tmp.mkdir(parents=True, exist_ok=True)
    shared_app.save_dir.mkdir(parents=True, exist_ok=True)
    inside_save = shared_app.save_dir / "private-model-nf4-0000" / "model.safetensors"
    inside_save.parent.mkdir(parents=True, exist_ok=True)
    inside_save.write_bytes(b"private weights")
    served = shared_app.gradio_tmp / "ordinary" / "note.txt"  # a control: Gradio does serve its own cache
    served.parent.mkdir(parents=True, exist_ok=True)
    served.write_text("fine to serve")
    with httpx.Client(base_url=shared_app.url) as http:
        assert http.get(f"gradio_api/file={served}").status_code == 200
        for path in (inside_save, checkpoint / "model.safetensors", Path("/etc/passwd"),
                     Path(__file__).resolve().parents[1] / "app.py"):
            response = http.get(f"gradio_api/file={path}")
            assert response.status_code in (403, 404), path
            assert b"private weights" not in response.content


def test_a_visitor_cannot_load_while_others_wait(shared_app, visitor):
    alone = answer(shared_app.client())
    clients = [shared_app.client() for _ in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        chats = [pool.submit(answer, c) for c in clients]
        time.sleep(0.5)
        with pytest.raises(AppError, match=VISITOR_REFUSED):
            visitor.predict(quant="nf4", api_name="/load_model")
        assert all(chat.result(timeout=300) == alone for chat in chats)


def test_visitor_errors_never_say_whether_a_server_folder_exists(visitor, tmp_path):
    existing, missing = str(tmp_path), str(tmp_path / "missing")
    messages = []
    for model in (existing, missing):
        with pytest.raises(AppError) as refused:
            visitor.predict(model=model, api_name="/plan")
        messages.append(str(refused.value))
    assert messages[0] == messages[1] and str(tmp_path) not in messages[0]


# ----------------------------------------------------------------------------- a shared app with logins


@pytest.fixture(scope="module")
def login_app(checkpoint, hub_server, session_dir):
    env = {**hub_server.env(session_dir / "login-hf-home"), "HF_TOKEN": WRITE_TOKEN, "APP_PRELOAD": "0",
           "APP_RATE_LIMIT": "0"}
    process = AppProcess("login-app", session_dir, env, ("--host", "0.0.0.0", "--auth", "alice:pw-a,bob:pw-b",
                                                        "--owners", "alice"))
    yield process
    process.stop()


def test_the_owner_who_logs_in_may_everything_another_login_only_what_visitors_may(login_app, hub_server):
    with pytest.raises(ValueError):
        login_app.client()  # no login, no page
    owner, other = login_app.client(("alice", "pw-a")), login_app.client(("bob", "pw-b"))
    with pytest.raises(AppError, match=VISITOR_REFUSED):
        other.predict(quant="nf4", api_name="/load_model")
    assert "Loaded" in owner.predict(quant="nf4", api_name="/load_model")[0]
    reply, by = answer(other)
    assert "Paris" in reply and by.endswith("nf4")
    with pytest.raises(AppError, match="Only the owner may push"):
        other.predict("alice/from-bob", True, "x", api_name="/push_to_hub")
    assert "Pushed" in owner.predict("alice/from-the-owner", True, "x", api_name="/push_to_hub")
    assert ("model", "alice/from-bob") not in hub_server.repos
    assert "alice" in login_app.log() and "pw-a" not in login_app.log()


def test_a_visitor_sees_the_owner_only_controls_disabled_with_the_reason(shared_app, browser):
    from playwright.sync_api import expect

    from test_browser import shot

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(shared_app.url)
    expect(page.locator("#role-banner")).to_contain_text("You are a visitor", timeout=60_000)
    load = page.get_by_role("button", name="Load (owner only)")
    expect(load).to_be_disabled()
    shot(page, "visitor-model-tab")
    page.get_by_role("tab", name="Save & push").click()
    expect(page.get_by_role("button", name="Save on the server (owner only)")).to_be_disabled()
    expect(page.get_by_role("button", name="Push to the Hub (owner only)")).to_be_disabled()
    page.get_by_role("tab", name="Compare").click()
    expect(page.get_by_role("button", name="Compare (owner only)")).to_be_disabled()
    page.get_by_role("tab", name="Generate").click()
    expect(page.locator("#fast-toggle").get_by_label("Fast path (owner only)")).to_be_disabled()
    expect(page.locator("#form-fast-path").get_by_label("Fast path (owner only)")).to_be_disabled()  # one state
    page.get_by_label("Message", exact=True).fill(QUESTION)
    page.get_by_role("button", name="Send").click()  # what visitors may do still works
    expect(page.get_by_role("log", name="chatbot conversation")).to_contain_text("answered by", timeout=120_000)
    shot(page, "visitor-chat")
    page.close()


# ----------------------------------------------------------------------------- what strangers bring (round 3)

MODEL = "SmolLM2-135M-Instruct"
HELLO = [{"role": "user", "content": "hi"}]


def v1(app: AppProcess, path: str, body: dict | str, **headers: str) -> httpx.Response:
    """A raw /v1 request: a dict as JSON, a str sent as it is (for what the json module would not write)."""
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{app.url}v1/{path}", content=content.encode("utf-8", "surrogatepass"), timeout=120,
                      headers={"Authorization": f"Bearer {SHARED_API_KEY}", "Content-Type": "application/json",
                               **headers})


def refused_with(response: httpx.Response, status: int, param: str | None, text: str) -> dict:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert error["param"] == param and re.search(text, error["message"]), error
    return error


def test_a_visitors_model_id_goes_to_the_hub_only(visitor, shared_app):
    secret = ROOT / "secret-org" / "secret-llama"  # under the app's working directory, shaped like a Hub id
    secret.mkdir(parents=True)
    (secret / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 1234}))
    try:
        for api in ("/plan", "/check_fit"):
            messages = []
            for model in ("secret-org/secret-llama", "secret-org/missing-llama"):
                with pytest.raises(AppError, match="found neither as a local folder nor on the Hub") as refused:
                    visitor.predict(model=model, api_name=api)
                messages.append(str(refused.value).replace(model, "ID"))
            assert messages[0] == messages[1] and "1234" not in messages[0]  # nothing says which folder exists
    finally:
        shutil.rmtree(ROOT / "secret-org")
    for model in ("a/b..", "a--b/c", "a/b.git"):
        with pytest.raises(AppError, match=r"model=.* is not valid: a Hub id looks like 'org/name'"):
            visitor.predict(model=model, api_name="/plan")


@pytest.mark.parametrize("config,refusal", [
    ({"hidden_size": -64}, r"sets hidden_size=-64, outside 0\.\.262,144"),
    ({"num_hidden_layers": 10**9}, r"sets num_hidden_layers=1000000000, outside 0\.\.1,024"),
    ({"num_attention_heads": 0}, r"transformers cannot read its config\.json \(integer division"),
    ({"hidden_size": "wide"}, r"its config\.json has a value transformers refuses"),
    ({"num_key_value_heads": 0}, r"transformers cannot build a model from its config\.json"),
])
def test_absurd_configs_are_refused_by_name(visitor, shared_app, hub_server, config, refusal):
    repo = f"mallory/absurd-{abs(hash(json.dumps(config, sort_keys=True))) % 10**8}"
    if ("model", repo) not in hub_server.repos:
        hub_server.create_repo(repo)
        hub_server.add_files(repo, {"config.json": json.dumps({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 1000, **config}).encode()})
    for api in ("/plan", "/check_fit"):
        with pytest.raises(AppError, match=refusal):
            visitor.predict(model=repo, api_name=api)
    assert "unexpected error in" not in shared_app.log()


def test_history_and_system_prompt_are_bounded_before_the_queue(shared_app):
    busy = shared_app.client()
    running = busy.submit(message=STORY, max_new_tokens=300, greedy=True, api_name="/generate")
    while not any("Generating" in str(out[1]) for out in running.outputs()):
        time.sleep(0.05)
    visitor = shared_app.client()
    turns = [{"role": ("user", "assistant")[i % 2], "content": "Tell me more about Paris, please."}
             for i in range(20_000)]  # 1.3 MB of JSON
    for fields, refusal in (
            (dict(history=turns), r"The conversation has 20,001 messages; the limit is 200 "
                                  r"\(APP_MAX_HISTORY_MESSAGES=200\)"),
            (dict(system_prompt="x" * 200_000), r"The system prompt is 200,000 characters; the limit is 16,000 "
                                                r"\(APP_MAX_MESSAGE_CHARS=16000\)"),
            (dict(history=[{"role": "user", "content": "y" * 15_000}] * 5),
             r"The conversation is 75,\d{3} characters in all; the limit is 64,000 \(APP_MAX_CONVERSATION_CHARS")):
        with pytest.raises(AppError, match=refusal):
            visitor.predict(message=QUESTION, **fields, api_name="/generate")
    assert not running.done()  # each was refused while another visitor's answer ran: none waited in the queue
    refused_with(v1(shared_app, "chat/completions", {"model": MODEL, "messages": turns}), 400, "messages",
                 r"20,000 messages; the limit is 200")
    refused_with(v1(shared_app, "chat/completions", {"model": MODEL, "messages": [
        {"role": "system", "content": "x" * 200_000}, *HELLO]}), 400, "messages", r"200,000 characters")
    assert not running.done()
    busy.predict(api_name="/stop")
    assert running.result(timeout=120)[1].startswith("Stopped")


def test_the_readmes_history_shape_is_accepted(visitor):
    history, _ = visitor.predict(message="And of Italy?", max_new_tokens=8, greedy=True, api_name="/generate",
                                 history=[{"role": "user", "content": QUESTION},
                                          {"role": "assistant", "content": "Paris."}])
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert content(history[0]) == QUESTION and "answered by" in content(history[-1])


@pytest.mark.parametrize("body,param,refusal", [
    ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}' % MODEL, "max_tokens",
     r"max_tokens=inf is not valid: give a whole number"),
    ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "seed": NaN}' % MODEL, "seed",
     r"seed=nan is not valid: give a whole number"),
    ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "n": NaN}' % MODEL, "n",
     r"n=nan is not valid: give a whole number"),
    ('{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud800"}]}' % MODEL, "messages",
     r"lone surrogate"),
    ('{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud800"}], "stream": true}' % MODEL, "messages",
     r"lone surrogate"),
    ('{"model": "%s", "prompt": "\\udfff", "max_tokens": 2}' % MODEL, "prompt", r"lone surrogate"),
    ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}' % MODEL, "stop",
     r"lone surrogate"),
])
def test_odd_numbers_and_text_on_v1_get_a_400_naming_the_field(shared_app, body, param, refusal):
    path = "completions" if '"prompt"' in body else "chat/completions"
    refused_with(v1(shared_app, path, body), 400, param, refusal)


def test_a_huge_stop_list_is_refused_without_being_echoed(shared_app):
    response = v1(shared_app, "chat/completions", {"model": MODEL, "messages": HELLO, "stop": ["x" * 100] * 50_000})
    refused_with(response, 400, "stop", r"\(5,\d{3},\d{3} characters\) is not valid: give up to 4 stop strings")
    assert len(response.content) < 1000


def test_a_lone_surrogate_in_the_ui_is_a_readable_refusal(shared_app):
    for message, history, system in (("\ud800", None, ""), ("hi", [{"role": "user", "content": "\udc00"}], ""),
                                     ("hi", None, "\ud83d")):
        data = [message, history, 8, True, 0.7, 0.9, 50, 1.0, -1, system, False, ""]
        with httpx.Client(base_url=shared_app.url, timeout=60) as http:
            event = http.post("gradio_api/call/generate", content=json.dumps({"data": data}).encode(),
                              headers={"Content-Type": "application/json"}).json()["event_id"]
            stream = http.get(f"gradio_api/call/generate/{event}").text
        assert "event: error" in stream and "lone surrogate" in stream, stream[:500]
    assert "unexpected error in" not in shared_app.log()


def test_uploads_are_refused_and_nothing_lands(shared_app):
    def stored() -> set[Path]:
        return {p for p in shared_app.gradio_tmp.rglob("*") if p.is_file()}

    before = stored()
    with httpx.Client(base_url=shared_app.url, timeout=60) as http:
        for number in range(30):
            payload = {"files": (f"blob-{number}.bin", b"\0" * 900_000)}
            assert http.post("gradio_api/upload", files=payload).status_code == 403
        assert http.post("gradio_api/upload", content=b"x" * 900_000,
                         headers={"Content-Type": "application/octet-stream"}).status_code == 403
        assert http.post("gradio_api/component_server", files={"files": ("a.bin", b"\0" * 1000)}).status_code == 403
    assert stored() == before
    assert "Paris" in answer(shared_app.client())[0]


# ----------------------------------------------------------------------------- a local API without a key


@pytest.fixture(scope="module")
def keyless_app(checkpoint, session_dir):
    process = AppProcess("keyless-app", session_dir, {"APP_OPENAI_API": "1", "APP_PRELOAD": "0"})
    yield process
    process.stop()


def test_a_keyless_local_api_answers_only_its_own_json_requests(keyless_app):
    url = f"{keyless_app.url}v1/chat/completions"
    body = json.dumps({"model": MODEL, "messages": HELLO})
    own = f"http://127.0.0.1:{keyless_app.port}"
    cases = [({"Content-Type": "text/plain"}, 415, "unsupported_media"),  # a cross-site form or fetch without CORS
             ({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403, "forbidden_origin"),
             ({"Content-Type": "application/json", "Origin": "null"}, 403, "forbidden_origin"),
             ({"Content-Type": "application/json", "Host": "evil.example"}, 403, "forbidden_host"),  # DNS rebinding
             ({"Content-Type": "application/json", "Origin": own}, 503, "model_not_loaded"),  # passes: no model yet
             ({"Content-Type": "application/json"}, 503, "model_not_loaded")]
    for headers, status, code in cases:
        response = httpx.post(url, content=body, headers=headers)
        assert response.status_code == status and response.json()["error"]["code"] == code, (headers, response.text)
    models = httpx.get(f"{keyless_app.url}v1/models", headers={"Origin": "http://evil.example"})
    assert models.status_code == 403
