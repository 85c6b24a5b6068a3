"""Save the canonical checkpoint with its model card, and push it to the Hugging Face Hub.

`save` writes safetensors weights (bitsandbytes' serialized 4-bit or 8-bit form when quantized),
tokenizer, generation config and a model card, through core.saves (staging, verified marker). The
fast path is reversed for the save and restored after it, and bitsandbytes' CPU repack is undone on
copies (core.bnb_repack), so saving never changes the live model. `push` reuses a verified save of
the same model or saves again, creates the repo if missing and uploads in one commit. A failed push
keeps the folder, so a retry uploads without saving again. Tokens are passed through, never printed
or stored.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from core import bnb_repack, families, fastpath, saves
from core.errors import PushError, SaveError
from core.hub_errors import explain_hub_error
from core.loading import LoadedModel, tokenizer_as_loaded
from core.quantization import bitsandbytes_config
from core.spec import EMBEDDED_HUB_ID

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
    total_bytes: int
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


def save(loaded: LoadedModel, folder: str | Path | None = None, facts: CardFacts | None = None) -> SaveResult:
    """Writes the canonical checkpoint, tokenizer and card to `folder` (default: its folder under the save root).

    The live model is never changed: the fast path is reversed for the save and restored after it, and
    bitsandbytes' CPU repack is undone on copies (core.bnb_repack). The folder appears only when complete.
    """
    problems = guard(loaded)
    if problems:
        raise SaveError(" ".join(problems))
    facts = facts if facts is not None else facts_from(loaded)
    target = Path(folder).expanduser().resolve() if folder else saves.target_for(loaded.spec)
    card = build_card(loaded, facts)

    def fill(staging: Path) -> None:
        with fastpath.suspended(loaded), bnb_repack.canonical_weights(loaded.model, loaded.bnb_originals):
            loaded.model.save_pretrained(staging)
        with tokenizer_as_loaded(loaded):
            loaded.tokenizer.save_pretrained(staging)
        card.save(staging / "README.md")

    needed = int(loaded.report.footprint_bytes * 1.05) + 64 * 2**20
    files = saves.write(target, fill, saves.fingerprint(loaded.spec), needed)
    return SaveResult(folder=str(target), files=files, total_bytes=saves.size_of(target), reused=False)


def base_model_id(loaded: LoadedModel) -> str:
    if loaded.spec.is_embedded:
        return EMBEDDED_HUB_ID
    return loaded.spec.model


def build_card(loaded: LoadedModel, facts: CardFacts = CardFacts()):
    from huggingface_hub import ModelCard, ModelCardData

    spec = loaded.spec
    family = loaded.family
    base = base_model_id(loaded)
    quant = spec.quant
    tags = ["quantized-llm-app"] + (["bitsandbytes", f"{quant.bits}-bit", quant.mode] if quant.enabled else [])
    data = ModelCardData(base_model=base, library_name="transformers", pipeline_tag=family.pipeline_tag, tags=tags,
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
        *_load_snippet(family),
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
    lines += serving_section(base, quant.enabled, family)
    lines += ["", "## Library versions", "", "| library | version |", "|---|---|"]
    lines += [f"| {name} | {version} |" for name, version in library_versions().items()]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _load_snippet(family: families.Family) -> list[str]:
    """How to load and run the checkpoint with plain transformers, for the model's kind."""
    lines = []
    if family.is_encoder_decoder:
        lines += [f"An {family.label} model: load it with `{family.auto_class}` (`AutoModelForCausalLM` cannot). The "
                  "input goes to the encoder; `generate()` returns the decoder's answer alone.", ""]
    lines += [
        "```python",
        f"from transformers import {family.auto_class}, AutoTokenizer",
        "",
        "repo = \"REPO_ID\"",
        "tokenizer = AutoTokenizer.from_pretrained(repo)",
        f"model = {family.auto_class}.from_pretrained(repo, device_map=\"auto\")",
    ]
    if family.is_encoder_decoder:
        lines += ["inputs = tokenizer(\"Your text\", return_tensors=\"pt\").to(model.device)",
                  "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))"]
    return lines + ["```"]


def serving_section(base: str, quantized: bool, family: families.Family) -> list[str]:
    """How to serve the checkpoint when one GPU and this app are no longer enough. The commands follow vLLM's and
    TGI's documentation and were not run by this project (they need a GPU server with network access)."""
    if family.is_encoder_decoder:
        return ["", "## Serving", "",
                "vLLM no longer serves T5-style encoder-decoders (it dropped them, Whisper aside, in September 2025: "
                "vllm-project/vllm#24907). Serve this checkpoint with transformers as above, or with the "
                "quantized-LLM app and its OpenAI-compatible API."]
    tgi = ("TGI quantizes with bitsandbytes while loading and does not read a pre-quantized checkpoint: serve the "
           "base model with `--quantize bitsandbytes-nf4` (or `bitsandbytes` for 8-bit):" if quantized else
           "With TGI:")
    return ["", "## Serving", "",
            "vLLM reads this checkpoint as it is (it takes the quantization from `config.json`) and serves the same "
            "OpenAI-compatible API as the app that saved it, so clients only change their base URL "
            "(not run by the quantized-LLM app; see vLLM's bitsandbytes page for the modes your version supports):",
            "", "```bash", "pip install vllm bitsandbytes", 'vllm serve "REPO_ID"', "```", "", tgi, "", "```bash",
            'docker run --gpus all --shm-size 1g -p 8080:80 -v "$PWD/data:/data" '
            "ghcr.io/huggingface/text-generation-inference:3.3.5 \\",
            f"  --model-id {base if quantized else 'REPO_ID'}" + (" --quantize bitsandbytes-nf4" if quantized else ""),
            "```"]


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

    measured = loaded.facts.last_metrics  # read before the sample below replaces it
    quality = loaded.facts.quality
    sample = generation.generate(loaded, [SAMPLE_PROMPT], GenerationSpec(greedy=True, max_new_tokens=48))
    metrics = measured or sample.metrics
    return CardFacts(decode_tokens_per_s=metrics.decode_tokens_per_s, ttft_s=metrics.ttft_s,
                     device=str(loaded.input_device), sample_prompt=SAMPLE_PROMPT, sample_answer=sample.texts[0],
                     quality=quality.as_card_facts() if quality else {})


def push(loaded: LoadedModel, repo_id: str, token: str | None, private: bool = True,
         commit_message: str = "Upload quantized model", folder: str | Path | None = None,
         facts: CardFacts | None = None, endpoint: str | None = None) -> PushResult:
    """Saves (unless `folder` holds a verified save of this model), creates the repo if missing, uploads in one commit.

    `endpoint` overrides HF_ENDPOINT (a private Hub, or the local test server).
    """
    check_repo_id(repo_id)
    if not token:
        raise PushError("No Hugging Face token: sign in with the Hugging Face button (on a Space), or set HF_TOKEN "
                        "or run `hf auth login` (locally).")
    target = Path(folder).expanduser().resolve() if folder else saves.target_for(loaded.spec)
    saved_again = not saves.verify(target, saves.fingerprint(loaded.spec))
    if saved_again:
        save(loaded, target, facts)
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
