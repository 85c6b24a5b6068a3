"""The app as Hugging Face runs it on a Space, end to end: who owns it, whose token a push uses, whose address counts.

The Space app gets what a Space gets: `SYSTEM=spaces`, `SPACE_ID`, `SPACE_AUTHOR_NAME` (here the organization
`acme`), the OAuth variables of its `hf_oauth` app and the owner's `HF_TOKEN`. Gradio then mounts the real sign-in,
which talks OpenID to the local Hub server (tests/hub_server.py), so every visitor below signs in the way a browser
does (`/login/huggingface`, the Hub's authorize page, `/login/callback`) and is then known only by the Gradio session
cookie that sign-in set. Alice is a member of `acme` (an owner), Bob is not (a visitor), and anonymous clients are
visitors. The Space's save folder is a small tmpfs where the test can run out of inodes mid-save, when it may mount one.

Where a Space's settings were copied to another machine (`SPACE_ID` without `SYSTEM=spaces`), see test_limits.py.
"""

from __future__ import annotations

import os
import re
import subprocess

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from conftest import OTHER_TOKEN, ROOT, WRITE_TOKEN, AppProcess
from test_app import answer

VISITOR_REFUSED = "Only the owner of this app may"
RATE_REFUSED = r"visitors may send 12 a minute \(APP_RATE_LIMIT=12\)"  # bursts of 4, one more each 5 s
OAUTH = {"client_id": "space-oauth-app", "secret": "space-oauth-secret-0123456789"}


@pytest.fixture(scope="module")
def space_hub(session_dir):
    """The Space's own Hub (a module's pushes are freed with it): alice and bob, alice a member of acme."""
    from hub_server import HubServer

    with HubServer({WRITE_TOKEN: "alice", OTHER_TOKEN: "bob"}) as hub:
        hub.orgs["alice"] = ["acme"]
        yield hub


@pytest.fixture(scope="module")
def small_disk(session_dir):
    """A 2 GB tmpfs with 64 inodes for the Space's saves (None where this process may not mount one)."""
    folder = session_dir / "space-saves"
    folder.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g,nr_inodes=64", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0 if os.geteuid() == 0 else False
    yield folder if mounted else None
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture(scope="module")
def space_app(checkpoint, space_hub, small_disk, session_dir):
    env = {**space_hub.env(session_dir / "space-hf-home"),
           **space_hub.oauth_client(OAUTH["client_id"], OAUTH["secret"]), "SYSTEM": "spaces",
           "SPACE_ID": "acme/quantized-llm", "SPACE_AUTHOR_NAME": "acme", "HF_TOKEN": WRITE_TOKEN,
           "APP_RATE_LIMIT": "12"}
    process = AppProcess("space-app", session_dir, env, save_dir=small_disk or session_dir / "space-saves")
    yield process
    process.stop()


def sign_in(app: AppProcess, hub_token: str | None) -> str:
    """Signs in with Hugging Face as the holder of `hub_token` (the Hub's own session, as a browser has it); returns
    the Gradio session cookie the app set."""
    with httpx.Client(base_url=app.url) as http:
        start = http.get("login/huggingface")
        assert start.status_code in (302, 307), start.text
        state_cookie = re.match(r"session=([^;]+)", start.headers["set-cookie"]).group(1)
        authorize = httpx.get(start.headers["location"], headers={"Authorization": f"Bearer {hub_token}"})
        assert authorize.status_code == 302, authorize.text
        callback = http.get(authorize.headers["location"], headers={"Cookie": f"session={state_cookie}"})
        assert callback.status_code in (302, 307), callback.text
        return re.match(r"session=([^;]+)", callback.headers["set-cookie"]).group(1)


def signed_in(app: AppProcess, hub_token: str) -> Client:
    # The cookie is Secure (a Space is served over https); a client on plain http sends it by hand.
    return Client(app.url, headers={"Cookie": f"session={sign_in(app, hub_token)}"}, verbose=False)


@pytest.fixture(scope="module")
def alice(space_app):
    return signed_in(space_app, WRITE_TOKEN)


@pytest.fixture(scope="module")
def bob(space_app):
    return signed_in(space_app, OTHER_TOKEN)


def test_on_a_space_only_the_signed_in_owner_may_change_the_model(space_app, alice, bob):
    anonymous = space_app.client()
    for visitor in (anonymous, bob):
        for api, args in (("/set_fast_path", (True,)), ("/save_model", ()), ("/quality", ())):
            with pytest.raises(AppError, match=VISITOR_REFUSED):
                visitor.predict(*args, api_name=api)
        with pytest.raises(AppError, match=VISITOR_REFUSED):
            visitor.predict(quant="nf4", api_name="/load_model")
    assert "Fast path on" in alice.predict(True, api_name="/set_fast_path")  # a member of acme, the Space's author
    assert "Fast path off" in alice.predict(False, api_name="/set_fast_path")
    assert "Paris" in answer(bob)[0] and "Paris" in answer(anonymous)[0]  # what visitors may do still works
    assert not space_app.save_dir.exists() or not any(space_app.save_dir.iterdir())


def test_a_visitor_pushes_only_with_their_own_sign_in_into_their_own_namespace(space_app, space_hub, bob):
    with pytest.raises(AppError, match="Visitors may push only into their own namespace"):
        bob.predict("acme/stolen", True, "x", api_name="/push_to_hub")
    with pytest.raises(AppError, match="sign in with Hugging Face"):
        space_app.client().predict("bob/anonymous", True, "x", api_name="/push_to_hub")
    assert "Pushed" in bob.predict("bob/smollm2-copy", True, "mine", api_name="/push_to_hub")
    pushed = {repo for _, repo in space_hub.repos}
    assert "bob/smollm2-copy" in pushed and not {"acme/stolen", "bob/anonymous"} & pushed
    assert WRITE_TOKEN not in space_app.log() and OAUTH["secret"] not in space_app.log()


def test_a_disk_that_fills_mid_save_gives_a_clear_error_and_keeps_nothing(space_app, small_disk, alice):
    if small_disk is None:
        pytest.skip("filling a disk mid-save needs a small tmpfs, which only root may mount here")
    before = sorted(p.name for p in small_disk.iterdir())  # an earlier save (the push above) is kept
    filler = small_disk / "filler"
    filler.mkdir()
    for number in range(os.statvfs(small_disk).f_ffree - 3):  # room for the staging folder and two small files
        (filler / str(number)).touch()
    try:
        with pytest.raises(AppError, match="The disk filled up during the save; the partial save was removed"):
            alice.predict(api_name="/save_model")
    finally:
        for path in filler.iterdir():
            path.unlink()
        filler.rmdir()
    assert sorted(p.name for p in small_disk.iterdir()) == before  # no staging folder, no half-written save
    assert "Paris" in answer(alice)[0]
    assert "Unexpected error" not in space_app.log()


def spend_the_burst(client, headers: dict) -> None:
    """Sends requests that pass the access check and then fail cheaply, until the visitor rate refuses one."""
    for _ in range(40):
        try:
            client.predict(message="", api_name="/generate", headers=headers)
        except AppError as refused:
            if "a minute" in str(refused):
                return
            assert "type a message first" in str(refused)
    raise AssertionError("the visitor rate never refused a request")


def test_on_a_space_visitors_are_keyed_on_the_address_the_proxy_saw(space_app):
    visitor = space_app.client()
    spend_the_burst(visitor, {"X-Forwarded-For": "198.51.100.7"})  # what Hugging Face's proxy appends
    for forged in ("203.0.113.5", "198.51.100.8, 203.0.113.6"):  # the client's own entries come first
        with pytest.raises(AppError, match=RATE_REFUSED):
            visitor.predict(message="", api_name="/generate", headers={"X-Forwarded-For": f"{forged}, 198.51.100.7"})
    with pytest.raises(AppError, match="type a message first"):  # another visitor, as the proxy saw it
        visitor.predict(message="", api_name="/generate", headers={"X-Forwarded-For": "203.0.113.5, 198.51.100.8"})


# ----------------------------------------------------------------------------- what a Space needs to start


def test_a_space_without_its_sign_in_refuses_to_start(monkeypatch, capsys):
    import app

    for name, value in {"SYSTEM": "spaces", "SPACE_ID": "acme/app", "APP_PRELOAD": "0"}.items():
        monkeypatch.setenv(name, value)
    for name in ("OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "OAUTH_SCOPES", "OPENID_PROVIDER_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit, match="This Space has no Hugging Face sign-in .*hf_oauth: true"):
        app.main([])


def test_both_install_paths_bring_the_sign_in_libraries():
    from importlib.metadata import version

    local = (ROOT / "requirements.txt").read_text()
    space = (ROOT / "space/requirements.txt").read_text()
    assert re.search(r"^gradio\[oauth\]==", local, re.M)
    for name in ("authlib", "itsdangerous"):
        pins = [re.search(rf"^{name}==(\S+)", text, re.M | re.I) for text in (local, space)]
        assert all(pins) and pins[0].group(1) == pins[1].group(1) == version(name), name


def test_settings_decide_a_space_as_gradio_does(monkeypatch):
    from gradio.utils import get_space

    from server.settings import parse_args

    for env in ({}, {"SPACE_ID": "a/b"}, {"SYSTEM": "spaces"}, {"SYSTEM": "spaces", "SPACE_ID": "a/b"},
                {"SYSTEM": "other", "SPACE_ID": "a/b"}):
        for name in ("SYSTEM", "SPACE_ID"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert parse_args([]).on_space == (get_space() is not None), env

