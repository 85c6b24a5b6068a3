"""The whole page: header, the caller's role, and the tabs; what a page shows when it opens; what spans tabs.

Building the Blocks has no side effects. What the page shows of the loaded model comes from the worker's
snapshot (core.snapshot), never from the engine: when a page opens, the Model tab's form holds the loaded
model's settings, the load report and the sampling defaults are the loaded model's, and both fast-path boxes
(the Model tab's load option and the Generate tab's toggle) show its one state; changing either box applies
to the loaded model and updates the other. For a visitor of a shared app, what only the owner may do is greyed
out with the reason on the button (the handlers refuse those actions themselves as well).
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from server.access import Action, Caller, may, visitor_note
from server.context import AppContext
from ui import chat_tab, compare_tab, conversations, model_tab, render, save_tab
from ui.chat_tab import ChatTab
from ui.compare_tab import CompareTab
from ui.errors import last_error
from ui.handlers import handler
from ui.model_tab import ModelTab
from ui.save_tab import SaveTab

OWNER_ONLY = "owner only"
# Tables keep whole words: a narrow screen scrolls a wide table sideways rather than breaking "property" in two.
# The chat's own buttons (clear, copy all) get a strip of their own instead of floating over the first message.
CSS = """
#compare-out table, #load-out table, #plan-out table, #fit-out table, #quality-out table {
  table-layout: auto; width: 100%; }
#compare-out th, #compare-out td, #load-out th, #load-out td, #plan-out th, #plan-out td,
#fit-out th, #fit-out td, #quality-out th, #quality-out td { word-break: normal; overflow-wrap: normal; }
#compare-out th, #compare-out td:not(:nth-child(2)), #load-out td:first-child, #fit-out th, #fit-out td {
  white-space: nowrap; }
#chat .top-panel { position: static; display: flex; justify-content: flex-end; }
"""


def role_banner(ctx: AppContext, caller: Caller) -> str:
    if not ctx.settings.shared:
        return ""
    if caller.is_owner:
        return f"Signed in as **{render.esc(caller.name or 'owner')}**, the owner of this app: every action is open."
    return f"You are a **visitor** of this shared app. {render.esc(visitor_note())}"


@dataclass
class Page:
    banner: gr.Markdown
    model: ModelTab
    chat: ChatTab
    saving: SaveTab
    comparing: CompareTab

    def gated(self, on_space: bool) -> list[tuple[gr.components.Component, str | None, Action]]:
        """What only some callers may do: the control, its label (None: a checkbox), the action it stands for."""
        return [(self.model.load_button, "Load", Action.LOAD), (self.chat.fast_toggle, None, Action.FAST_PATH),
                (self.model.fast_path, None, Action.FAST_PATH),
                (self.saving.save_button, "Save on the server", Action.SAVE),
                (self.saving.push_button, "Push to the Hub", Action.PUSH_OWN if on_space else Action.PUSH_SERVER),
                (self.comparing.compare_button, "Compare", Action.COMPARE),
                (self.comparing.quality_button, "Run quality check", Action.QUALITY)]

    def opening_outputs(self, on_space: bool) -> list:
        return [self.banner, self.model.load_out, *self.model.fields, self.chat.fast_toggle, self.chat.fast_note,
                *self.chat.sampling, self.chat.defaults_note, *[c for c, _, _ in self.gated(on_space)]]

    @property
    def fast_path_outputs(self) -> list:
        return [self.chat.fast_toggle, self.model.fast_path, self.chat.fast_note]


def fast_path_shown(ctx: AppContext, page: Page) -> dict:
    """The loaded model's one fast-path state, in both boxes and in the Generate tab's note."""
    snap = ctx.worker.snapshot
    on = snap is not None and snap.fast_path.enabled
    return {page.chat.fast_toggle: on, page.model.fast_path: on,
            page.chat.fast_note: snap.fast_path.summary() if snap is not None else ""}


def fast_path_turned(ctx: AppContext) -> str:
    snap = ctx.worker.snapshot
    on = snap is not None and snap.fast_path.enabled
    return f"Fast path turned {'on' if on else 'off'}: the next answer's metrics show its effect."


def on_open(ctx: AppContext, page: Page, request: gr.Request, profile: gr.OAuthProfile | None = None) -> dict:
    """What a page shows when it opens: the caller's role, and the loaded model as the worker last published it."""
    caller = ctx.caller(request, profile)
    shown: dict = {page.banner: role_banner(ctx, caller)}
    snap = ctx.worker.snapshot
    if snap is None:
        shown[page.model.load_out] = "No model loaded yet."
    else:
        values = model_tab.form_values(snap.spec, snap.fast_path.enabled, show_paths=caller.is_owner)
        shown.update({page.model.form[name]: value for name, value in values.items()})
        shown.update(fast_path_shown(ctx, page))
        shown[page.model.load_out] = render.load(snap.report, snap.fast_path)
        shown.update(zip([*page.chat.sampling, page.chat.defaults_note],
                         model_tab.sampling_updates(snap.defaults, snap.defaults_note)))
    for component, label, action in page.gated(ctx.settings.on_space):
        allowed = may(caller.role, action)
        update = {"interactive": allowed}
        if component in shown:
            update["value"] = shown[component]
        if not allowed and label is None:  # a checkbox: the reason goes in its label
            update["label"] = f"Fast path ({OWNER_ONLY})"
        elif not allowed:
            update["value"] = f"{label} ({OWNER_ONLY})"
        shown[component] = gr.update(**update)
    return shown


def loaded_note() -> tuple[str, str]:
    return "A new model is loaded: its metrics appear after its first answer.", ""


def build(ctx: AppContext) -> gr.Blocks:
    with gr.Blocks(title="Quantized LLM") as demo:
        gr.Markdown("# Quantized LLM on one GPU\nLoad a causal LM or an encoder-decoder with bitsandbytes (8-bit or "
                    "4-bit), place it under a memory budget, chat with it, and push it to the Hub.")
        banner = gr.Markdown(elem_id="role-banner")
        with gr.Tabs(overflow_behavior="wrap"):  # every tab one tap away on a phone, none behind a menu
            with gr.Tab("Model"):
                model = model_tab.build(ctx)
            with gr.Tab("Generate"):
                chat = chat_tab.build(ctx)
            with gr.Tab("Save & push"):
                saving = save_tab.build(ctx)
            with gr.Tab("Compare"):
                comparing = compare_tab.build(ctx)
        page = Page(banner=banner, model=model, chat=chat, saving=saving, comparing=comparing)
        wire(ctx, demo, page)
    demo.queue(default_concurrency_limit=None, max_size=ctx.settings.limits.queue_size)
    return demo


def wire(ctx: AppContext, demo: gr.Blocks, page: Page) -> None:
    """The events that span tabs: opening the page, Load (its results land on the Generate tab), the fast path."""
    model, chat = page.model, page.chat
    private = dict(queue=False, api_visibility="private")
    demo.load(handler(ctx, on_open, page), None, page.opening_outputs(ctx.settings.on_space), **private)
    demo.load(conversations.restore, [chat.saved, chat.chatbot, chat.current, chat.restored],
              [chat.chatbot, chat.current, chat.conversation_list, chat.restored], **private)
    show_fast_path = handler(ctx, fast_path_shown, page)
    loading = model.load_button.click(handler(ctx, model_tab.load_model), model.fields,
                                      [model.load_out, chat.fast_toggle, *chat.sampling, chat.defaults_note],
                                      api_name="load_model", concurrency_limit=None, show_progress_on=[model.load_out])
    loading.success(loaded_note, None, [chat.status, model.load_error], **private)
    loading.failure(last_error, None, model.load_error, **private)
    loading.then(show_fast_path, None, page.fast_path_outputs, **private)
    for box, api_name in ((chat.fast_toggle, "set_fast_path"), (model.fast_path, None)):
        toggled = box.input(handler(ctx, chat_tab.set_fast_path), box, chat.fast_note, concurrency_limit=None,
                            show_progress_on=[chat.fast_note],
                            **({"api_name": api_name} if api_name else {"api_visibility": "private"}))
        toggled.then(show_fast_path, None, page.fast_path_outputs, **private)
        toggled.success(handler(ctx, fast_path_turned), None, chat.status, **private)
