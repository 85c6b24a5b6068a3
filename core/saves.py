"""Where saved checkpoints go and how they are written: one root, names chosen from the spec, staging, markers.

A save is written into a staging folder beside its target and moved into place only when it is
complete, with a marker that lists every file's size and SHA-256. A folder counts as a finished save
of this app only when its marker matches the model and every file matches the marker, so a folder
left by a crash or a kill mid-save (always under a `.staging-` name) is never taken for one; the
next save of the same name removes it. A non-empty folder that is not a save of this app is never
written into.

The app saves only under one root (`APP_SAVE_DIR`, default `<cache>/saved`), in a folder named from
the model, revision and quantization, plus a short hash of the full quantization settings so that
two different checkpoints never share a folder; the request never carries a path.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from core import default_model
from core.errors import SaveError
from core.spec import LoadSpec, model_name

MARKER = "llm-app-save.json"
APP = "quantized-llm-app"
STAGING = ".staging-"
OLD = ".replaced-"
MARGIN_BYTES = 256 * 2**20  # free space left after a save, for the OS and logs
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def save_root() -> Path:
    configured = os.environ.get("APP_SAVE_DIR")
    return (Path(configured).expanduser() if configured else default_model.cache_root() / "saved").resolve()


def fingerprint(spec: LoadSpec) -> dict:
    """What identifies a saved checkpoint: the model, its revision, dtype and every quantization setting."""
    return json.loads(json.dumps({"model": spec.model, "revision": spec.revision, "dtype": spec.dtype,
                                  "quant": asdict(spec.quant)}))  # tuples as lists, as read back from JSON


def _slug(text: str) -> str:
    return _UNSAFE.sub("-", text).strip(".-")[:80] or "model"


def folder_name(spec: LoadSpec) -> str:
    """'SmolLM2-135M-Instruct-nf4-1a2b3c4d': model, @revision, quantization, hash of the full settings."""
    model = model_name(spec.model)
    model = Path(model).name if model.startswith("/") else model.replace("/", "--")
    revision = f"@{spec.revision}" if spec.revision else ""
    mode = spec.quant.mode if spec.quant.enabled else spec.dtype
    digest = hashlib.sha256(json.dumps(fingerprint(spec), sort_keys=True).encode()).hexdigest()[:8]
    return f"{_slug(model + revision)}-{mode}-{digest}"


def target_for(spec: LoadSpec, root: Path | None = None) -> Path:
    """The folder under `root` that a save of `spec` goes to; refuses anything that would escape the root."""
    root = (root or save_root()).resolve()
    target = (root / folder_name(spec)).resolve()
    if target.parent != root:
        raise SaveError("The save folder name would leave the save root; refused.")
    return target


def is_app_save(folder: Path) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("app") == APP
    except (OSError, ValueError, AttributeError):
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(folder: Path) -> dict[str, dict]:
    """Every file of the folder but the marker: size and SHA-256."""
    return {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}


def verify(folder: Path, expected: dict) -> bool:
    """True when `folder` is a complete save of the model `expected` (a fingerprint): marker and every file."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("app") != APP or marker.get("fingerprint") != expected:
        return False
    try:
        return manifest(folder) == marker.get("files")
    except OSError:
        return False


def check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + MARGIN_BYTES:
        raise SaveError(f"Not enough disk space to save: the checkpoint needs about {needed / 2**30:.2f} GiB and "
                        f"{free / 2**30:.2f} GiB are free (keeping {MARGIN_BYTES / 2**20:.0f} MiB spare). Free some "
                        "space or set APP_SAVE_DIR to a larger disk.")


def write(target: Path, fill: Callable[[Path], None], spec_fingerprint: dict, needed_bytes: int) -> tuple[str, ...]:
    """Runs `fill(staging)` and moves the finished folder to `target`; returns the file names."""
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise SaveError(f"The save target {target.name} exists and is not a folder; refused.")
    if target.is_dir() and any(target.iterdir()) and not is_app_save(target):
        raise SaveError(f"The folder {target.name} already holds files that are not a save of this app; "
                        "refusing to write into it. Move it away or pick another place.")
    check_space(parent, needed_bytes)
    for leftover in list(parent.glob(f"{STAGING}{target.name}-*")) + list(parent.glob(f"{OLD}{target.name}-*")):
        shutil.rmtree(leftover, ignore_errors=True)  # from a save that crashed or was killed
    tag = uuid.uuid4().hex[:8]
    staging = parent / f"{STAGING}{target.name}-{tag}"
    replaced = parent / f"{OLD}{target.name}-{tag}"
    try:
        staging.mkdir()
        fill(staging)
        files = manifest(staging)
        (staging / MARKER).write_text(json.dumps({"app": APP, "fingerprint": spec_fingerprint, "files": files},
                                                 indent=2))
        _sync(staging)
        if target.exists():
            target.rename(replaced)
        staging.rename(target)
    except Exception as error:
        if not disk_full(error):
            raise
        raise SaveError("The disk filled up during the save; the partial save was removed and any earlier save is "
                        "kept. Free some space or set APP_SAVE_DIR to a larger disk, then save again.") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(replaced, ignore_errors=True)
    return tuple(files) + (MARKER,)


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full(error: BaseException) -> bool:
    """Whether a write failed for want of space: an OSError with ENOSPC, EDQUOT or EFBIG, or safetensors' own
    SafetensorError, which carries only the text of the OS error."""
    if isinstance(error, OSError):
        return error.errno in _FULL
    return any(f"(os error {code})" in str(error) for code in _FULL)


def _sync(folder: Path) -> None:
    """Data on disk before the rename that publishes it, so a crash never leaves a marked but empty file."""
    for path in folder.iterdir():
        with path.open("rb") as handle:
            os.fsync(handle.fileno())


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
