"""The whole page: header, the caller's role, and the tabs; and what a page shows when it opens.

Building the Blocks has no side effects. When a page opens, it shows the model already loaded, takes
the sampling defaults from it, and, for a visitor of a shared app, greys out what only the owner may
do with the reason on the button (the handlers refuse those actions themselves as well).
"""

from __future__ import annotations

import gradio as gr

from server.access import Action, Caller, may, visitor_note
from ui import chat_tab, compare_tab, model_tab, render, save_tab
from server.context import AppContext

OWNER_ONLY = "owner only"
CSS = """
#compare-out table { table-layout: auto; width: 100%; }
#compare-out th, #compare-out td { word-break: normal; overflow-wrap: normal; }
#compare-out th, #compare-out td:not(:nth-child(2)) { white-space: nowrap; }
"""


def role_banner(ctx: AppContext, caller: Caller) -> str:
    if not ctx.settings.shared:
        return ""
    if caller.is_owner:
        return f"Signed in as **{render.esc(caller.name or 'owner')}**, the owner of this app: every action is open."
    return f"You are a **visitor** of this shared app. {render.esc(visitor_note())}"


def build(ctx: AppContext) -> gr.Blocks:
    with gr.Blocks(title="Quantized LLM") as demo:
        gr.Markdown("# Quantized LLM on one GPU\nLoad a causal LM or an encoder-decoder with bitsandbytes (8-bit or "
                    "4-bit), place it under a memory budget, chat with it, and push it to the Hub.")
        banner = gr.Markdown(elem_id="role-banner")
        with gr.Tab("Model"):
            model = model_tab.build(ctx)
        with gr.Tab("Generate"):
            chat = chat_tab.build(ctx)
        with gr.Tab("Save & push"):
            saving = save_tab.build(ctx)
        with gr.Tab("Compare"):
            comparing = compare_tab.build(ctx)

        gated = [(model.load_button, "Load", Action.LOAD), (chat.fast_toggle, None, Action.FAST_PATH),
                 (saving["save_button"], "Save on the server", Action.SAVE),
                 (saving["push_button"], "Push to the Hub", Action.PUSH_OWN if ctx.settings.on_space
                  else Action.PUSH_SERVER),
                 (comparing["compare_button"], "Compare", Action.COMPARE),
                 (comparing["quality_button"], "Run quality check", Action.QUALITY)]

        def on_open(request: gr.Request, profile: gr.OAuthProfile | None = None):
            caller = ctx.caller(request, profile)
            controls = []
            for component, label, action in gated:
                if may(caller.role, action):
                    controls.append(gr.update(interactive=True))
                elif label is None:
                    controls.append(gr.update(interactive=False, label=f"Fast path ({OWNER_ONLY})"))
                else:
                    controls.append(gr.update(interactive=False, value=f"{label} ({OWNER_ONLY})"))
            snap = ctx.worker.snapshot
            if snap is None:
                return role_banner(ctx, caller), "No model loaded yet.", gr.skip(), *[gr.skip()] * 6, *controls
            return (role_banner(ctx, caller), render.load(snap.report, snap.fast_path), snap.fast_path.enabled,
                    *model_tab.sampling_updates(snap.defaults, snap.defaults_note), *controls)

        page_outputs = [banner, model.load_out, chat.fast_toggle, *chat.sampling, chat.defaults_note,
                        *[component for component, _, _ in gated]]
        demo.load(on_open, None, page_outputs, api_visibility="private", queue=False)
        model.load_button.click(model.load_handler, model.fields,
                                [model.load_out, chat.fast_toggle, *chat.sampling, chat.defaults_note],
                                api_name="load_model", concurrency_limit=None, show_progress_on=[model.load_out]
                                ).success(lambda: "A new model is loaded: its metrics appear after its first answer.",
                                          None, chat.status, queue=False, api_visibility="private")
    demo.queue(default_concurrency_limit=None, max_size=ctx.settings.limits.queue_size)
    return demo

