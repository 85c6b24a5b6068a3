"""Where a model comes from (the embedded default, a local folder or the Hub), and its config.

Hub models are downloaded with `snapshot_download` (only the config, tokenizer and one weight
format), so a load can report download progress file by file. Before any Hub call a 3-second probe
checks that the Hub can be reached at all: huggingface_hub retries a refused connection for about
25 s, so without the probe an offline user waited that long for the error. When the Hub is out of
reach, models already in the local cache still load. Hub and file-system failures are turned into
`ModelNotFoundError` or `HubUnreachableError` here, so every caller gets the same message for the
same problem.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

from huggingface_hub import constants
from huggingface_hub import errors as hub_errors
from huggingface_hub.errors import StrictDataclassError

from core import default_model
from core.errors import HubUnreachableError, ModelNotFoundError, SpecError, first_line
from core.spec import LoadSpec, OnProgress, model_name



PROBE_SECONDS = 3.0
_probe: dict[str, float | bool] = {"at": -1e9, "ok": True}


def is_hub_id(spec: LoadSpec) -> bool:
    return not spec.is_embedded and not spec.model.startswith("/")


def hub_reachable() -> bool:
    """Whether a TCP connection to the Hub endpoint opens within 3 s (remembered for 30 s)."""
    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                              "ALL_PROXY", "all_proxy")):
        return True  # only the proxy can tell; let huggingface_hub try
    now = time.monotonic()
    if now - float(_probe["at"]) < 30:
        return bool(_probe["ok"])
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=PROBE_SECONDS).close()
        ok = True
    except OSError:
        ok = False
    _probe.update(at=now, ok=ok)
    return ok


def resolve(spec: LoadSpec, progress: OnProgress | None = None) -> str:
    """The local folder that from_pretrained should read for this spec (downloading a Hub model first)."""
    if spec.is_embedded:
        return str(default_model.ensure_checkpoint(progress))
    if not is_hub_id(spec):
        return spec.model
    return _download(spec, progress or (lambda fraction, message: None))


def _download(spec: LoadSpec, progress: OnProgress) -> str:
    from huggingface_hub import HfApi, snapshot_download

    with hub_errors_explained(spec):
        if not hub_reachable():
            return snapshot_download(spec.model, revision=spec.revision, local_files_only=True)
        progress(0.05, f"Looking up {spec.model} on the Hub")
        files = [f.rfilename for f in HfApi().model_info(spec.model, revision=spec.revision,
                                                          token=hub_token(spec)).siblings or []]
        wanted = files_to_download(files, spec.trust_remote_code)
        progress(0.08, f"Downloading {len(wanted)} files of {spec.model}")
        return snapshot_download(spec.model, revision=spec.revision, token=hub_token(spec), allow_patterns=wanted,
                                 tqdm_class=progress_bar(progress, 0.08, 0.33, f"Downloading {spec.model}"))


WEIGHT_FORMATS = (".safetensors", ".bin")  # safetensors when the repo has them: no pickle, and one copy only


def files_to_download(files: list[str], trust_remote_code: bool) -> list[str]:
    """The repo's top-level config, tokenizer and generation files, and its weights in one format."""
    top = [f for f in files if "/" not in f]
    kept = [f for f in top if f.endswith((".json", ".model", ".txt", ".jinja", ".tiktoken"))
            or f.startswith("tokenizer") or (trust_remote_code and f.endswith(".py"))]
    for suffix in WEIGHT_FORMATS:
        weights = [f for f in top if f.endswith(suffix) or f.endswith(suffix + ".index.json")]
        if any(f.endswith(suffix) for f in weights):
            return sorted(set(kept) | set(weights))
    return sorted(kept)


def progress_bar(progress: OnProgress, start: float, end: float, label: str):
    """A tqdm class that reports to `progress`: a bar of steps (files, tensors) moves the fraction from `start` to
    `end`; a bar of bytes (one file downloading) only updates the text, so the fraction never goes back."""
    from tqdm.auto import tqdm

    reached = {"fraction": start}

    class Reporting(tqdm):
        def __init__(self, *args, **kwargs):
            self.in_bytes = kwargs.get("unit") == "B"
            kwargs["disable"] = True  # nothing on the terminal; the page shows it
            super().__init__(*args, **kwargs)

        def __iter__(self):  # a disabled tqdm iterates without counting
            for item in self.iterable:
                yield item
                self.update(1)

        def update(self, n=1):
            self.n += 1 if n is None else n
            if not self.total:
                return
            if self.in_bytes:
                progress(reached["fraction"], f"{label}: {self.n / 2**20:,.0f} of {self.total / 2**20:,.0f} MiB")
                return
            reached["fraction"] = start + (end - start) * min(1.0, self.n / self.total)
            progress(reached["fraction"], f"{label}: {self.n}/{self.total}")

    return Reporting


@contextmanager
def hub_errors_explained(spec: LoadSpec) -> Iterator[None]:
    """Turns download failures into one clear message each."""
    try:
        yield
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError) as error:
        raise ModelNotFoundError(_not_found(spec)) from error
    except hub_errors.RevisionNotFoundError as error:
        raise ModelNotFoundError(_no_revision(spec)) from error
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled) as error:
        raise HubUnreachableError(_unreachable(spec)) from error
    except OSError as error:
        text = str(error)
        if "is not a valid git identifier" in text:
            raise ModelNotFoundError(_no_revision(spec)) from error
        if "not a valid JSON" in text:
            raise SpecError("model", _shown(spec),
                            "its config.json is not valid JSON; fix or replace the file") from error
        if "couldn't connect" in text or "offline" in text.lower() or "Connection" in text:
            raise HubUnreachableError(_unreachable(spec)) from error
        if "not a valid model identifier" in text or "does not appear to have a file" in text \
                or "Repository Not Found" in text or "is not a local folder" in text:
            raise ModelNotFoundError(_not_found(spec)) from error
        raise


def _no_revision(spec: LoadSpec) -> str:
    return (f"{spec.model} has no revision {spec.revision!r}; use a branch, tag or commit that exists, or leave "
            "revision empty for 'main'.")


def _not_found(spec: LoadSpec) -> str:
    return (f"Model {spec.model!r} was found neither as a local folder nor on the Hub. Check the spelling "
            "(ids look like 'HuggingFaceTB/SmolLM2-360M-Instruct'); for a private or gated model, sign in "
            "or set HF_TOKEN.")


def _unreachable(spec: LoadSpec) -> str:
    return (f"Could not reach the Hugging Face Hub to fetch {spec.model!r}, and it is not in the local cache. "
            "Check the network (or HF_ENDPOINT), or leave the model empty to use the embedded "
            "SmolLM2-135M-Instruct.")


def hub_token(spec: LoadSpec) -> bool | None:
    """What from_pretrained gets as `token`: None (the server's HF_TOKEN or login) or False (anonymous)."""
    return None if spec.use_server_token else False


def load_config(spec: LoadSpec, progress: OnProgress | None = None, path: str | None = None):
    """The model's `PretrainedConfig`, read without loading weights. Imports no code unless trust_remote_code.

    `path`: the folder `resolve` returned for this spec, read instead of reaching the Hub again."""
    from transformers import AutoConfig

    with hub_errors_explained(spec):
        if path is None:
            path = str(default_model.ensure_checkpoint(progress)) if spec.is_embedded else \
                _config_folder(spec) if is_hub_id(spec) else spec.model
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code, local_files_only=True)
        except (ValueError, TypeError, ArithmeticError) as error:  # ArithmeticError: a config dividing by a zero size
            if "trust_remote_code" in str(error):
                raise SpecError("model", _shown(spec), "it needs code from its own repository, which this app runs "
                                                       "only when started with --trust-remote-code") from error
            raise SpecError("model", _shown(spec),
                            f"transformers cannot read its config.json ({first_line(error, 200)})") from error
        except StrictDataclassError as error:  # a field of the wrong type or out of its range, e.g. a negative size
            raise SpecError("model", _shown(spec),
                            f"its config.json has a value transformers refuses ({first_line(error, 200)})") from error
    check_dimensions(config, _shown(spec))
    return config


# The largest each kind of dimension may be. Real models stay far below (Llama-3-405B: 126 layers, 128 heads,
# hidden 16,384, intermediate 53,248, vocabulary 128,256); a config beyond them was written to exhaust the server:
# building even an empty model creates every layer, and some buffers (rotary tables, masks) for real. What slips
# through (sizes that contradict each other) fails in placement.empty_model with the same kind of message.
_DIMENSION_CAPS = ((re.compile(r"layers$"), 1024), (re.compile(r"heads$|experts"), 65_536),
                   (re.compile(r"^vocab_size$"), 1 << 22), (re.compile(r"positions|position_embeddings"), 1 << 24),
                   (re.compile(r"size$|dim$|^d_(model|ff|kv)$"), 1 << 18))


def check_dimensions(config, shown: str) -> None:
    """Refuses a config whose sizes (layers, heads, widths, vocabulary, positions; in nested configs too) are negative
    or beyond _DIMENSION_CAPS, before anything is built from it."""
    for key, value in _dimensions(config.to_dict()):
        cap = next((cap for pattern, cap in _DIMENSION_CAPS if pattern.search(key)), None)
        if cap is not None and not 0 <= value <= cap:
            raise SpecError("model", shown, f"its config.json sets {key}={value}, outside 0..{cap:,}; this app loads "
                                            "models whose sizes real models have")


def _dimensions(values: dict, depth: int = 0) -> Iterator[tuple[str, int]]:
    for key, value in values.items():
        if isinstance(value, dict) and depth < 3:
            yield from _dimensions(value, depth + 1)
        elif isinstance(value, int) and not isinstance(value, bool):
            yield key, value


def _config_folder(spec: LoadSpec) -> str:
    """A Hub model's config.json (with trust_remote_code, also its code) fetched into the Hub cache; that folder, never
    the id itself, is what transformers reads. Given an id, transformers would first read a folder of that name under
    the working directory, so 'models/secret-llama' would reach the server's files."""
    from huggingface_hub import snapshot_download

    patterns = ["config.json"] + (["*.py"] if spec.trust_remote_code else [])
    return snapshot_download(spec.model, revision=spec.revision, token=hub_token(spec), allow_patterns=patterns,
                             local_files_only=not hub_reachable())


def _shown(spec: LoadSpec) -> str:
    return model_name(spec.model)
