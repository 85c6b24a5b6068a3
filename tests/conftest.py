"""Shared fixtures: an isolated cache, the embedded model converted once, loaded models per quantization.

Every test runs on the CPU with the real embedded SmolLM2-135M-Instruct. User paths (the converted
checkpoint cache, the Hugging Face home) live in a temporary folder for the whole session.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="llm-app-tests-"))
os.environ.setdefault("LLM_APP_CACHE", str(_SESSION_DIR / "cache"))
os.environ["HF_HOME"] = str(_SESSION_DIR / "hf-home")
os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the real Hub; Hub tests use a local server
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.pop("HF_TOKEN", None)
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    from core import default_model

    return default_model.ensure_checkpoint()


@pytest.fixture(scope="session")
def loaded_models(checkpoint):
    """One loaded embedded model per quantization, loaded on first use."""
    from core import loading
    from core.spec import LoadSpec, QuantSpec

    cache = {}

    def get(mode: str):
        if mode not in cache:
            cache[mode] = loading.load(LoadSpec(quant=QuantSpec(mode=mode)))
        return cache[mode]

    return get


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


WRITE_TOKEN = "hf_alice_write_token_0123456789"
OTHER_TOKEN = "hf_bob_token_0123456789"


@pytest.fixture(scope="session")
def hub_server(session_dir):
    """A local server speaking the Hub API subset that huggingface_hub uses (see tests/hub_server.py)."""
    from hub_server import HubServer

    with HubServer({WRITE_TOKEN: "alice", OTHER_TOKEN: "bob"}) as server:
        yield server


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
