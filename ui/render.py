"""Markdown for the app: turns core's result dataclasses into what the page shows. No model logic."""

from __future__ import annotations

from collections.abc import Sequence

from core.compare import VariantResult
from core.fastpath import FastPathState
from core.fit import FitReport
from core.generation import GenerationMetrics
from core.hub import PushResult, SaveResult
from core.loading import LoadReport
from core.placement import PlacementPlan, device_label
from core.quality import QualityReport


def mib(size: float) -> str:
    return f"{size / 2**20:,.1f} MiB"


def plan(result: PlacementPlan) -> str:
    lines = [f"**Plan for** `{result.model}` · {result.quantization} · {result.dtype} · "
             f"total weights {mib(result.total_bytes)}", "",
             "| device | budget | planned | modules |", "|---|---|---|---|"]
    for device, modules, size in result.table():
        budget = next((b for d, b in result.budget.items() if device_label(d) == device), None)
        lines.append(f"| {device} | {mib(budget) if budget else 'all free'} | {mib(size)} | {modules} |")
    if result.offloaded:
        lines += ["", f"⚠️ {len(result.offloaded)} module(s) go to the CPU/disk: they run there, slowly."]
    return "\n".join(lines)


def load(report: LoadReport, fast: FastPathState) -> str:
    placement = {}
    for module, device in report.device_map.items():
        placement.setdefault(device_label(device), []).append(module or "(whole model)")
    where = "; ".join(f"{d}: {len(m)} module(s)" for d, m in placement.items())
    lines = [
        f"**Loaded** `{report.model}` in {report.load_seconds:.1f} s", "",
        "| | |", "|---|---|",
        f"| quantization | {report.quantization} |",
        f"| dtype | {report.dtype} |",
        f"| footprint | {mib(report.footprint_bytes)} |",
        f"| parameters | {report.parameters:,} |",
        f"| placement | {where} |",
        f"| attention | {report.attn_implementation} |",
        "", fast.summary(),
    ]
    if report.offloaded:
        lines += ["", f"⚠️ Offloaded to CPU/disk by the budget: {', '.join(list(report.offloaded)[:8])}. "
                      "Raise the GPU budget or use 4-bit to keep everything on the GPU."]
    return "\n".join(lines)


def metrics(result: GenerationMetrics, fast: FastPathState) -> str:
    return f"{result.summary()} · fast path {'on' if fast.enabled else 'off'} ({fast.attn_implementation})"


def saved(result: SaveResult) -> str:
    return f"**Saved** (fast path reversed first) to `{result.folder}`: {', '.join(result.files)}"


def pushed(result: PushResult) -> str:
    again = "saved and uploaded" if result.saved_again else "uploaded the folder saved earlier"
    return f"**Pushed** `{result.repo_id}` ({again}): [{result.commit_url}]({result.commit_url})"


def comparison(rows: Sequence[VariantResult]) -> str:
    lines = ["| variant | answer | tok/s | footprint | agreement with full precision |", "|---|---|---|---|---|"]
    for row in rows:
        if row.error:
            lines.append(f"| {row.quantization} | ✗ {row.error} | | | |")
            continue
        answer = row.text.replace("|", "\\|").replace("\n", " ")
        agreement = f"{row.agreement:.0%}" if row.agreement is not None else "—"
        lines.append(f"| {row.quantization} | {answer} | {row.decode_tokens_per_s:.1f} | {mib(row.footprint_bytes)} "
                     f"| {agreement} |")
    return "\n".join(lines)


def fit_report(report: FitReport) -> str:
    head = "✅ **Fits**" if report.fits else f"❌ **{report.verdict().capitalize()}**"
    lines = [f"{head} · `{report.model}` · {report.quantization} · context {report.context_length} · "
             f"batch {report.batch_size}", ""]
    if report.devices:
        lines += ["| device | weights | KV cache | activations | total | budget |", "|---|---|---|---|---|---|"]
        for d in report.devices:
            budget = mib(d.budget) if d.budget else "all free"
            lines.append(f"| {device_label(d.device)} | {mib(d.weights)} | {mib(d.kv_cache)} | {mib(d.activations)} "
                         f"| {mib(d.total)} | {budget} |")
    if report.offloaded:
        lines += ["", f"⚠️ {len(report.offloaded)} module(s) would run on the CPU/disk because the GPU budget is "
                      f"full: {', '.join(report.offloaded[:6])}{' …' if len(report.offloaded) > 6 else ''}. "
                      "That works, but each step moves them over PCIe: expect it to be much slower."]
    if report.fixes:
        lines += ["", "**Smallest changes that fit** (pick one below and press *Apply fix*):"]
        lines += [f"- {fix.label}" for fix in report.fixes]
    return "\n".join(lines)


def quality_report(report: QualityReport) -> str:
    return "\n".join([
        f"**Quality of {report.quantization}** on the shipped sample ({report.tokens} tokens)", "",
        "| | this model | full precision |", "|---|---|---|",
        f"| perplexity | {report.perplexity:.2f} | {report.reference_perplexity:.2f} |",
        f"| next-token agreement with full precision | {report.agreement:.1%} | 100% |",
    ])


def max_memory_text(budget: dict) -> str:
    return ", ".join(f"{device}={size / 1e6:g}MB" for device, size in budget.items())
