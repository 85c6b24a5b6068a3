"""The Compare tab: one greedy prompt through the loaded model in each quantized variant, and the quality check.

Both reload the model (one variant in memory at a time) and put the user's model back at the end, so they are
owner-only worker jobs. Each shows its progress (which variant loads or answers) in its output area while it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from core import compare as core_compare
from core import quality
from core.errors import SpecError
from core.spec import QUANTIZATIONS, parse_number
from server.access import Action
from server.context import AppContext
from ui import jobs, render
from ui.errors import last_error
from ui.handlers import handler


@dataclass
class CompareTab:
    compare_button: gr.Button
    quality_button: gr.Button


def compare(ctx: AppContext, prompt: str = "What is the capital of France?", variants: list | None = None,
            max_new_tokens: int = 32, request: gr.Request = None, profile: gr.OAuthProfile | None = None,
            progress=gr.Progress()) -> str:
    ctx.admit(request, profile, Action.COMPARE)
    limits = ctx.settings.limits
    text = str(prompt or "")
    if not text.strip():
        raise SpecError("prompt", text, "type a prompt to compare")
    limits.check_message(text)
    chosen = list(dict.fromkeys(variants or ["none"]))  # each variant once, in the order given
    unknown = [v for v in chosen if v not in QUANTIZATIONS]
    if unknown:
        raise SpecError("variants", unknown, f"choose from {', '.join(QUANTIZATIONS)}")
    tokens = parse_number("max_new_tokens", max_new_tokens, int)
    limits.check_new_tokens(tokens)
    rows = jobs.run(ctx, lambda engine, job: core_compare.compare(engine, text, chosen, tokens, progress=job.progress),
                    "compare", request, progress)
    return render.comparison(rows)


def quality_check(ctx: AppContext, request: gr.Request = None, profile: gr.OAuthProfile | None = None,
                  progress=gr.Progress()) -> str:
    ctx.admit(request, profile, Action.QUALITY)
    report = jobs.run(ctx, lambda engine, job: quality.check(engine, progress=job.progress), "quality", request,
                      progress)
    return render.quality_report(report)


def build(ctx: AppContext) -> CompareTab:
    limits = ctx.settings.limits
    gr.Markdown("One greedy prompt through the loaded model in full precision and each quantized variant that fits; "
                "agreement compares the answers token by token over the length of the shorter one.")
    prompt = gr.Textbox(label="Prompt", value="What is the capital of France?")
    with gr.Row():
        variants = gr.CheckboxGroup(list(QUANTIZATIONS), value=["none", "int8", "nf4"], label="Variants",
                                    min_width=240)
        max_new_tokens = gr.Slider(8, min(256, limits.max_new_tokens), value=32, step=1, label="Max new tokens",
                                   min_width=200)
    compare_button = gr.Button("Compare", variant="primary")
    compare_out = gr.Markdown(elem_id="compare-out", min_height=80)
    gr.Markdown("**Quality check**: perplexity (lower is better) and next-token agreement of the loaded model against "
                "the same model in full precision, on a short public-domain text shipped with the app.")
    quality_button = gr.Button("Run quality check")
    quality_out = gr.Markdown(elem_id="quality-out", min_height=80)

    compare_button.click(handler(ctx, compare), [prompt, variants, max_new_tokens], compare_out, api_name="compare",
                         concurrency_limit=None, show_progress_on=[compare_out]).failure(
        last_error, None, compare_out, api_visibility="private", queue=False)
    quality_button.click(handler(ctx, quality_check), None, quality_out, api_name="quality", concurrency_limit=None,
                         show_progress_on=[quality_out]).failure(
        last_error, None, quality_out, api_visibility="private", queue=False)
    return CompareTab(compare_button=compare_button, quality_button=quality_button)
