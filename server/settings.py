"""Launch options: where the app listens, who may log in, who owns it, whose proxies it trusts, and the limits; read
once at start.

Each option has a command-line flag and an environment variable (the flag wins). The app is
*shared* when it listens beyond loopback, has `--share`, runs on a Space, or `APP_SHARED=1` is set
(behind a reverse proxy, or in tests); unshared, its one user is the owner.

The app runs on a Space exactly when Gradio thinks so (`gradio.utils.get_space()`: `SYSTEM=spaces` and
`SPACE_ID`, which Hugging Face sets): that is when Gradio mounts the real Hugging Face sign-in. Anywhere
else Gradio would mount a mocked sign-in that logs anyone in as the user behind the server's token, so
outside a Space the app offers no sign-in at all and no profile counts.
"""

from __future__ import annotations

import argparse
import importlib.util
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


LOOPBACK = ("127.0.0.0/8", "::1/128")
PRIVATE_NETWORKS = (*LOOPBACK, "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
"""Where a reverse proxy of this machine or its network connects from; on a Space, Hugging Face's proxy (10.x)."""
OAUTH_VARIABLES = ("OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "OAUTH_SCOPES", "OPENID_PROVIDER_URL")


def parse_proxies(text: str | None, on_space: bool, share: bool) -> tuple[str, ...]:
    """APP_TRUST_PROXY -> the proxies whose X-Forwarded-For is believed: 1 PRIVATE_NETWORKS, or a comma-separated
    list of addresses and networks ('10.0.0.5, 172.18.0.0/16'). Unset: none, except on a Space (its proxy, on
    PRIVATE_NETWORKS) and with --share (the link's tunnel client, which runs on this machine)."""
    value = (text or "").strip()
    if not value:
        return PRIVATE_NETWORKS if on_space else LOOPBACK if share else ()
    if value.lower() in ("0", "false", "no", "off"):
        return ()
    if value.lower() in ("1", "true", "yes", "on"):
        return PRIVATE_NETWORKS
    proxies = tuple(p.strip() for p in value.split(",") if p.strip())
    for proxy in proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise SystemExit(f"APP_TRUST_PROXY={value!r}: {proxy!r} is not an address or a network; give 1 (a proxy "
                             "on this machine or its private network) or addresses like '10.0.0.5, 172.18.0.0/16'")
    return proxies


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
    space_id: str | None = None  # SPACE_ID on a Space (see the module's docstring), else None
    space_author: str | None = None  # SPACE_AUTHOR_NAME: the user or organization that owns the Space
    ignored_space_id: str | None = None  # SPACE_ID set where Gradio sees no Space (a copied configuration)
    trust_remote_code: bool = False
    trusted_proxies: tuple[str, ...] = ()  # APP_TRUST_PROXY: whose X-Forwarded-For counts (parse_proxies)
    save_dir: Path = field(default_factory=saves.save_root)
    model_dirs: tuple[Path, ...] = ()
    preload: bool = True
    limits: Limits = field(default_factory=Limits)
    api: bool = False  # --api / APP_OPENAI_API=1: the OpenAI-compatible endpoint under /v1
    api_key: str | None = field(default=None, repr=False)  # APP_API_KEY: the bearer key it requires
    metrics: bool = True  # APP_METRICS=0 turns off /metrics (served beside the API)

    def start_problem(self) -> str | None:
        """Why the app may not start as configured: an API that would bypass the login, or a Space whose sign-in
        cannot work (so nobody could ever be its owner)."""
        if self.api and not self.api_key and (self.shared or self.auth):
            return ("--api on a shared app (or one with --auth) needs APP_API_KEY: without a key the endpoint "
                    "would open a way around the login to anyone who can reach it.")
        if self.on_space:
            missing = [name for name in OAUTH_VARIABLES if not os.environ.get(name)]
            if missing:
                return (f"This Space has no Hugging Face sign-in ({', '.join(missing)} not set): add `hf_oauth: true` "
                        "to the front matter of its README.md, as space/README.md has it.")
            absent = [name for name in ("authlib", "itsdangerous") if importlib.util.find_spec(name) is None]
            if absent:
                return (f"The Hugging Face sign-in needs {' and '.join(absent)}: install the requirements "
                        "(gradio[oauth]), as requirements.txt and space/requirements.txt list them.")
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
        if self.ignored_space_id:
            notes.append(f"SPACE_ID={self.ignored_space_id} is set, but this is not a Hugging Face Space (SYSTEM is "
                         "not 'spaces'): Hugging Face sign-in is off here and nobody becomes the owner through it.")
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
    from gradio.utils import get_space

    space_id = get_space()
    return Settings(
        host=args.host, port=args.port, share=args.share, auth=parse_auth(args.auth),
        owners=frozenset(o.strip() for o in args.owners.split(",") if o.strip()),
        shared_flag=_flag("APP_SHARED"), space_id=space_id or None,
        space_author=(env.get("SPACE_AUTHOR_NAME") or None) if space_id else None,
        ignored_space_id=None if space_id else env.get("SPACE_ID") or None, trust_remote_code=args.trust_remote_code,
        trusted_proxies=parse_proxies(env.get("APP_TRUST_PROXY"), bool(space_id), args.share),
        save_dir=saves.save_root(),
        model_dirs=_paths(env.get("APP_MODEL_DIRS", "")), preload=args.preload, limits=Limits.from_env(),
        api=args.api, api_key=env.get("APP_API_KEY") or None, metrics=env.get("APP_METRICS", "1").strip() != "0",
    )
