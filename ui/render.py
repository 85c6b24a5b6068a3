"""Markdown for the app: turns core's result dataclasses into what the page shows. No model logic.

Every model name, path and user or model text goes through `esc` before it reaches Markdown, so a
folder named with backticks or HTML renders as text for every visitor. Verdicts are words, not
emoji (some browsers can't draw them).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

from core.compare import VariantResult
from core.fastpath import FastPathState
from core.fit import FitReport
from core.hub import PushResult, SaveResult
from core.loading import LoadReport
from core.placement import PlacementPlan, device_label
from core.quality import QualityReport
from core.serving.requests import ChatResult
from core.spec import model_name

_MARKDOWN = re.compile(r"([\\`*_\[\]()#|~!])")  # what can open code, emphasis, links, images, headings, cells


def esc(text: object) -> str:
    """User-controlled text (model names, paths, prompts, answers) shown literally inside a line of Markdown:
    HTML escaped, the Markdown punctuation that could start markup backslashed, newlines folded."""
    return _MARKDOWN.sub(r"\\\1", html.escape(str(text), quote=False)).replace("\n", " ")


def mib(size: float) -> str:
    return f"{size / 2**20:,.1f} MiB"


def plan(result: PlacementPlan, gpus_here: int) -> str:
    lines = [f"**Plan for** {esc(model_name(result.model))} ({result.kind}) · {esc(result.quantization)} · "
             f"{result.dtype} · total weights {mib(result.total_bytes)}", "",
             "| device | budget | planned | modules |", "|---|---|---|---|"]
    for device, modules, size in result.table():
        budget = next((b for d, b in result.budget.items() if device_label(d) == device), None)
        lines.append(f"| {device} | {mib(budget) if budget else 'all free'} | {mib(size)} | {esc(modules)} |")
    lines += ["", gpu_note(result.gpus_planned, gpus_here)]
    if result.offloaded:
        lines += ["", f"**Note:** {len(result.offloaded)} module(s) go to the CPU or disk: they run there, slowly."]
    return "\n".join(lines)


def gpu_note(planned: int, here: int) -> str:
    def gpus(n: int) -> str:
        return "no GPU" if n == 0 else f"{n} GPU{'s' if n > 1 else ''}"

    if planned > here:
        return (f"Planned for {gpus(planned)}; this machine has {gpus(here)}, so it can't load this placement here "
                "(useful to size a bigger machine).")
    return f"Planned for {'the CPU only' if planned == 0 else gpus(planned)}; this machine has {gpus(here)}."


def load(report: LoadReport, fast: FastPathState) -> str:
    placement: dict[str, list[str]] = {}
    for module, device in report.device_map.items():
        placement.setdefault(device_label(device), []).append(module or "(whole model)")
    where = "; ".join(f"{d}: {len(m)} module(s)" for d, m in placement.items())
    lines = [
        f"**Loaded** {esc(model_name(report.model))} in {report.load_seconds:.1f} s", "",
        "| property | value |", "|---|---|",
        f"| model kind | {report.kind} |",
        f"| quantization | {report.quantization} |",
        *([f"| kept in higher precision | {esc(report.kept_in_higher_precision)} |"]
          if report.kept_in_higher_precision else []),
        f"| dtype | {report.dtype} |",
        f"| footprint | {mib(report.footprint_bytes)} |",
        f"| parameters | {report.parameters:,} |",
        f"| stored tensors | {report.stored_elements:,} elements"
        f"{' (quantized weights packed)' if report.stored_elements != report.parameters else ''} |",
        f"| placement | {where} |",
        f"| attention | {report.attn_implementation} |",
        "", fast.summary(),
    ]
    if report.offloaded:
        names = ", ".join(esc(m) for m in list(report.offloaded)[:8])
        lines += ["", f"**Note:** offloaded to the CPU or disk by the budget: {names}. Raise the GPU budget or use "
                      "4-bit to keep everything on the GPU."]
    return "\n".join(lines)


def answered_by(model: str, quantization: str) -> str:
    return f"{model_name(model)} · {quantization}"


def metrics(result: ChatResult, by: str) -> str:
    """The status line of an answer: its speed, how many visitors were answered together, and its author."""
    fast = result.fast_path
    together = f" · answered together with {result.together - 1} other{'s' if result.together > 2 else ''}" \
        if result.together > 1 else ""
    return (f"{'Stopped · ' if result.cancelled else ''}{result.metrics.summary()}{together} · fast path "
            f"{'on' if fast.enabled else 'off'} ({fast.attn_implementation}) · answered by {esc(by)}")


def saved(result: SaveResult, show_path: bool) -> str:
    where = result.folder if show_path else result.folder.rsplit("/", 1)[-1]
    return (f"**Saved** (fast path reversed for the save) to {esc(where)}: {len(result.files)} files, "
            f"{mib(result.total_bytes)}: {esc(', '.join(result.files))}")


def pushed(result: PushResult) -> str:
    again = "saved and uploaded" if result.saved_again else "uploaded the verified save made earlier"
    return f"**Pushed** {esc(result.repo_id)} ({again}): [{esc(result.commit_url)}]({result.commit_url})"


def comparison(rows: Sequence[VariantResult]) -> str:
    lines = ["| variant | answer | tokens | tok/s | footprint | agreement with full precision |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if row.error:
            lines.append(f"| {esc(row.quantization)} | failed: {esc(row.error)} | | | | |")
            continue
        agreement = (f"{row.agreement:.0%} of the first {row.compared_tokens}" if row.agreement is not None
                     else "n/a")
        lines.append(f"| {esc(row.quantization)} | {esc(row.text)} | {row.answer_tokens} | "
                     f"{row.decode_tokens_per_s:.1f} | {mib(row.footprint_bytes)} | {agreement} |")
    return "\n".join(lines + ["", "Agreement: the share of answer tokens equal to full precision's, over the length "
                                    "both answers have (the shorter answer's tokens); speed measured after a "
                                    "warm-up."])


def fit_report(report: FitReport, gpus_here: int) -> str:
    head = "**Fits**" if report.fits else f"**Does not fit**: {esc(report.verdict().removeprefix('does not fit: '))}"
    lines = [f"{head} · {esc(model_name(report.model))} · {esc(report.quantization)} · context "
             f"{report.context_length} · batch {report.batch_size}", ""]
    if report.devices:
        lines += ["| device | weights | KV cache | activations | total | budget |", "|---|---|---|---|---|---|"]
        for d in report.devices:
            budget = mib(d.budget) if d.budget else "all free"
            lines.append(f"| {device_label(d.device)} | {mib(d.weights)} | {mib(d.kv_cache)} | {mib(d.activations)} "
                         f"| {mib(d.total)} | {budget} |")
        lines += ["", gpu_note(report.gpus_planned, gpus_here)]
    if report.offloaded:
        names = ", ".join(esc(m) for m in report.offloaded[:6])
        lines += ["", f"**Note:** {len(report.offloaded)} module(s) would run on the CPU or disk because the GPU "
                      f"budget is full: {names}{' …' if len(report.offloaded) > 6 else ''}. That works, but each step "
                      "moves them over PCIe: expect it to be much slower."]
    if report.fixes:
        lines += ["", "**Smallest changes that fit** (pick one below and press *Apply fix*):"]
        lines += [f"- {esc(fix.label)}" for fix in report.fixes]
    return "\n".join(lines)


def quality_report(report: QualityReport) -> str:
    return "\n".join([
        f"**Quality of {esc(report.quantization)}** on the shipped sample ({report.tokens} tokens); lower perplexity "
        "is better", "",
        "| measure | this model | full precision |", "|---|---|---|",
        f"| perplexity | {report.perplexity:.2f} | {report.reference_perplexity:.2f} |",
        f"| next-token agreement with full precision | {report.agreement:.1%} | 100% |",
        "", f"Scored: {report.method}.",
    ])
