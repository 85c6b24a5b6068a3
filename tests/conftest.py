"""Shared fixtures: an isolated cache, the embedded model converted once, loaded models per quantization.

Every test runs on the CPU with the real embedded SmolLM2-135M-Instruct. User paths (the converted
checkpoint cache, the Hugging Face home) live in a temporary folder for the whole session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
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
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(_SESSION_DIR / "hypothesis"))  # no cache in the repo
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.pop("HF_TOKEN", None)
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

QUESTION = "What is the capital of France?"


def pytest_sessionfinish(session, exitstatus):
    """The session's folder (converted checkpoint, app saves and logs: about 1.5 GB) goes with the session."""
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


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


def tiny_model(folder: Path, checkpoint: Path, **generation: object) -> Path:
    """A two-layer Llama with random weights and the embedded model's tokenizer: a real checkpoint in a second."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048)
    model = LlamaForCausalLM(config)
    for key, value in generation.items():  # sampling settings of the model's own generation_config.json
        setattr(model.generation_config, key, value)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(checkpoint / name, folder / name)
    return folder


START_TOKEN = 378  # " The" in the embedded tokenizer: the random encoder-decoders' decoder start token


def tiny_seq2seq(folder: Path, checkpoint: Path, arch: str = "t5", chat_template: bool = False) -> Path:
    """A two-layer encoder-decoder (T5 as Flan-T5 builds it, gated-GELU; or BART) with random weights and the
    embedded model's tokenizer, without its chat template unless asked: a text-to-text checkpoint in a second.

    No T5 tokenizer can be downloaded here, so the embedded one stands in: ids and special tokens are set to ones it
    has. The decoder starts from an ordinary token (" The") rather than T5's pad: a random model tends to repeat its
    start token, and a special one would decode to nothing."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    ids = dict(vocab_size=49152, pad_token_id=2, eos_token_id=2, decoder_start_token_id=START_TOKEN)
    if arch == "t5":
        config = T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                          feed_forward_proj="gated-gelu", architectures=["T5ForConditionalGeneration"], **ids)
        model = T5ForConditionalGeneration(config)
    else:
        config = BartConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                            max_position_embeddings=256, bos_token_id=1, forced_eos_token_id=None,
                            architectures=["BartForConditionalGeneration"], **ids)
        model = BartForConditionalGeneration(config)
    model.save_pretrained(folder)
    names = ("tokenizer.json", "tokenizer_config.json") + (("chat_template.jinja",) if chat_template else ())
    for name in names:
        shutil.copy(checkpoint / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def t5_folder(checkpoint, session_dir) -> Path:
    return tiny_seq2seq(session_dir / "tiny-t5", checkpoint)


def quant_state_bytes(loaded) -> int:
    """Bytes bitsandbytes keeps beside packed weights (absmax, nested stats, int8 row scales), in the canonical
    layout: on the CPU, 4-bit layers that have run hold a repacked bf16 copy (core/bnb_repack.py)."""
    total = 0
    for name, module in loaded.model.named_modules():
        weight = getattr(module, "weight", None)
        state = loaded.bnb_originals.get(name, getattr(weight, "quant_state", None))
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
        scb = getattr(weight, "SCB", None)
        if scb is not None and not any(scb is b for b in module.buffers()):
            total += scb.numel() * scb.element_size()
    return total


def canonical_snapshot(loaded):
    """Module tree, config and state dict; the state dict read through core.bnb_repack, since a plain
    state_dict() of a 4-bit CPU model that has run would change the model it reads."""
    from core import bnb_repack

    with bnb_repack.canonical_weights(loaded.model, loaded.bnb_originals):
        state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    return str(loaded.model), loaded.model.config.to_dict(), state


def run_cli(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`python -m core ARGS` from the repository, as a user runs the command line; `env` added to the environment."""
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=ROOT, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def relative_error(out, expected) -> float:
    """‖out - expected‖ / ‖expected‖; every element of `out` must have been written (kernel outputs start as NaN)."""
    assert not out.isnan().any(), "an output element was never written"
    return ((out.double() - expected).norm() / expected.norm()).item()


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)  # keep what is there
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


class AppProcess:
    """`python app.py` in its own process on a free port, with its own save folder and log."""

    def __init__(self, name: str, session_dir: Path, env: dict[str, str], args: tuple[str, ...] = (),
                 save_dir: Path | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.save_dir = save_dir or session_dir / f"{name}-saves"
        self.log_path = session_dir / f"{name}.log"
        full_env = subprocess_env(**{"GRADIO_SERVER_PORT": str(self.port), "APP_SAVE_DIR": str(self.save_dir),
                                     "APP_PRELOAD": "1", **env})
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, "app.py", *args], cwd=ROOT, env=full_env, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{name} app exited: {self.log()[-3000:]}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except urllib.error.HTTPError:
                return  # up, and asking for a login
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"{name} app did not start in 240 s: {self.log()[-3000:]}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def client(self, auth: tuple[str, str] | None = None):
        from gradio_client import Client

        return Client(self.url, auth=auth, verbose=False)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self._log.close()
        assert WRITE_TOKEN not in self.log_path.read_text()  # secrets never reach the log


@pytest.fixture(scope="session")
def app(checkpoint, hub_server, session_dir):
    """The app as its owner runs it locally: loopback, unshared, HF_TOKEN set, the local Hub server."""
    process = AppProcess("owner-app", session_dir, {**hub_server.env(session_dir / "app-hf-home"),
                                                     "HF_HUB_OFFLINE": "0", "HF_TOKEN": WRITE_TOKEN})
    yield process
    process.stop()


@pytest.fixture(scope="session")
def app_url(app) -> str:
    return app.url


@pytest.fixture(scope="session")
def client(app):
    return app.client()


SHARED_API_KEY = "sk-shared-0123456789"


@pytest.fixture(scope="session")
def shared_app(checkpoint, hub_server, session_dir):
    """A shared app (APP_SHARED=1, no login, --api with a key): everyone is an anonymous visitor. The owner's HF_TOKEN
    is in its environment and its save folder inside Gradio's temp folder, the worst place it could be."""
    gradio_tmp = session_dir / "shared-gradio-tmp"
    env = {**hub_server.env(session_dir / "shared-hf-home"), "HF_TOKEN": WRITE_TOKEN, "APP_SHARED": "1",
           "GRADIO_TEMP_DIR": str(gradio_tmp), "APP_RATE_LIMIT": "0", "APP_OPENAI_API": "1",
           "APP_API_KEY": SHARED_API_KEY}
    process = AppProcess("shared-app", session_dir, env, save_dir=gradio_tmp / "saves")
    process.gradio_tmp = gradio_tmp
    yield process
    process.stop()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a closed network and a root user; without the background-networking ones chromium keeps
# trying to reach Google's hosts.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(autouse=True)
def _pages_close_with_their_test(request):
    """Every page a test opened is closed when it ends: an open Gradio page keeps its renderer busy (about 6% of a
    core each), and a suite that leaked them ran about twice as slow on 2 cores (71 against 33 minutes)."""
    yield
    if "browser" in request.fixturenames:
        for context in list(request.getfixturevalue("browser").contexts):
            context.close()


