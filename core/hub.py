"""Save the canonical checkpoint with its model card (core.card), and push it to the Hugging Face Hub.

`save` writes safetensors weights (bitsandbytes' serialized 4-bit or 8-bit form when quantized),
tokenizer, generation config and a model card, through core.saves (staging, verified marker). The
fast path is reversed for the save and restored after it, and bitsandbytes' CPU repack is undone on
copies (core.bnb_repack), so saving never changes the live model. `push` reuses a verified save of
the same model or saves again, creates the repo if missing and uploads in one commit. A failed push
keeps the folder, so a retry uploads without saving again. Tokens are passed through, never printed
or stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core import bnb_repack, card, fastpath, saves
from core.card import CardFacts
from core.errors import PushError, SaveError
from core.hub_errors import explain_hub_error
from core.loading import LoadedModel, tokenizer_as_loaded


@dataclass(frozen=True)
class SaveResult:
    folder: str
    files: tuple[str, ...]
    total_bytes: int


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    commit_url: str
    repo_url: str
    folder: str
    saved_again: bool


def guard(loaded: LoadedModel) -> list[str]:
    """Problems that would make a broken checkpoint; empty when saving is safe."""
    problems = []
    if "disk" in loaded.report.device_map.values():
        problems.append("Some modules are offloaded to disk; their weights are not in memory to save. Load with a "
                        "larger budget (or on the CPU) and save again.")
    if loaded.spec.trust_remote_code:
        problems.append("The model was loaded with remote code; a saved copy would run that code for everyone who "
                        "loads it. Save from a model that needs no remote code.")
    if loaded.spec.quant.enabled:
        version = card.library_versions()["bitsandbytes"]
        major_minor = tuple(int(p) for p in version.split(".")[:2]) if version[0].isdigit() else (0, 0)
        if major_minor < (0, 45):
            problems.append(f"bitsandbytes {version} cannot serialize {loaded.spec.quant.mode} weights; install "
                            "bitsandbytes==0.50.2.")
    return problems


def save(loaded: LoadedModel, folder: str | Path | None = None, facts: CardFacts = CardFacts()) -> SaveResult:
    """Writes the canonical checkpoint, tokenizer and card to `folder` (default: its folder under the save root).

    The card records what `facts` holds (core.card.measure gathers speed and a sample answer; the default records
    none). The live model is never changed: the fast path is reversed for the save and restored after it, and
    bitsandbytes' CPU repack is undone on copies (core.bnb_repack). The folder appears only when complete.
    """
    problems = guard(loaded)
    if problems:
        raise SaveError(" ".join(problems))
    target = Path(folder).expanduser().resolve() if folder else saves.target_for(loaded.spec)
    model_card = card.build(loaded, facts)

    def fill(staging: Path) -> None:
        with fastpath.suspended(loaded), bnb_repack.canonical_weights(loaded.model, loaded.bnb_originals):
            loaded.model.save_pretrained(staging)
        with tokenizer_as_loaded(loaded):
            loaded.tokenizer.save_pretrained(staging)
        model_card.save(staging / "README.md")

    needed = int(loaded.report.footprint_bytes * 1.05) + 64 * 2**20
    files = saves.write(target, fill, saves.fingerprint(loaded.spec), needed)
    return SaveResult(folder=str(target), files=files, total_bytes=saves.size_of(target))


def push(loaded: LoadedModel, repo_id: str, token: str | None, private: bool = True,
         commit_message: str = "Upload quantized model", folder: str | Path | None = None,
         facts: CardFacts | Callable[[], CardFacts] = CardFacts(), endpoint: str | None = None) -> PushResult:
    """Saves (unless `folder` holds a verified save of this model), creates the repo if missing, uploads in one commit.

    `facts` are the card's measurements, or a function that gathers them, called only when a save is needed (so a
    push that reuses a verified save runs no sample generation). `endpoint` overrides HF_ENDPOINT (a private Hub,
    or the local test server).
    """
    check_repo_id(repo_id)
    if not token:
        raise PushError("No Hugging Face token: sign in with the Hugging Face button (on a Space), or set HF_TOKEN "
                        "or run `hf auth login` (locally).")
    target = Path(folder).expanduser().resolve() if folder else saves.target_for(loaded.spec)
    saved_again = not saves.verify(target, saves.fingerprint(loaded.spec))
    if saved_again:
        save(loaded, target, facts() if callable(facts) else facts)
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.create_commit(repo_id, operations=_upload_operations(target, repo_id), repo_type="model",
                                   commit_message=commit_message)
    except Exception as error:
        raise PushError(explain_hub_error(error, repo_id) + " The saved files are kept for a retry.",
                        saved_folder=str(target)) from None
    return PushResult(repo_id=repo_id, commit_url=commit.commit_url, repo_url=str(repo_url), folder=str(target),
                      saved_again=saved_again)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        if "/" not in repo_id:
            raise HFValidationError("missing namespace")
    except HFValidationError:
        raise PushError(f"repo_id={repo_id[:100]!r} is not valid: write it as 'your-name/model-name' (letters, "
                        "digits, '-', '_', '.').") from None


def _upload_operations(folder: Path, repo_id: str) -> list:
    """Every saved file but the marker; the card with this repo's id filled in (the saved folder stays as verified)."""
    from huggingface_hub import CommitOperationAdd

    operations = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name == saves.MARKER:
            continue
        if path.name == "README.md":
            card = path.read_text().replace("REPO_ID", repo_id)
            operations.append(CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=card.encode()))
        else:
            operations.append(CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)))
    return operations
