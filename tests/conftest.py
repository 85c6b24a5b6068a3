"""Shared fixtures: an isolated cache, the embedded model converted once, loaded models per quantization.

Every test runs on the CPU with the real embedded SmolLM2-135M-Instruct. User paths (the converted
checkpoint cache, the Hugging Face home) live in a temporary folder for the whole session.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="llm-app-tests-"))
os.environ.setdefault("LLM_APP_CACHE", str(_SESSION_DIR / "cache"))
os.environ["HF_HOME"] = str(_SESSION_DIR / "hf-home")
# No test may reach the real Hub: the default endpoint is a closed local port, and Hub tests name the
# local server (tests/hub_server.py) explicitly. Xet uploads need Xet storage, which that server does not speak.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_OFFLINE"] = "0"
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


@pytest.fixture(scope="session")
def app_url(checkpoint, hub_server, session_dir):
    port = free_port()
    env = subprocess_env(**{**hub_server.env(session_dir / "app-hf-home"), "HF_HUB_OFFLINE": "0",
                            "HF_TOKEN": WRITE_TOKEN, "GRADIO_SERVER_PORT": str(port), "APP_PRELOAD": "1"})
    log = open(session_dir / "app.log", "w")
    process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app exited: {(session_dir / 'app.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        raise RuntimeError("app did not start in 180 s")
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()
    assert WRITE_TOKEN not in (session_dir / "app.log").read_text()  # secrets never reach the log


@pytest.fixture(scope="session")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)
