"""Launch options: where the app listens, who may log in, who owns it, and the limits; read once at start.

Each option has a command-line flag and an environment variable (the flag wins). The app is
*shared* when it listens beyond loopback, has `--share`, runs on a Space (`SPACE_ID`), or
`APP_SHARED=1` is set (behind a reverse proxy, or in tests); unshared, its one user is the owner.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from core import saves
from server.limits import Limits


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _paths(text: str) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser().resolve() for p in text.split(os.pathsep) if p.strip())


def parse_auth(text: str | None) -> tuple[tuple[str, str], ...]:
    """'alice:secret' or 'alice:secret,bob:other' -> (('alice', 'secret'), ('bob', 'other'))."""
    pairs = []
    for item in (text or "").split(","):
        user, found, password = item.strip().partition(":")
        if item.strip() and (not found or not user or not password):
            raise SystemExit("--auth/APP_AUTH takes user:password pairs separated by commas, like 'alice:secret'")
        if found:
            pairs.append((user, password))
    return tuple(pairs)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # passwords never reach a log line
    owners: frozenset[str] = frozenset()
    shared_flag: bool = False  # APP_SHARED=1
    space_id: str | None = None  # SPACE_ID, set by Hugging Face on a Space
    space_author: str | None = None  # SPACE_AUTHOR_NAME: the user or organization that owns the Space
    trust_remote_code: bool = False
    trust_proxy: bool = False  # APP_TRUST_PROXY=1: take visitors' addresses from X-Forwarded-For
    save_dir: Path = field(default_factory=saves.save_root)
    model_dirs: tuple[Path, ...] = ()
    preload: bool = True
    limits: Limits = field(default_factory=Limits)
    api: bool = False  # --api / APP_OPENAI_API=1: the OpenAI-compatible endpoint under /v1
    api_key: str | None = field(default=None, repr=False)  # APP_API_KEY: the bearer key it requires
    metrics: bool = True  # APP_METRICS=0 turns off /metrics (served beside the API)

    def api_problem(self) -> str | None:
        """Why the API may not start as configured: a shared deployment or a login without a key."""
        if self.api and not self.api_key and (self.shared or self.auth):
            return ("--api on a shared app (or one with --auth) needs APP_API_KEY: without a key the endpoint "
                    "would open a way around the login to anyone who can reach it.")
        return None

    @property
    def on_space(self) -> bool:
        return bool(self.space_id)

    @property
    def shared(self) -> bool:
        return self.shared_flag or self.share or self.on_space or not is_loopback(self.host)

    def warnings(self) -> list[str]:
        """What the operator should know at start (printed, never shown to visitors)."""
        notes = []
        if self.shared and not self.auth and not self.on_space:
            notes.append("The app is shared without --auth: anyone who can reach it can chat with the model. "
                         "Visitors cannot load, save or push (see the README's Security model).")
        if self.shared and not self.on_space and not (self.auth and self.owners):
            notes.append("No owner can sign in to this shared app (it needs --auth and APP_OWNERS): loading, "
                         "saving and pushing are off for everyone; the model set at start stays loaded.")
        if self.trust_remote_code:
            notes.append("--trust-remote-code is on: loading a model may run code from its repository.")
        return notes


def parse_args(argv: list[str] | None = None) -> Settings:
    env = os.environ
    parser = argparse.ArgumentParser(description="Quantized LLM app")
    parser.add_argument("--host", default=env.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", default=_flag("APP_SHARE"),
                        help="create a public share link for collaborators (APP_SHARE=1)")
    parser.add_argument("--auth", default=env.get("APP_AUTH"),
                        help="user:password pairs, comma-separated, required to open the app (APP_AUTH)")
    parser.add_argument("--owners", default=env.get("APP_OWNERS", ""),
                        help="comma-separated user names who own a shared app (APP_OWNERS)")
    parser.add_argument("--trust-remote-code", action="store_true", default=_flag("APP_TRUST_REMOTE_CODE"),
                        help="allow models whose repository ships its own code (APP_TRUST_REMOTE_CODE=1)")
    parser.add_argument("--api", action="store_true", default=_flag("APP_OPENAI_API"),
                        help="serve an OpenAI-compatible API under /v1 (APP_OPENAI_API=1; key: APP_API_KEY)")
    parser.add_argument("--no-preload", dest="preload", action="store_false",
                        default=env.get("APP_PRELOAD", "1") != "0",
                        help="start without loading the default model (APP_PRELOAD=0)")
    args = parser.parse_args(argv)
    return Settings(
        host=args.host, port=args.port, share=args.share, auth=parse_auth(args.auth),
        owners=frozenset(o.strip() for o in args.owners.split(",") if o.strip()),
        shared_flag=_flag("APP_SHARED"), space_id=env.get("SPACE_ID") or None,
        space_author=env.get("SPACE_AUTHOR_NAME") or None, trust_remote_code=args.trust_remote_code,
        trust_proxy=_flag("APP_TRUST_PROXY"), save_dir=saves.save_root(),
        model_dirs=_paths(env.get("APP_MODEL_DIRS", "")), preload=args.preload, limits=Limits.from_env(),
        api=args.api, api_key=env.get("APP_API_KEY") or None, metrics=env.get("APP_METRICS", "1").strip() != "0",
    )
