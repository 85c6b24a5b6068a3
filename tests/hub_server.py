"""A local stand-in for the Hugging Face Hub HTTP API, so tests can drive the real client offline.

Tests point the real ``huggingface_hub`` client (and ``transformers``' ``push_to_hub`` / ``from_pretrained``) at
``HF_ENDPOINT=http://127.0.0.1:PORT`` with ``HF_HUB_DISABLE_XET=1`` and run the whole request flow end to end,
without the internet and without mocks. Both variables are read when ``huggingface_hub`` is imported, so set them
before that import (``HubServer.env()`` returns them), typically in a client subprocess.

Implemented subset (repo types model, dataset and space; writes go to the ``main`` branch only):

* ``GET /api/whoami-v2``; ``POST /api/repos/create`` (400 for a bad name, 403 for another namespace, 409 with
  ``url`` in the body, which ``create_repo(exist_ok=True)`` reads).
* The classic upload flow: ``POST /api/{type}s/{id}/preupload/main`` says "lfs" when the path matches the repo's
  ``.gitattributes``, the file is over 10 MiB or its sample holds a NUL byte; ``POST [{type}s/]{id}.git/info/lfs/
  objects/batch`` gives a signed, token-less ``PUT`` href (basic transfer) and a ``verify`` action; then the ndjson
  ``POST /api/{type}s/{id}/commit/main`` applies file / lfsFile / deletedFile / deletedFolder lines.
* Reads: ``GET /api/{type}s/{id}[/revision/{rev}]`` (``?blobs=true`` adds sizes and LFS info), ``GET /api/{type}s/
  {id}/tree/{rev}[/{path}]`` (``?recursive=true``) and ``HEAD``/``GET [/{type}s]/{id}/resolve/{rev}/{path}``.
  Regular files come back directly with ``ETag`` (git blob oid) and ``X-Repo-Commit``. LFS files get a 302 with
  ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``, pointing to a signed "CDN" URL on the other loopback name
  (``localhost`` <-> ``127.0.0.1``), so the client treats it as a foreign host and drops the token, as it does
  with the Hub's real CDN.
* ``POST /api/validate-yaml``: parses the card's front matter with PyYAML (400 with ``errors`` if invalid).
* Sign-in with Hugging Face, as a Space's ``hf_oauth`` uses it (OpenID Connect, authorization-code flow): ``GET
  /.well-known/openid-configuration``, ``GET /oauth/authorize`` (the user signed in at the Hub is the bearer of the
  request, where a browser would carry the Hub's session cookie; answers with a redirect carrying a one-time code),
  ``POST /oauth/token`` (client secret by HTTP Basic; returns an access token the API above then accepts for that
  user, and an RS256-signed ``id_token`` with the profile and ``orgs``) and ``GET /oauth/jwks``. Register a Space's
  OAuth app with ``oauth_client()``, organizations with ``orgs``.

Errors carry the ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) and ``X-Error-Message``
headers plus a JSON ``{"error": ...}`` body: that is what the client maps to its exception classes. Private repos
are visible to their owner only (404 for everyone else). Each commit gets a random 40-hex oid and a full snapshot of
the tree, so older revisions stay readable. Blobs are stored by sha256, in memory or under ``root`` (which also keeps
``state.json``). Request headers are never logged, so tokens never reach a log.

In-process: ``with HubServer({"hf_alice": "alice"}) as hub: ...``. As a subprocess:
``python tests/hub_server.py --port 0 --root DIR --token hf_alice=alice`` prints ``HF_ENDPOINT=http://...`` first.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

try:
    import yaml
except ImportError:  # pragma: no cover - PyYAML comes with huggingface_hub
    yaml = None  # type: ignore[assignment]

LFS_THRESHOLD = 10 * 1024 * 1024
_LFS_PATTERNS = (
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy *.npz *.onnx"
    " *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.* *.tar *.tflite *.tgz"
    " *.wasm *.xz *.zip *.zst *tfevents*"
).split()
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in _LFS_PATTERNS)
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_PLURAL_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_SPACE_SDKS = ("gradio", "docker", "static", "streamlit")
_NAME_RE = re.compile(r"(?!.*(?:--|\.\.))[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?", re.ASCII)
_YAML_BLOCK_RE = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
_API = r"/api/(?P<tp>models|datasets|spaces)/(?P<id>[^/]+/[^/]+)"  # /api/{type}s/{repo_id}
_WEB = r"/(?:(?P<tp>datasets|spaces)/)?(?P<id>[^/]+/[^/]+)"  # /[{type}s/]{repo_id}, no prefix for models

Response = tuple[int, dict[str, str], bytes]


class HubError(Exception):
    """An HTTP error, answered the way the Hub does: JSON body plus ``X-Error-*`` headers."""

    def __init__(self, status: int, message: str, code: str | None = None, *,
                 headers: Mapping[str, str] | None = None, **extra: Any) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = dict(headers or {}), extra

    def response(self) -> Response:
        headers = {"X-Error-Message": self.message, **self.headers}
        if self.code:
            headers["X-Error-Code"] = self.code
        return _json({"error": self.message, **self.extra}, self.status, headers)


@dataclass(frozen=True)
class FileEntry:
    """A file in one commit: content sha256 (the blob key), size, git oid, and whether it is stored with LFS."""

    sha256: str
    size: int
    oid: str
    lfs: bool

    def tree_json(self, path: str) -> dict[str, Any]:
        info: dict[str, Any] = {"type": "file", "oid": self.oid, "size": self.size, "path": path}
        if self.lfs:
            info["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(_pointer(self.sha256, self.size))}
        return info


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    sdk: str | None
    created_at: str
    last_modified: str
    head: str  # commit oid of main
    commits: dict[str, dict[str, FileEntry]]  # commit oid -> full tree snapshot, oldest first

    @property
    def owner(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str) -> tuple[str, dict[str, FileEntry]]:
        sha = self.head if revision == "main" else revision
        if sha not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha, self.commits[sha]


@dataclass
class _Request:
    query: dict[str, str]
    body: bytes
    base: str  # http://host:port, as the client addressed us
    user: str | None  # owner of a valid bearer token, if one was sent
    client_auth: str | None = None  # the Authorization header of an OAuth app's token request

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as exc:
            raise HubError(400, f"Invalid JSON body: {exc}") from exc


def _json(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubServer:
    """The Hub API subset above on a ``ThreadingHTTPServer``. ``tokens`` maps each valid bearer token to a user."""

    def __init__(
        self,
        tokens: Mapping[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        root: str | Path | None = None,
        lfs_threshold: int = LFS_THRESHOLD,
        verbose: bool = False,
    ) -> None:
        self.tokens: dict[str, str] = dict(tokens or {})
        self.host, self.port, self.verbose, self.lfs_threshold = host, port, verbose, lfs_threshold
        self.root = Path(root) if root is not None else None
        self.requests_log: list[tuple[str, str]] = []  # (method, path without the query string)
        self.repos: dict[tuple[str, str], Repo] = {}  # (repo_type, repo_id) -> Repo
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.RLock()
        self._secret = secrets.token_bytes(16)
        self.orgs: dict[str, list[str]] = {}  # user -> the organizations the id_token says they belong to
        self._oauth_clients: dict[str, str] = {}  # client id -> secret
        self._codes: dict[str, dict[str, str]] = {}  # one-time authorization codes
        self._signing_key: Any = None  # RSA key for id_tokens, made on first use (joserfc comes with authlib)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        if self.root is not None:
            (self.root / "blobs").mkdir(parents=True, exist_ok=True)
            self._load()
        routes: list[tuple[str, str, Callable[[_Request, dict[str, str]], Response]]] = [
            ("GET", r"/api/whoami-v2", self._whoami),
            ("POST", r"/api/repos/create", self._create_repo_route),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("GET", _API + r"(?:/revision/(?P<rev>[^/]+))?", self._info),
            ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self._tree),
            ("POST", _API + r"/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", _API + r"/commit/(?P<rev>[^/]+)", self._commit),
            ("POST", _WEB + r"\.git/info/lfs/objects/batch", self._lfs_batch),
            ("POST", _WEB + r"\.git/info/lfs/objects/verify", self._lfs_verify),
            ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self._lfs_put),
            ("GET HEAD", r"/cdn-lfs/(?P<oid>[0-9a-f]{64})", self._cdn),
            ("GET HEAD", _WEB + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self._resolve),
            ("GET", r"/\.well-known/openid-configuration", self._openid_configuration),
            ("GET", r"/oauth/authorize", self._authorize),
            ("POST", r"/oauth/token", self._token),
            ("GET", r"/oauth/jwks", self._jwks),
        ]
        self._routes = [(methods.split(), re.compile(pattern), handler) for methods, pattern, handler in routes]

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        """The value for ``HF_ENDPOINT``."""
        return f"http://{self.host}:{self.port}"

    def env(self, hf_home: str | Path) -> dict[str, str]:
        """Variables to merge into a client process's environment (set before importing huggingface_hub)."""
        return {
            "HF_ENDPOINT": self.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",  # tests/conftest.py turns offline mode on for the whole session
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def start(self) -> HubServer:
        """Bind (``port=0`` picks a free port, then stored in ``self.port``) and serve in a daemon thread."""
        self._httpd = _HTTPServer((self.host, self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None and self._thread is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers for tests
    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False,
                    sdk: str | None = None) -> Repo:  # fmt: skip
        """Create a repo directly; like the Hub, its initial commit holds a ``.gitattributes``."""
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                raise ValueError(f"{repo_type} repo {repo_id} already exists")
            oid, now = secrets.token_hex(20), _now()
            tree = {".gitattributes": self._store(GITATTRIBUTES.encode(), lfs=False)}
            repo = self.repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, private, sdk, now, now, oid, {oid: tree})
            self._save()
            return repo

    def add_files(self, repo_id: str, files: Mapping[str, bytes], *, repo_type: str = "model") -> str:
        """Commit ``files`` (path -> content) to main directly, with the same LFS rules; returns the commit oid."""
        with self._lock:
            repo = self.repos[(repo_type, repo_id)]
            tree = dict(repo.commits[repo.head])
            patterns = self._lfs_patterns(tree)
            for path, data in files.items():
                tree[path] = self._store(data, self._needs_lfs(path, len(data), data[:512], patterns))
            return self._new_commit(repo, tree)

    def read_file(self, repo_id: str, path: str, repo_type: str = "model", revision: str = "main") -> bytes:
        return self._get_blob(self.repos[(repo_type, repo_id)].resolve(revision)[1][path].sha256)

    def list_files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[str]:
        return sorted(self.repos[(repo_type, repo_id)].resolve(revision)[1])

    def oauth_client(self, client_id: str, secret: str) -> dict[str, str]:
        """Registers a Space's OAuth app; returns the variables Hugging Face sets in such a Space."""
        self._oauth_clients[client_id] = secret
        return {"OAUTH_CLIENT_ID": client_id, "OAUTH_CLIENT_SECRET": secret, "OPENID_PROVIDER_URL": self.url,
                "OAUTH_SCOPES": "openid profile write-repos manage-repos"}

    # ------------------------------------------------------------------ storage
    def _store(self, data: bytes, lfs: bool) -> FileEntry:
        sha = hashlib.sha256(data).hexdigest()
        if self.root is None:
            self._blobs[sha] = data
        elif not (path := self.root / "blobs" / sha).exists():
            tmp = path.with_name(f"{sha}.{secrets.token_hex(4)}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return FileEntry(sha, len(data), _git_oid(_pointer(sha, len(data)) if lfs else data), lfs)

    def _get_blob(self, sha: str) -> bytes:
        return self._blobs[sha] if self.root is None else (self.root / "blobs" / sha).read_bytes()

    def _blob_size(self, sha: str) -> int | None:
        if self.root is None:
            return len(self._blobs[sha]) if sha in self._blobs else None
        path = self.root / "blobs" / sha
        return path.stat().st_size if path.exists() else None

    def _save(self) -> None:
        if self.root is not None:
            tmp = self.root / "state.json.tmp"
            tmp.write_text(json.dumps([asdict(repo) for repo in self.repos.values()]))
            tmp.replace(self.root / "state.json")

    def _load(self) -> None:
        if self.root is not None and (path := self.root / "state.json").exists():
            for raw in json.loads(path.read_text()):
                commits = {c: {p: FileEntry(**e) for p, e in tree.items()} for c, tree in raw.pop("commits").items()}
                repo = Repo(**raw, commits=commits)
                self.repos[(repo.repo_type, repo.repo_id)] = repo

    def _new_commit(self, repo: Repo, tree: dict[str, FileEntry]) -> str:
        oid = secrets.token_hex(20)
        repo.commits[oid], repo.head, repo.last_modified = tree, oid, _now()
        self._save()
        return oid

    # ------------------------------------------------------------------ dispatch and access rules
    def handle(self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes) -> Response:
        """Answer one request; ``path`` is still percent-encoded, ``headers`` use ``Title-Case`` names."""
        with self._lock:
            self.requests_log.append((method, path))
        try:
            for methods, pattern, handler in self._routes:
                if method in methods and (match := pattern.fullmatch(path)):
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    signed = handler in (self._lfs_put, self._cdn)  # token-less, signed URLs
                    client = handler == self._token  # authenticates an OAuth app (HTTP Basic), not a user
                    user = None if signed or client else self._user(headers.get("Authorization"))
                    base = f"http://{headers.get('Host', f'{self.host}:{self.port}')}"
                    return handler(_Request(dict(parse_qsl(query)), body, base, user,
                                            headers.get("Authorization") if client else None), params)
            raise HubError(404, f"Route not found: {method} {path}")
        except HubError as exc:
            return exc.response()
        except (KeyError, ValueError, TypeError) as exc:
            return HubError(400, f"Malformed request: {exc!r}").response()

    def _user(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in self.tokens:
            raise HubError(401, INVALID_CREDENTIALS)
        return self.tokens[token.strip()]

    def _repo(self, req: _Request, params: dict[str, str], write: bool = False) -> Repo:
        if write and req.user is None:
            raise HubError(401, INVALID_CREDENTIALS)
        repo_type = _PLURAL_TYPES[params.get("tp", "models")]
        with self._lock:
            repo = self.repos.get((repo_type, params["id"]))
        if repo is None or (repo.private and req.user != repo.owner):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and req.user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {_URL_PREFIX[repo_type]}{repo.repo_id}")
        return repo

    @staticmethod
    def _check_branch(req: _Request, revision: str) -> None:
        if req.query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by the local test Hub")
        if revision != "main":
            raise HubError(404, f"Invalid rev id: {revision} (only main is writable here)", "RevisionNotFound")

    def _sign(self, *parts: str) -> str:
        return hmac.new(self._secret, ":".join(parts).encode(), "sha256").hexdigest()

    def _lfs_patterns(self, tree: Mapping[str, FileEntry]) -> list[str]:
        if ".gitattributes" not in tree:
            return []
        lines = self._get_blob(tree[".gitattributes"].sha256).decode(errors="replace").splitlines()
        return [line.split()[0] for line in lines if "filter=lfs" in line.split()[1:]]

    def _needs_lfs(self, path: str, size: int, sample: bytes, patterns: list[str]) -> bool:
        name = path.rsplit("/", 1)[-1]
        matched = any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns)
        return matched or size > self.lfs_threshold or b"\0" in sample

    # ------------------------------------------------------------------ routes: account, repos, cards
    def _whoami(self, req: _Request, params: dict[str, str]) -> Response:
        if req.user is None:
            raise HubError(401, INVALID_CREDENTIALS)
        token = {"displayName": "local-test-token", "role": "write", "createdAt": _now()}
        return _json({"type": "user", "id": hashlib.md5(req.user.encode()).hexdigest()[:24], "name": req.user,
                      "fullname": req.user, "email": f"{req.user}@localhost", "emailVerified": True, "orgs": [],
                      "auth": {"type": "access_token", "accessToken": token}})  # fmt: skip

    def _create_repo_route(self, req: _Request, params: dict[str, str]) -> Response:
        if req.user is None:
            raise HubError(401, INVALID_CREDENTIALS)
        body = req.json()
        repo_type, name, namespace = body.get("type") or "model", body.get("name"), body.get("organization") or req.user
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        if not (isinstance(name, str) and _NAME_RE.fullmatch(name) and _NAME_RE.fullmatch(namespace)) or (
            name.endswith(".git")
        ):
            raise HubError(400, "Invalid repo name: use alphanumerics, '-', '_' or '.', no '--' or '..', at most 96"
                                " chars, and do not start or end with '-' or '.'")  # fmt: skip
        if namespace != req.user:
            raise HubError(403, f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"')
        if repo_type == "space" and body.get("sdk") not in _SPACE_SDKS:
            raise HubError(400, f"Invalid sdk for a Space: expected one of {_SPACE_SDKS}")
        repo_id = f"{namespace}/{name}"
        url = f"{req.base}/{_URL_PREFIX[repo_type]}{repo_id}"
        # huggingface_hub >= 1.0 sends "visibility"; older clients send "private".
        visibility = body.get("visibility") or ("private" if body.get("private") else "public")
        try:
            self.create_repo(repo_id, repo_type=repo_type, private=visibility != "public", sdk=body.get("sdk"))
        except ValueError:
            raise HubError(409, f"You already created this {repo_type} repo", url=url) from None
        return _json({"url": url, "name": repo_id, "id": secrets.token_hex(12)})

    def _validate_yaml(self, req: _Request, params: dict[str, str]) -> Response:
        errors: list[dict[str, str]] = []
        warnings: list[dict[str, str]] = []
        match = _YAML_BLOCK_RE.search(str(req.json().get("content", "")))
        if match is None or not match.group(2).strip():
            warnings.append({"message": "empty or missing yaml metadata in repo card"})
        elif yaml is not None:
            try:
                if not isinstance(yaml.safe_load(match.group(2)), dict):
                    errors.append({"message": "README.md metadata must be a YAML mapping"})
            except yaml.YAMLError as exc:
                errors.append({"message": f"Invalid YAML in README.md metadata: {exc}"})
        return _json({"errors": errors, "warnings": warnings}, 400 if errors else 200)

    # ------------------------------------------------------------------ routes: reads
    def _info(self, req: _Request, params: dict[str, str]) -> Response:
        repo = self._repo(req, params)
        sha, tree = repo.resolve(params.get("rev", "main"))
        with_blobs = req.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(tree.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry.size, blobId=entry.oid)
                if entry.lfs:
                    pointer_size = len(_pointer(entry.sha256, entry.size))
                    sibling["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": pointer_size}
            siblings.append(sibling)
        info = {"_id": hashlib.md5(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24], "id": repo.repo_id,
                "author": repo.owner, "sha": sha, "private": repo.private, "gated": False, "disabled": False,
                "createdAt": repo.created_at, "lastModified": repo.last_modified, "likes": 0, "tags": [],
                "siblings": siblings, "usedStorage": sum(entry.size for entry in tree.values())}  # fmt: skip
        if repo.repo_type == "model":
            info.update(modelId=repo.repo_id, downloads=0)
        elif repo.repo_type == "space":
            info.update(sdk=repo.sdk, subdomain=repo.repo_id.replace("/", "-").lower())
        return _json(info)

    def _tree(self, req: _Request, params: dict[str, str]) -> Response:
        sha, tree = self._repo(req, params).resolve(params["rev"])
        base = params.get("path", "").strip("/")
        prefix = f"{base}/" if base else ""
        recursive = req.query.get("recursive", "").lower() in ("1", "true")
        entries: dict[str, dict[str, Any]] = {}
        for path, entry in sorted(tree.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):  # parent folders to list
                folder = prefix + "/".join(parts[:depth])
                folder_oid = hashlib.sha1(f"{sha}:{folder}".encode()).hexdigest()
                entries.setdefault(folder, {"type": "directory", "oid": folder_oid, "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                entries[path] = entry.tree_json(path)
        if base and not entries:
            raise HubError(404, f"Entry not found: {base}", "EntryNotFound", headers={"X-Repo-Commit": sha})
        return _json(list(entries.values()))

    def _resolve(self, req: _Request, params: dict[str, str]) -> Response:
        sha, tree = self._repo(req, params).resolve(params["rev"])
        if (entry := tree.get(params["path"])) is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.oid}"'}
        if not entry.lfs:
            return 200, {**headers, "Content-Type": "application/octet-stream"}, self._get_blob(entry.sha256)
        # Like the Hub, send LFS content to a signed URL on a host that the client sees as a foreign CDN.
        split = urlsplit(req.base)
        cdn = f"http://{'127.0.0.1' if split.hostname == 'localhost' else 'localhost'}:{split.port}"
        headers["Location"] = f"{cdn}/cdn-lfs/{entry.sha256}?sig={self._sign(entry.sha256)}"
        return 302, {**headers, "X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)}, b""

    def _cdn(self, req: _Request, params: dict[str, str]) -> Response:
        oid = params["oid"]
        if not hmac.compare_digest(req.query.get("sig", ""), self._sign(oid)) or self._blob_size(oid) is None:
            raise HubError(403, "Invalid signature")
        return 200, {"ETag": f'"{oid}"', "Content-Type": "application/octet-stream"}, self._get_blob(oid)

    # ------------------------------------------------------------------ routes: uploads
    def _preupload(self, req: _Request, params: dict[str, str]) -> Response:
        repo = self._repo(req, params, write=True)
        self._check_branch(req, params["rev"])
        tree = repo.commits[repo.head]
        patterns = self._lfs_patterns(tree)
        files = []
        for file in req.json()["files"]:
            lfs = self._needs_lfs(file["path"], int(file["size"]), base64.b64decode(file.get("sample", "")), patterns)
            existing = tree.get(file["path"])  # the client skips files whose oid did not change
            oid = None if existing is None else existing.sha256 if existing.lfs else existing.oid
            files.append({"path": file["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})  # fmt: skip
        return _json({"files": files, "commitOid": repo.head})

    def _lfs_batch(self, req: _Request, params: dict[str, str]) -> Response:
        repo = self._repo(req, params, write=True)
        body = req.json()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' LFS batch operation is supported")
        verify = f"{req.base}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}.git/info/lfs/objects/verify"
        objects = []
        for obj in body["objects"]:
            oid, size = str(obj["oid"]), int(obj["size"])
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if self._blob_size(oid) != size:  # already stored => no "actions", so the client skips the upload
                upload = f"{req.base}/lfs-upload/{oid}?size={size}&sig={self._sign(oid, str(size))}"
                item["actions"] = {"upload": {"href": upload}, "verify": {"href": verify}}
            objects.append(item)
        return _json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, req: _Request, params: dict[str, str]) -> Response:
        oid, size = params["oid"], req.query.get("size", "")
        if not hmac.compare_digest(req.query.get("sig", ""), self._sign(oid, size)):
            raise HubError(403, "Invalid upload signature")
        if str(len(req.body)) != size or hashlib.sha256(req.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match oid {oid} and size {size}")
        self._store(req.body, lfs=True)
        return 200, {"ETag": f'"{oid}"'}, b""

    def _lfs_verify(self, req: _Request, params: dict[str, str]) -> Response:
        self._repo(req, params, write=True)
        body = req.json()
        if self._blob_size(str(body["oid"])) != int(body["size"]):
            raise HubError(404, f"LFS object {body['oid']} not found")
        return _json({"message": "ok"})

    def _commit(self, req: _Request, params: dict[str, str]) -> Response:
        repo = self._repo(req, params, write=True)
        self._check_branch(req, params["rev"])
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        with self._lock:
            if (parent := lines[0]["value"].get("parentCommit")) and parent != repo.head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[repo.head])
            for line in lines[1:]:
                self._apply(tree, line["key"], line["value"])
            oid = self._new_commit(repo, tree)
        url = f"{req.base}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{oid}"
        return _json({"success": True, "commitOid": oid, "commitUrl": url, "pullRequestUrl": None})

    def _apply(self, tree: dict[str, FileEntry], key: str, value: dict[str, Any]) -> None:
        path = str(value["path"])
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise HubError(400, f"Invalid path in repo: {path!r}")
        if key == "file":
            content = value["content"]
            data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
            if len(data) > self.lfs_threshold or b"\0" in data[:8000]:
                raise HubError(400, f"Your push was rejected: {path} is binary or over 10 MiB, upload it with LFS")
            tree[path] = self._store(data, lfs=False)
        elif key == "lfsFile":
            if (size := self._blob_size(str(value["oid"]))) is None:
                raise HubError(422, f"LFS object {value['oid']} of {path} was never uploaded")
            tree[path] = FileEntry(str(value["oid"]), size, _git_oid(_pointer(str(value["oid"]), size)), True)
        elif key in ("deletedFile", "deletedFolder"):
            folder = path.rstrip("/") + "/"
            doomed = [f for f in tree if (f == path if key == "deletedFile" else f.startswith(folder))]
            if not doomed:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            for f in doomed:
                del tree[f]
        else:
            raise HubError(400, f"Unsupported commit operation: {key}")


    # ------------------------------------------------------------------ routes: sign-in with Hugging Face (OpenID)
    def _openid_configuration(self, req: _Request, params: dict[str, str]) -> Response:
        return _json({"issuer": self.url, "authorization_endpoint": f"{self.url}/oauth/authorize",
                      "token_endpoint": f"{self.url}/oauth/token", "jwks_uri": f"{self.url}/oauth/jwks",
                      "response_types_supported": ["code"], "id_token_signing_alg_values_supported": ["RS256"],
                      "token_endpoint_auth_methods_supported": ["client_secret_basic"]})

    def _authorize(self, req: _Request, params: dict[str, str]) -> Response:
        query = req.query
        if query.get("client_id") not in self._oauth_clients or query.get("response_type") != "code":
            raise HubError(400, "Unknown OAuth app or response type")
        if req.user is None:
            raise HubError(401, "Sign in to the Hub first")
        code = secrets.token_urlsafe(16)
        with self._lock:
            self._codes[code] = {"user": req.user, "client_id": query["client_id"], "scope": query.get("scope", ""),
                                 "redirect_uri": query["redirect_uri"], "nonce": query.get("nonce", "")}
        separator = "&" if "?" in query["redirect_uri"] else "?"
        location = query["redirect_uri"] + separator + urlencode({"code": code, "state": query.get("state", "")})
        return 302, {"Location": location}, b""

    def _token(self, req: _Request, params: dict[str, str]) -> Response:
        scheme, _, encoded = (req.client_auth or "").partition(" ")
        client_id, _, secret = base64.b64decode(encoded or "").decode().partition(":") if scheme == "Basic" else \
            ("", "", "")
        if not client_id or not hmac.compare_digest(self._oauth_clients.get(client_id, ""), secret):
            raise HubError(401, "Invalid OAuth client credentials")
        form = dict(parse_qsl(req.body.decode()))
        with self._lock:
            grant = self._codes.pop(form.get("code", ""), None)
        if grant is None or grant["client_id"] != client_id or grant["redirect_uri"] != form.get("redirect_uri"):
            raise HubError(400, "Invalid or used authorization code")
        token = f"hf_oauth_{secrets.token_hex(16)}"
        self.tokens[token] = grant["user"]
        user, now = grant["user"], int(time.time())
        claims = {"iss": self.url, "sub": hashlib.md5(user.encode()).hexdigest()[:24], "aud": client_id, "iat": now,
                  "exp": now + 3600, "nonce": grant["nonce"], "name": user, "preferred_username": user,
                  "profile": f"{self.url}/{user}", "picture": f"{self.url}/avatars/{user}.png",
                  "orgs": [{"sub": org, "preferred_username": org, "name": org} for org in self.orgs.get(user, [])]}
        return _json({"access_token": token, "token_type": "bearer", "expires_in": 3600, "scope": grant["scope"],
                      "id_token": self._sign_id_token(claims)})

    def _jwks(self, req: _Request, params: dict[str, str]) -> Response:
        return _json({"keys": [self._key().as_dict(private=False)]})

    def _key(self) -> Any:
        from joserfc.jwk import RSAKey

        with self._lock:
            if self._signing_key is None:
                self._signing_key = RSAKey.generate_key(2048, parameters={"kid": "hub", "use": "sig", "alg": "RS256"})
            return self._signing_key

    def _sign_id_token(self, claims: dict[str, Any]) -> str:
        from joserfc import jwt

        return jwt.encode({"alg": "RS256", "kid": "hub"}, claims, self._key())


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: HubServer) -> None:
        super().__init__(address, _Handler)
        self.hub = hub


class _Handler(BaseHTTPRequestHandler):
    """Thin HTTP/1.1 (keep-alive) adapter: reads the whole body, lets ``HubServer.handle`` answer."""

    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections end after this
    server: _HTTPServer

    def _dispatch(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():  # httpx always sends Content-Length
            self.close_connection = True
            status, headers, payload = HubError(411, "Content-Length required").response()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            split = urlsplit(self.path)
            titled = {name.title(): value for name, value in self.headers.items()}
            status, headers, payload = self.server.hub.handle(self.command, split.path, split.query, titled, body)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.hub.verbose:  # the request line and status only: headers (and so tokens) are never logged
            super().log_message(format, *args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a local subset of the Hugging Face Hub API for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--root", help="keep blobs and state.json in this folder (default: in memory)")
    parser.add_argument("--token", action="append", default=[], metavar="TOKEN=USER", help="a valid token (repeat)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log request lines to stderr")
    args = parser.parse_args(argv)
    tokens = dict(item.split("=", 1) for item in args.token)
    hub = HubServer(tokens, host=args.host, port=args.port, root=args.root, verbose=args.verbose).start()
    print(f"HF_ENDPOINT={hub.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()


if __name__ == "__main__":
    main()
