"""What a visitor of a shared app can and cannot do, replayed against real app processes.

The shared app runs with APP_SHARED=1 and no login, the owner's HF_TOKEN in its environment, a local
Hub server, and its save folder placed inside Gradio's own temp folder (the worst place it could be).
Each promise of the README's Security model is tried as an anonymous visitor, with gradio_client and raw
HTTP, and the test checks both the refusal and that nothing was written, run, pushed or lost. The owner of an
unshared app, and the owner who logs in to a shared one, can still do everything.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from gradio_client.exceptions import AppError

from conftest import QUESTION, WRITE_TOKEN, AppProcess
from test_app import answer

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
    with httpx.Client(base_url=shared_app.url) as http:
        files = [("files", (p.name, p.read_bytes())) for p in folder.iterdir()]
        uploaded = http.post("gradio_api/upload", files=files).json()
    uploaded_dir = str(Path(uploaded[0]).parent)
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
    with pytest.raises(AppError):
        client.predict(model=uploaded_dir, api_name="/load_model")  # nobody loads from Gradio's upload area
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
