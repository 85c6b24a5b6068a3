"""End-to-end tests of ``tests/hub_server.py`` with the real ``huggingface_hub`` / ``transformers`` clients.

The clients run in subprocesses because ``HF_ENDPOINT`` and ``HF_HUB_DISABLE_XET`` are read when
``huggingface_hub`` is imported. Each client script gets its inputs as JSON in ``HUB_TEST_ARGS``
and prints a JSON object as its last stdout line.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hub_server import HubServer

TOKENS = {"hf_alice_write": "alice", "hf_bob_write": "bob"}
ALICE, BOB = "hf_alice_write", "hf_bob_write"
Client = Callable[..., dict[str, Any]]

# Prepended to every client script: parsed inputs and an error probe returning [class name, status].
_PRELUDE = """
import json, os
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
ARGS = json.loads(os.environ["HUB_TEST_ARGS"])

def http_error(fn):
    try:
        fn()
    except HfHubHTTPError as exc:
        return [type(exc).__name__, exc.response.status_code]
    return None
"""


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer(tokens=TOKENS) as server:
        yield server


@pytest.fixture
def client(hub: HubServer, tmp_path: Path) -> Client:
    """Run a client script against ``hub`` in a fresh interpreter; return its JSON output."""

    def run(script: str, **args: Any) -> dict[str, Any]:
        env = {**os.environ, **hub.env(tmp_path / "hf_home"), "HUB_TEST_ARGS": json.dumps(args)}
        env.pop("HF_TOKEN", None)
        code = _PRELUDE + textwrap.dedent(script)
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"client failed:\n{proc.stderr[-4000:]}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None  # surface 3xx responses as they are


_RAW = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)  # raw HTTP, for header checks


def _post(url: str, payload: dict[str, Any], token: str | None = None) -> tuple[int, dict[str, Any]]:
    """Raw JSON POST, for checks the real client would short-circuit on its side."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    try:
        with _RAW.open(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _head(url: str) -> tuple[int, Any]:
    """Raw HEAD, redirects not followed; returns (status, headers)."""
    try:
        with _RAW.open(urllib.request.Request(url, method="HEAD"), timeout=10) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers


def test_whoami_and_auth_errors(hub: HubServer, client: Client) -> None:
    hub.create_repo("alice/public")
    hub.create_repo("bob/public")
    out = client(
        """
        api, bad = HfApi(token=ARGS["alice"]), HfApi(token="hf_nope")
        upload = dict(path_or_fileobj=b"x", path_in_repo="x.txt")
        print(json.dumps({
            "whoami": api.whoami(),
            "bad_token_whoami": http_error(lambda: bad.whoami()),
            "bad_token_upload": http_error(lambda: bad.upload_file(**upload, repo_id="alice/public")),
            "anonymous_upload": http_error(lambda: HfApi(token=False).upload_file(**upload, repo_id="alice/public")),
            "create_in_bob_ns": http_error(lambda: api.create_repo("bob/mine")),
            "create_in_bob_ns_exist_ok": http_error(lambda: api.create_repo("bob/mine", exist_ok=True)),
            "write_to_bob_repo": http_error(lambda: api.upload_file(**upload, repo_id="bob/public")),
            "create_existing": http_error(lambda: api.create_repo("alice/public")),
            "create_existing_exist_ok": str(api.create_repo("alice/public", exist_ok=True)),
        }))
        """,
        alice=ALICE,
    )
    assert out["whoami"]["name"] == "alice"
    assert out["whoami"]["type"] == "user" and out["whoami"]["orgs"] == []
    assert out["whoami"]["auth"]["accessToken"]["role"] == "write"
    assert out["bad_token_whoami"] == ["HfHubHTTPError", 401]
    assert out["bad_token_upload"] == ["HfHubHTTPError", 401]
    assert out["anonymous_upload"] == ["HfHubHTTPError", 401]
    assert out["create_in_bob_ns"] == ["HfHubHTTPError", 403]
    assert out["create_in_bob_ns_exist_ok"] == ["HfHubHTTPError", 403]
    assert out["write_to_bob_repo"] == ["HfHubHTTPError", 403]
    assert out["create_existing"] == ["HfHubHTTPError", 409]
    assert out["create_existing_exist_ok"] == f"{hub.url}/alice/public"
    assert hub.list_files("bob/public") == [".gitattributes"]  # nothing got written
    assert ("model", "bob/mine") not in hub.repos
    assert not any(ALICE in path for _, path in hub.requests_log)


def test_model_upload_download_roundtrip(hub: HubServer, client: Client, tmp_path: Path) -> None:
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello hub\n")
    big = random.Random(0).randbytes(11 * 1024 * 1024)
    (folder / "weights.dat").write_bytes(big)
    out = client(
        """
        from pathlib import Path
        from huggingface_hub import hf_hub_download, snapshot_download
        api, repo, folder = HfApi(token=ARGS["alice"]), "alice/private-model", Path(ARGS["folder"])
        api.create_repo(repo, private=True)
        commit = api.upload_folder(repo_id=repo, folder_path=folder, commit_message="add files")
        same = {f: Path(hf_hub_download(repo, f, token=ARGS["alice"])).read_bytes() == (folder / f).read_bytes()
                for f in ("notes.txt", "weights.dat")}
        snapshot = Path(snapshot_download(repo, token=ARGS["alice"]))
        info = api.model_info(repo, files_metadata=True)
        print(json.dumps({
            "commit_oid": commit.oid,
            "files": api.list_repo_files(repo),
            "downloads_equal": same,
            "snapshot_files": sorted(p.name for p in snapshot.iterdir()),
            "snapshot_equal": (snapshot / "weights.dat").read_bytes() == (folder / "weights.dat").read_bytes(),
            "info": {"sha": info.sha, "private": info.private,
                     "lfs": {s.rfilename: s.lfs.sha256 for s in info.siblings if s.lfs}},
            # A separate cache: hf_hub_download falls back to cached files when the HEAD call fails.
            "anonymous": http_error(lambda: hf_hub_download(repo, "notes.txt", token=False, cache_dir="anon")),
            "missing_file": http_error(lambda: hf_hub_download(repo, "nope.txt", token=ARGS["alice"])),
            "bob_reads": http_error(lambda: HfApi(token=ARGS["bob"]).model_info(repo)),
        }))
        """,
        alice=ALICE,
        bob=BOB,
        folder=str(folder),
    )
    assert out["files"] == [".gitattributes", "notes.txt", "weights.dat"]
    assert out["downloads_equal"] == {"notes.txt": True, "weights.dat": True}
    assert out["snapshot_files"] == [".gitattributes", "notes.txt", "weights.dat"]
    assert out["snapshot_equal"]
    assert out["info"]["sha"] == out["commit_oid"] and out["info"]["private"] is True
    assert list(out["info"]["lfs"]) == ["weights.dat"]
    assert out["anonymous"] == ["RepositoryNotFoundError", 404]
    assert out["missing_file"] == ["RemoteEntryNotFoundError", 404]
    assert out["bob_reads"] == ["RepositoryNotFoundError", 404]

    assert hub.read_file("alice/private-model", "weights.dat") == big
    assert hub.read_file("alice/private-model", "notes.txt") == b"hello hub\n"
    routes = set(hub.requests_log)
    assert ("POST", "/api/models/alice/private-model/preupload/main") in routes
    assert ("POST", "/alice/private-model.git/info/lfs/objects/batch") in routes
    assert ("POST", "/api/models/alice/private-model/commit/main") in routes
    puts = [path for method, path in hub.requests_log if method == "PUT"]
    assert puts == [f"/lfs-upload/{out['info']['lfs']['weights.dat']}"]  # only the big file went through LFS


def test_space_roundtrip(hub: HubServer, client: Client) -> None:
    readme = "---\ntitle: Demo\nsdk: gradio\n---\n\n# Demo space\n"
    out = client(
        """
        from huggingface_hub import hf_hub_download
        api, repo = HfApi(token=ARGS["alice"]), "alice/demo"
        url = api.create_repo(repo, repo_type="space", space_sdk="gradio")
        space = dict(repo_id=repo, repo_type="space")
        api.upload_file(path_or_fileobj=ARGS["readme"].encode(), path_in_repo="README.md", **space)
        api.upload_file(path_or_fileobj=b"import gradio\\n", path_in_repo="app.py", **space)
        try:
            api.upload_file(path_or_fileobj=b"---\\nkey: [oops\\n---\\n", path_in_repo="README.md", **space)
            bad_yaml = None
        except ValueError as exc:
            bad_yaml = str(exc)
        print(json.dumps({
            "url": str(url),
            "readme": open(hf_hub_download(repo, "README.md", repo_type="space")).read(),
            "sdk": api.space_info(repo).sdk,
            "files": api.list_repo_files(repo, repo_type="space"),
            "bad_yaml": bad_yaml,
        }))
        """,
        alice=ALICE,
        readme=readme,
    )
    assert out["url"] == f"{hub.url}/spaces/alice/demo"
    assert out["readme"] == readme
    assert out["sdk"] == "gradio"
    assert out["files"] == [".gitattributes", "README.md", "app.py"]
    assert out["bad_yaml"] is not None and "Invalid metadata in README.md" in out["bad_yaml"]
    assert hub.read_file("alice/demo", "README.md", repo_type="space") == readme.encode()
    assert ("HEAD", "/spaces/alice/demo/resolve/main/README.md") in hub.requests_log


def test_tree_deletes_and_history(hub: HubServer, client: Client) -> None:
    hub.create_repo("alice/seeded")
    first = hub.add_files("alice/seeded", {"top.txt": b"top", "a/x.dat": b"\x00\x01", "a/b/c.txt": b"deep"})
    out = client(
        """
        from huggingface_hub import hf_hub_download
        api, repo = HfApi(token=ARGS["alice"]), "alice/seeded"
        tree = lambda **kw: [[type(e).__name__, e.path] for e in api.list_repo_tree(repo, **kw)]
        result = {"top": tree(), "a": tree(path_in_repo="a"), "all": tree(recursive=True)}
        result["exists"] = [api.file_exists(repo, "top.txt"), api.file_exists(repo, "nope"),
                            api.repo_exists(repo), api.repo_exists("alice/none")]
        result["noop_oid"] = api.upload_file(path_or_fileobj=b"top", path_in_repo="top.txt", repo_id=repo).oid
        api.delete_file("top.txt", repo_id=repo)
        api.delete_folder("a/b", repo_id=repo)
        result["files"] = api.list_repo_files(repo)
        result["old_files"] = api.list_repo_files(repo, revision=ARGS["first"])
        result["old_top"] = open(hf_hub_download(repo, "top.txt", revision=ARGS["first"])).read()
        result["bad_revision"] = http_error(lambda: api.list_repo_files(repo, revision="nope"))
        result["delete_missing"] = http_error(lambda: api.delete_file("nope.txt", repo_id=repo))
        print(json.dumps(result))
        """,
        alice=ALICE,
        first=first,
    )
    assert out["top"] == [["RepoFile", ".gitattributes"], ["RepoFolder", "a"], ["RepoFile", "top.txt"]]
    assert out["a"] == [["RepoFolder", "a/b"], ["RepoFile", "a/x.dat"]]
    assert [path for _, path in out["all"]] == [".gitattributes", "a", "a/b", "a/b/c.txt", "a/x.dat", "top.txt"]
    assert out["exists"] == [True, False, True, False]
    assert out["noop_oid"] == first  # unchanged content: the client skips the commit (preupload returned its oid)
    assert out["files"] == [".gitattributes", "a/x.dat"]
    assert out["old_files"] == [".gitattributes", "a/b/c.txt", "a/x.dat", "top.txt"]
    assert out["old_top"] == "top"
    assert out["bad_revision"] == ["RevisionNotFoundError", 404]
    assert out["delete_missing"] == ["RemoteEntryNotFoundError", 404]
    assert hub.repos[("model", "alice/seeded")].commits[first]["a/x.dat"].lfs  # NUL byte in the sample => LFS


def test_transformers_push_to_hub_and_from_pretrained(hub: HubServer, client: Client) -> None:
    out = client(
        """
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
        model = LlamaForCausalLM(config)
        model.push_to_hub("alice/tiny-llama", token=ARGS["alice"])
        loaded = LlamaForCausalLM.from_pretrained("alice/tiny-llama")
        a, b = model.state_dict(), loaded.state_dict()
        print(json.dumps({"same_keys": sorted(a) == sorted(b), "equal": all(torch.equal(a[k], b[k]) for k in a)}))
        """,
        alice=ALICE,
    )
    assert out == {"same_keys": True, "equal": True}
    files = hub.list_files("alice/tiny-llama")
    assert {"README.md", "config.json", "model.safetensors"} <= set(files)
    assert ("POST", "/api/validate-yaml") in hub.requests_log
    assert ("POST", "/alice/tiny-llama.git/info/lfs/objects/batch") in hub.requests_log  # *.safetensors is LFS
    assert json.loads(hub.read_file("alice/tiny-llama", "config.json"))["hidden_size"] == 32


def test_resolve_headers(hub: HubServer) -> None:
    hub.create_repo("alice/raw")
    binary = b"\0" * 100
    commit = hub.add_files("alice/raw", {"small.txt": b"hello", "blob.dat": binary})
    status, headers = _head(f"{hub.url}/alice/raw/resolve/main/small.txt")
    assert status == 200 and headers["X-Repo-Commit"] == commit and headers["Content-Length"] == "5"
    assert headers["ETag"] == '"b6fc4c620b67d95f953a5c1c1230aaab5db5a1b0"'  # git blob oid of b"hello"
    status, headers = _head(f"{hub.url}/alice/raw/resolve/main/blob.dat")
    sha256 = hashlib.sha256(binary).hexdigest()
    assert status == 302 and headers["X-Repo-Commit"] == commit
    assert (headers["X-Linked-Etag"], headers["X-Linked-Size"]) == (f'"{sha256}"', "100")
    assert headers["Location"].startswith(f"http://localhost:{hub.port}/cdn-lfs/{sha256}?sig=")
    assert _head(headers["Location"])[0] == 200
    assert _head(headers["Location"].replace("sig=", "sig=0"))[0] == 403
    status, headers = _head(f"{hub.url}/alice/raw/resolve/main/nope.txt")
    assert (status, headers["X-Error-Code"], headers["X-Repo-Commit"]) == (404, "EntryNotFound", commit)
    assert _head(f"{hub.url}/alice/nope/resolve/main/a.txt")[1]["X-Error-Code"] == "RepoNotFound"
    assert _head(f"{hub.url}/alice/raw/resolve/v9/small.txt")[1]["X-Error-Code"] == "RevisionNotFound"


def test_raw_api_validation(hub: HubServer) -> None:
    assert _post(f"{hub.url}/api/repos/create", {"name": "bad..name"}, ALICE)[0] == 400
    assert _post(f"{hub.url}/api/repos/create", {"name": "-dash"}, ALICE)[0] == 400
    assert _post(f"{hub.url}/api/repos/create", {"name": "s", "type": "space", "sdk": "nope"}, ALICE)[0] == 400
    status, body = _post(f"{hub.url}/api/repos/create", {"name": "ok"}, "hf_nope")
    assert (status, body) == (401, {"error": "Invalid credentials in Authorization header"})
    valid = _post(f"{hub.url}/api/validate-yaml", {"content": "---\nlicense: mit\n---\nhi"})
    assert valid == (200, {"errors": [], "warnings": []})
    status, body = _post(f"{hub.url}/api/validate-yaml", {"content": "---\na: [b\n---\n"})
    assert status == 400 and body["errors"]


def test_cli_subprocess_persists_to_root(tmp_path: Path) -> None:
    script = Path(__file__).with_name("hub_server.py")
    args = ["--port", "0", "--root", str(tmp_path / "root"), "--token", "hf_carol=carol", "-v"]
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().strip().removeprefix("HF_ENDPOINT=")
        status, body = _post(f"{endpoint}/api/repos/create", {"name": "persisted"}, "hf_carol")
        assert (status, body["url"]) == (200, f"{endpoint}/carol/persisted")
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    assert "POST /api/repos/create" in stderr and "hf_carol" not in stderr
    reloaded = HubServer(root=tmp_path / "root")
    assert reloaded.list_files("carol/persisted") == [".gitattributes"]
    assert reloaded.read_file("carol/persisted", ".gitattributes").startswith(b"*.7z filter=lfs")
