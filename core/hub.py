"""Save after reverse, the model card, and push to the Hugging Face Hub with huggingface_hub.

`save` always reverses the fast path first, so the folder holds the canonical checkpoint:
safetensors weights (bitsandbytes' serialized 4-bit or 8-bit form when quantized), tokenizer,
generation config and a model card. `push` saves (or reuses a folder saved for the same model),
creates the repo if missing and uploads the folder in one commit. A failed push keeps the folder,
so a retry uploads without saving again. Tokens are passed through, never printed or stored.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from core import default_model, fastpath
from core.errors import PushError, SaveError
from core.hub_errors import explain_hub_error
from core.loading import LoadedModel
from core.quantization import bitsandbytes_config

SAVE_MARKER = "llm-app-save.json"
LIBRARIES = ("torch", "transformers", "accelerate", "bitsandbytes", "huggingface_hub", "safetensors")


@dataclass(frozen=True)
class CardFacts:
    """Measurements the card records when known."""

    decode_tokens_per_s: float | None = None
    ttft_s: float | None = None
    device: str | None = None
    sample_prompt: str | None = None
    sample_answer: str | None = None
    quality: dict[str, float] = field(default_factory=dict)  # e.g. perplexity, next-token agreement


@dataclass(frozen=True)
class SaveResult:
    folder: str
    files: tuple[str, ...]
    reused: bool


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    commit_url: str
    repo_url: str
    folder: str
    saved_again: bool


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def fingerprint(loaded: LoadedModel) -> dict:
    """What identifies the saved weights: the model, its revision, dtype and quantization."""
    spec = loaded.spec
    return {"model": spec.model, "revision": spec.revision, "dtype": spec.dtype, "quant": asdict(spec.quant)}


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
        version = library_versions()["bitsandbytes"]
        major_minor = tuple(int(p) for p in version.split(".")[:2]) if version[0].isdigit() else (0, 0)
        if major_minor < (0, 45):
            problems.append(f"bitsandbytes {version} cannot serialize {loaded.spec.quant.mode} weights; install "
                            "bitsandbytes==0.50.2.")
    return problems


def save(loaded: LoadedModel, folder: str | Path, facts: CardFacts | None = None) -> SaveResult:
    """Reverses the fast path, then writes the canonical checkpoint, tokenizer and card to `folder`."""
    problems = guard(loaded)
    if problems:
        raise SaveError(" ".join(problems))
    fastpath.reverse(loaded)
    facts = facts if facts is not None else facts_from(loaded)
    target = Path(folder).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(target)
    loaded.tokenizer.save_pretrained(target)
    build_card(loaded, facts).save(target / "README.md")
    (target / SAVE_MARKER).write_text(json.dumps(fingerprint(loaded), indent=2))
    files = tuple(sorted(p.name for p in target.iterdir() if p.is_file()))
    return SaveResult(folder=str(target), files=files, reused=False)


def saved_for(loaded: LoadedModel, folder: Path) -> bool:
    marker = folder / SAVE_MARKER
    try:
        return json.loads(marker.read_text()) == json.loads(json.dumps(fingerprint(loaded)))  # tuples as lists
    except (OSError, ValueError):
        return False


def base_model_id(loaded: LoadedModel) -> str:
    if loaded.spec.is_embedded:
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    return loaded.spec.model


def build_card(loaded: LoadedModel, facts: CardFacts = CardFacts()):
    from huggingface_hub import ModelCard, ModelCardData

    spec = loaded.spec
    base = base_model_id(loaded)
    quant = spec.quant
    tags = ["quantized-llm-app"] + (["bitsandbytes", f"{quant.bits}-bit", quant.mode] if quant.enabled else [])
    data = ModelCardData(base_model=base, library_name="transformers", pipeline_tag="text-generation", tags=tags,
                         license=_base_license(loaded))
    config = bitsandbytes_config(quant)
    config_json = json.dumps(config.to_dict(), indent=2, default=str) if config else "null"
    lines = [
        f"# {base} — {quant.mode if quant.enabled else spec.dtype}",
        "",
        f"This is [{base}](https://huggingface.co/{base}) "
        + (f"quantized with bitsandbytes ({loaded.report.quantization})." if quant.enabled else
           f"saved in {spec.dtype}.")
        + " It was saved by the quantized-LLM app after reversing its attention fast path, so it is a plain "
          "transformers checkpoint.",
        "",
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "repo = \"REPO_ID\"",
        "tokenizer = AutoTokenizer.from_pretrained(repo)",
        "model = AutoModelForCausalLM.from_pretrained(repo, device_map=\"auto\")",
        "```",
        "",
        "The quantization config is stored in `config.json`; loading needs `bitsandbytes` installed." if quant.enabled
        else "",
        "",
        "## Quantization config",
        "",
        "```json",
        config_json,
        "```",
        "",
        "## Measured",
        "",
        "| what | value |",
        "|---|---|",
        f"| memory footprint | {loaded.report.footprint_bytes / 2**20:.1f} MiB |",
        f"| parameters | {loaded.report.parameters:,} |",
        f"| dtype | {spec.dtype} |",
    ]
    if facts.decode_tokens_per_s:
        lines.append(f"| decode speed | {facts.decode_tokens_per_s:.1f} tokens/s on {facts.device or 'unknown'} |")
    if facts.ttft_s is not None:
        lines.append(f"| time to first token | {facts.ttft_s * 1000:.0f} ms |")
    for name, value in facts.quality.items():
        lines.append(f"| {name} | {value:.4g} |")
    if facts.sample_prompt and facts.sample_answer:
        lines += ["", "## Sample", "", f"**Prompt:** {facts.sample_prompt}", "", f"**Answer:** {facts.sample_answer}"]
    lines += ["", "## Library versions", "", "| library | version |", "|---|---|"]
    lines += [f"| {name} | {version} |" for name, version in library_versions().items()]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _base_license(loaded: LoadedModel) -> str | None:
    if loaded.spec.is_embedded:
        return "apache-2.0"  # SmolLM2's license
    readme = Path(loaded.report.source) / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        return ModelCard.load(readme).data.license
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(loaded.spec.model).data.license
    except Exception:  # the base card is optional; a card without a license is still valid
        return None


SAMPLE_PROMPT = "What is the capital of France?"


def facts_from(loaded: LoadedModel) -> CardFacts:
    """What the card records: the last measured speed, the quality check if run, and one sample answer."""
    from core import generation
    from core.spec import GenerationSpec

    measured = loaded.facts.get("last_metrics")  # read before the sample below replaces it
    quality = loaded.facts.get("quality")
    sample = generation.generate(loaded, [SAMPLE_PROMPT], GenerationSpec(greedy=True, max_new_tokens=48))
    metrics = measured or sample.metrics
    return CardFacts(decode_tokens_per_s=metrics.decode_tokens_per_s, ttft_s=metrics.ttft_s,
                     device=str(loaded.input_device), sample_prompt=SAMPLE_PROMPT, sample_answer=sample.texts[0],
                     quality=quality.as_card_facts() if quality else {})


def default_save_folder(repo_or_name: str) -> Path:
    return default_model.cache_root() / "saved" / repo_or_name.replace("/", "--")


def push(loaded: LoadedModel, repo_id: str, token: str | None, private: bool = True,
         commit_message: str = "Upload quantized model", folder: str | Path | None = None,
         facts: CardFacts | None = None, endpoint: str | None = None) -> PushResult:
    """Saves (unless `folder` already holds this model), creates the repo if missing, uploads in one commit.

    `endpoint` overrides HF_ENDPOINT (a private Hub, or the local test server).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        if "/" not in repo_id:
            raise HFValidationError("missing namespace")
    except HFValidationError:
        raise PushError(f"repo_id={repo_id!r} is not valid: write it as 'your-name/model-name' (letters, digits, "
                        "'-', '_', '.').") from None
    if not token:
        raise PushError("No Hugging Face token: sign in with the Hugging Face button (on a Space), or set HF_TOKEN "
                        "or run `hf auth login` (locally).")
    target = Path(folder).expanduser() if folder else default_save_folder(repo_id)
    saved_again = not saved_for(loaded, target)
    if saved_again:
        save(loaded, target, facts)
    _fill_repo_id(target, repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=target, repo_id=repo_id, repo_type="model",
                                   commit_message=commit_message, ignore_patterns=[SAVE_MARKER])
    except Exception as error:
        raise PushError(explain_hub_error(error, repo_id) + f" The saved files are kept in {target} for a retry.",
                        saved_folder=str(target)) from None
    return PushResult(repo_id=repo_id, commit_url=commit.commit_url, repo_url=str(repo_url), folder=str(target),
                      saved_again=saved_again)


def _fill_repo_id(folder: Path, repo_id: str) -> None:
    card = folder / "README.md"
    if card.is_file():
        card.write_text(card.read_text().replace('repo = "REPO_ID"', f'repo = "{repo_id}"'))
