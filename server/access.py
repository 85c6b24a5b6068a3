"""Who may do what: the owner or a visitor, decided by the server from the launch options, the login and OAuth.

- Unshared app (loopback, no share link, not a Space): the one user at the keyboard is the owner.
- Space: the owner is the signed-in user who owns it (the Space's author, a member of the organization
  that owns it, or a name in APP_OWNERS). Everyone else is a visitor.
- Shared local app: an owner is a user in APP_OWNERS who logged in through --auth; everyone else is a visitor.

`may(role, action)` is the whole policy, a pure function. The UI greys out what a visitor may not do,
but that is a courtesy: every handler calls `require` itself, since a disabled button can be bypassed
by any HTTP client.
"""

from __future__ import annotations

import enum
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from core.errors import EngineError
from core.spec import names_embedded, parse_model
from server.settings import Settings


class AccessDenied(EngineError):
    title = "Not allowed"


class Role(enum.Enum):
    OWNER = "owner"
    VISITOR = "visitor"


class Action(enum.Enum):
    CHAT = "chat with the loaded model"
    PLAN = "plan a placement or check the fit"
    PUSH_OWN = "push a copy to your own account with your own sign-in"
    LOAD = "load or unload a model, or change its quantization or placement"
    FAST_PATH = "turn the fast path on or off"
    COMPARE = "compare quantized variants (it reloads the model)"
    QUALITY = "run the quality check (it reloads the model)"
    SAVE = "save the model on the server"
    PUSH_SERVER = "push with the server's Hugging Face token"
    LOCAL_FOLDER = "name a folder on the server as the model"


VISITOR_ACTIONS = frozenset({Action.CHAT, Action.PLAN, Action.PUSH_OWN})


def may(role: Role, action: Action) -> bool:
    return role is Role.OWNER or action in VISITOR_ACTIONS


@dataclass(frozen=True)
class Caller:
    role: Role
    name: str | None  # the login (--auth) or Hugging Face user name, when known
    key: str  # what the visitor rate is counted by: the name, else the address

    @property
    def is_owner(self) -> bool:
        return self.role is Role.OWNER


def identify(settings: Settings, login: str | None, profile: dict | None, address: str) -> Caller:
    """The caller's role. `login` is the --auth user name, `profile` the Hugging Face OAuth profile (on a Space)."""
    if not settings.shared:
        return Caller(Role.OWNER, login, login or address)
    if settings.on_space:
        user = (profile or {}).get("preferred_username")
        orgs = {o.get("preferred_username") for o in (profile or {}).get("orgs") or [] if isinstance(o, dict)}
        owner = bool(user) and (user == settings.space_author or user in settings.owners
                                or (settings.space_author is not None and settings.space_author in orgs))
        return Caller(Role.OWNER if owner else Role.VISITOR, user, user or address)
    owner = bool(login) and bool(settings.auth) and login in settings.owners
    return Caller(Role.OWNER if owner else Role.VISITOR, login, login or address)


def require(caller: Caller, action: Action) -> None:
    if not may(caller.role, action):
        raise AccessDenied(f"Only the owner of this app may {action.value}. {visitor_note()}")


def visitor_note() -> str:
    return ("Visitors may chat with the loaded model, see the plan and the fit check, and on a Space push a copy "
            "to their own account after signing in.")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}$")


def checked_model(caller: Caller, settings: Settings, text: str | None) -> str:
    """The model a caller may name: visitors only Hub ids or the embedded model, checked before any file is looked
    at (so a refusal never says whether a folder exists); owners of a shared app only folders under APP_MODEL_DIRS;
    nobody a folder inside Gradio's upload area."""
    value = (text or "").strip()
    if not caller.is_owner:
        if not names_embedded(value) and not _HUB_ID.match(value):
            raise AccessDenied("Visitors may name a Hub model id (like 'HuggingFaceTB/SmolLM2-360M-Instruct') or "
                               "leave the model empty for the embedded one; folders on the server are for the owner.")
        return parse_model(value, allow_local=False)
    model = parse_model(value)
    if not model.startswith("/"):
        return model
    path = Path(model)
    if _inside(path, [uploads_dir()]):
        raise AccessDenied("Folders in Gradio's upload area can't be loaded as models: anyone can write there.")
    if settings.shared and not _inside(path, list(settings.model_dirs)):
        raise AccessDenied("On a shared app, local model folders must be under APP_MODEL_DIRS "
                           f"({'not set' if not settings.model_dirs else 'this one is not'}).")
    return model


def uploads_dir() -> Path:
    import os

    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def _inside(path: Path, roots: list[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved == root or root in resolved.parents for root in roots)


def push_token(caller: Caller, settings: Settings, oauth_token: str | None, repo_id: str) -> str | None:
    """The token a push may use: a visitor's own OAuth token into their own namespace only; the owner's OAuth token
    or, failing that, the server's (HF_TOKEN or the cached login)."""
    if caller.is_owner:
        if oauth_token:
            return oauth_token
        from huggingface_hub import get_token

        return get_token()
    if not settings.on_space or not oauth_token or not caller.name:
        raise AccessDenied("Only the owner may push with the server's token. On a Space, sign in with Hugging Face "
                           "to push a copy to your own account.")
    namespace = repo_id.split("/", 1)[0]
    if namespace != caller.name:
        raise AccessDenied(f"Visitors may push only into their own namespace: write the repo id as "
                           f"'{caller.name}/model-name'.")
    return oauth_token


_PATH = re.compile(r"(?<![\w.:/])(?:~|/)(?:[\w.@+-]+/)+[\w.@+-]*|(?<![\w.:/])/[\w.@+-]{2,}")


def redact_paths(message: str) -> str:
    """Server paths out of a message meant for a visitor."""
    return _PATH.sub("<server path>", message)
