"""The access policy alone: who is the owner in each deployment, what each role may do, whose token a push uses,
whose proxies are believed.

The same decisions are replayed through real requests in test_access.py, test_limits.py and, for a Space with its
real sign-in against the local Hub server, test_space.py.
"""

from __future__ import annotations

import pytest

from core.spec import EMBEDDED_MODEL
from server.access import (Action, AccessDenied, Caller, Role, VISITOR_ACTIONS, checked_model, identify, may,
                           push_token, redact_paths, uploads_dir)
from server.settings import LOOPBACK, PRIVATE_NETWORKS, Settings, is_loopback, parse_proxies

LOCAL = Settings()
EXPOSED = Settings(host="0.0.0.0")
PROXIED = Settings(shared_flag=True)
LOGINS = Settings(shared_flag=True, auth=(("alice", "a"), ("bob", "b")), owners=frozenset({"alice"}))
SPACE = Settings(space_id="acme/app", space_author="acme", owners=frozenset({"carol"}))


def test_who_is_shared():
    assert not LOCAL.shared and EXPOSED.shared and PROXIED.shared and SPACE.shared
    assert Settings(share=True).shared and is_loopback("127.0.0.1") and is_loopback("::1")
    assert is_loopback("localhost") and not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_owner_in_each_deployment():
    assert identify(LOCAL, None, None, "127.0.0.1").role is Role.OWNER
    assert identify(EXPOSED, None, None, "10.0.0.9").role is Role.VISITOR
    assert identify(PROXIED, "alice", None, "1.2.3.4").role is Role.VISITOR  # a name without --auth proves nothing
    assert identify(LOGINS, "alice", None, "1.2.3.4").role is Role.OWNER
    assert identify(LOGINS, "bob", None, "1.2.3.4").role is Role.VISITOR
    member = {"preferred_username": "dave", "orgs": [{"preferred_username": "acme"}]}
    assert identify(SPACE, None, member, "x").role is Role.OWNER  # a member of the owning organization
    assert identify(SPACE, None, {"preferred_username": "carol"}, "x").role is Role.OWNER  # APP_OWNERS
    assert identify(SPACE, None, {"preferred_username": "eve", "orgs": [{"preferred_username": "other"}]},
                    "x").role is Role.VISITOR
    assert identify(SPACE, "acme", None, "x").role is Role.VISITOR  # a login name alone is not a sign-in
    assert identify(SPACE, None, None, "x").key == "x" and identify(SPACE, None, member, "x").key == "dave"


def test_the_policy_table():
    assert VISITOR_ACTIONS == {Action.CHAT, Action.PLAN, Action.PUSH_OWN}
    for action in Action:
        assert may(Role.OWNER, action)
        assert may(Role.VISITOR, action) == (action in VISITOR_ACTIONS)


def test_which_models_a_caller_may_name(tmp_path, checkpoint):
    visitor, owner = Caller(Role.VISITOR, None, "x"), Caller(Role.OWNER, None, "x")
    assert checked_model(visitor, EXPOSED, "") == EMBEDDED_MODEL
    assert checked_model(visitor, EXPOSED, "org/name") == "org/name"
    with pytest.raises(AccessDenied, match="folders on the server are for the owner"):
        checked_model(visitor, EXPOSED, str(checkpoint))
    assert checked_model(owner, LOCAL, str(checkpoint)) == str(checkpoint)
    with pytest.raises(AccessDenied, match="under APP_MODEL_DIRS"):
        checked_model(owner, LOGINS, str(checkpoint))
    inside = Settings(shared_flag=True, model_dirs=(checkpoint.parent,))
    assert checked_model(owner, inside, str(checkpoint)) == str(checkpoint)
    uploaded = uploads_dir() / "some-upload"
    uploaded.mkdir(parents=True, exist_ok=True)
    (uploaded / "config.json").write_text("{}")
    with pytest.raises(AccessDenied, match="upload area"):
        checked_model(owner, LOCAL, str(uploaded))  # not even the owner of a local app: anyone can write there


def test_whose_forwarded_addresses_are_believed():
    assert parse_proxies(None, on_space=False, share=False) == ()  # no proxy: the peer is the visitor
    assert parse_proxies("", on_space=True, share=False) == PRIVATE_NETWORKS  # Hugging Face's proxy
    assert parse_proxies(None, on_space=False, share=True) == LOOPBACK  # the share link's tunnel client
    assert parse_proxies("1", on_space=False, share=False) == PRIVATE_NETWORKS
    assert parse_proxies("0", on_space=True, share=True) == ()
    assert parse_proxies("10.0.0.5, 172.18.0.0/16", on_space=False, share=False) == ("10.0.0.5", "172.18.0.0/16")
    with pytest.raises(SystemExit, match="'proxy.example' is not an address or a network"):
        parse_proxies("10.0.0.5, proxy.example", on_space=False, share=False)


def test_whose_token_a_push_uses(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_server")
    owner, visitor = Caller(Role.OWNER, None, "x"), Caller(Role.VISITOR, "eve", "eve")
    assert push_token(owner, LOCAL, None, "alice/x") == "hf_server"
    assert push_token(owner, SPACE, "hf_oauth_owner", "acme/x") == "hf_oauth_owner"
    assert push_token(visitor, SPACE, "hf_oauth_eve", "eve/x") == "hf_oauth_eve"
    with pytest.raises(AccessDenied, match="own namespace"):
        push_token(visitor, SPACE, "hf_oauth_eve", "acme/x")
    with pytest.raises(AccessDenied, match="sign in"):
        push_token(visitor, SPACE, None, "eve/x")
    with pytest.raises(AccessDenied, match="server's token"):
        push_token(Caller(Role.VISITOR, None, "x"), EXPOSED, None, "alice/x")


def test_server_paths_are_taken_out_of_visitor_messages():
    message = "Not enough disk space under /srv/app/saves/x-nf4 (see ~/.cache/foo); https://huggingface.co/a/b ok"
    redacted = redact_paths(message)
    assert "/srv" not in redacted and ".cache" not in redacted and "https://huggingface.co/a/b" in redacted
    assert redact_paths("write it as 'your-name/model-name' at 12.5 tok/s") == \
        "write it as 'your-name/model-name' at 12.5 tok/s"
