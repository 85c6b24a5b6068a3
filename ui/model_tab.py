"""The Model tab: what to load and how (quantization, placement, fast path), Plan, Will it fit?, Load.

The form's fields come from one table (core.load_form): their components here, the named parameters of `/plan`,
`/check_fit` and `/load_model` (so scripts name only what they change:
`client.predict(quant="nf4", api_name="/load_model")`), and the command line's options. Plan and the fit check
read only a config and build the model on the meta device, so they run in the handler's thread and never wait for
the model worker. Load is a worker job. A result says what it was computed for and is marked once the form changes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import gradio as gr

from core import fit, load_form, loading, placement
from core.load_form import Field
from core.spec import LoadSpec, max_memory_text, parse_number
from server.access import Action, Caller, checked_model
from server.context import AppContext
from ui import jobs, render
from ui.errors import last_error
from ui.handlers import handler, with_load_form

OUTDATED = "**Outdated**: the form has changed since this was computed; press the button again.\n\n"
# How the form lays out on a wide screen; on a phone each row wraps at its fields' minimum widths.
LOOK = {"model": dict(scale=3, min_width=280), "revision": dict(scale=1, min_width=140),
        "dtype": dict(scale=1, min_width=140), "max_memory": dict(scale=2, min_width=240),
        "fast_path": dict(min_width=160), "fast_path_compile": dict(scale=2, min_width=240)}


@dataclass
class ModelTab:
    form: dict[str, gr.components.Component]  # by load_form field name, in the table's order
    load_button: gr.Button
    load_out: gr.Markdown
    load_error: gr.Markdown
    plan_out: gr.Markdown
    fit_out: gr.Markdown

    @property
    def fields(self) -> list:
        return list(self.form.values())

    @property
    def fast_path(self) -> gr.Checkbox:
        return self.form["fast_path"]


def component(f: Field) -> gr.components.Component:
    """The form's component for a field, not yet placed (the layout renders it)."""
    common = dict(label=f.label, value=f.default, elem_id=f"form-{f.name.replace('_', '-')}", render=False,
                  **LOOK.get(f.name, {}))
    if f.kind is bool:
        return gr.Checkbox(**common)
    if f.kind is float:
        return gr.Number(**common)
    if f.choice_labels:
        return gr.Radio(list(f.choice_labels), **common)
    if f.choices:
        return gr.Dropdown(list(f.choices), allow_custom_value=f.open_choices, **common)
    return gr.Textbox(placeholder=f.example, info=f.help, **common)


def spec_for(ctx: AppContext, caller: Caller, form: dict) -> LoadSpec:
    """The form as a LoadSpec for this caller: the model as the caller may name it, the launch options decided."""
    return load_form.spec_from(form, model=checked_model(caller, ctx.settings, form.get("model")),
                               trust_remote_code=ctx.settings.trust_remote_code, use_server_token=caller.is_owner)


@with_load_form
def plan(ctx: AppContext, form: dict, request: gr.Request = None, profile: gr.OAuthProfile | None = None) -> str:
    caller = ctx.admit(request, profile, Action.PLAN)
    return render.plan(placement.plan(spec_for(ctx, caller, form)), loading.cuda_device_count())


@with_load_form
def check_fit(ctx: AppContext, form: dict, context_length: int = 2048, batch_size: int = 1,
              request: gr.Request = None, profile: gr.OAuthProfile | None = None):
    caller = ctx.admit(request, profile, Action.PLAN)
    context, batch = parse_number("context_length", context_length, int), parse_number("batch_size", batch_size, int)
    report = fit.estimate(spec_for(ctx, caller, form), context_length=context, batch_size=batch)
    labels = [fix_label(f) for f in report.fixes]
    return (render.fit_report(report, loading.cuda_device_count()),
            gr.update(choices=labels, value=labels[0] if labels else None), list(report.fixes), "")


@with_load_form
def load_model(ctx: AppContext, form: dict, request: gr.Request = None, profile: gr.OAuthProfile | None = None,
               progress=gr.Progress()):
    """Loads on the worker; returns the report, the fast-path state and the new model's sampling defaults."""
    caller = ctx.admit(request, profile, Action.LOAD)
    spec = spec_for(ctx, caller, form)
    jobs.run(ctx, lambda engine, job: engine.load(spec, progress=job.progress) and None, "load", request, progress)
    snap = ctx.worker.snapshot  # published before the load's job ended
    return (render.load(snap.report, snap.fast_path), snap.fast_path.enabled,
            *sampling_updates(snap.defaults, snap.defaults_note))


def build(ctx: AppContext) -> ModelTab:
    form = {f.name: component(f) for f in load_form.FIELDS}
    with gr.Row():
        for name in ("model", "revision", "dtype"):
            form[name].render()
    form["quant"].render()
    with gr.Accordion("Quantization settings", open=False):
        with gr.Row():
            for name in ("compute_dtype", "double_quant", "quant_storage"):
                form[name].render()
        with gr.Row():
            for name in ("int8_threshold", "skip_modules", "fp32_cpu_offload"):
                form[name].render()
    with gr.Row():
        for name in ("device_map", "max_memory"):
            form[name].render()
    with gr.Row():
        for name in ("fast_path", "fast_path_compile"):
            form[name].render()
    unplaced = [name for name, c in form.items() if not c.is_rendered]
    if unplaced:
        raise RuntimeError(f"every field of core.load_form needs a place in the Model tab's layout: {unplaced}")
    with gr.Row():
        plan_button = gr.Button("Plan")
        load_button = gr.Button("Load", variant="primary")
    load_error = gr.Markdown(elem_id="load-error")
    plan_out = gr.Markdown(elem_id="plan-out")
    with gr.Accordion("Will it fit? (weights + KV cache + activations)", open=False):
        with gr.Row():
            context_length = gr.Number(value=2048, precision=0, label="Context length (tokens)", min_width=140)
            batch_size = gr.Number(value=1, precision=0, label="Batch size", min_width=100)
            fit_button = gr.Button("Will it fit?", min_width=120)
        fit_out = gr.Markdown(elem_id="fit-out")
        with gr.Row():
            fix_choice = gr.Dropdown([], label="Fix", interactive=True, scale=3, min_width=240)
            fix_button = gr.Button("Apply fix", scale=1, min_width=120)
        fix_error = gr.Markdown()
        fixes = gr.State([])
    load_out = gr.Markdown("", elem_id="load-out")  # the page's opening event says what is loaded (ui.blocks.on_open)
    tab = ModelTab(form=form, load_button=load_button, load_out=load_out, load_error=load_error, plan_out=plan_out,
                   fit_out=fit_out)
    fields = tab.fields

    for field in fields:  # a result says what it was computed for, and is marked once the user changes the form
        field.input(outdated, [plan_out, fit_out], [plan_out, fit_out], queue=False, api_visibility="private",
                    show_progress="hidden")
    for field in (context_length, batch_size):
        field.input(outdated, fit_out, fit_out, queue=False, api_visibility="private", show_progress="hidden")
    plan_button.click(handler(ctx, plan), fields, plan_out, api_name="plan", concurrency_limit=2,
                      concurrency_id="planning").failure(last_error, None, plan_out, api_visibility="private",
                                                         queue=False)
    fit_button.click(handler(ctx, check_fit), [*fields, context_length, batch_size],
                     [fit_out, fix_choice, fixes, fix_error], api_name="check_fit", concurrency_limit=2,
                     concurrency_id="planning", show_progress_on=[fit_out]).failure(
        last_error, None, fit_out, api_visibility="private", queue=False)
    fix_button.click(functools.partial(apply_fix, tab, context_length, fix_error),
                     [fix_choice, fixes, form["max_memory"], plan_out, fit_out],
                     [*fields, context_length, fix_error, plan_out, fit_out], api_visibility="private",
                     show_progress_on=[fix_error])
    return tab


def apply_fix(tab: ModelTab, context_length: gr.Number, fix_error: gr.Markdown, label: str, chosen_fixes: list,
              typed_budget: str, plan_shown: str, fit_shown: str) -> dict:
    """Sets the whole form to the chosen fix, keeping the budget's words where a size is unchanged; with no fix
    chosen, says so beside the button and changes nothing."""
    chosen = next((f for f in chosen_fixes or [] if fix_label(f) == label), None)
    if chosen is None:
        return {fix_error: "Run *Will it fit?* first, then pick one of the fixes it lists."}
    values = load_form.values_of(chosen.spec)
    values["max_memory"] = max_memory_text(dict(chosen.spec.max_memory), str(typed_budget or ""))
    note = "" if loadable_here(chosen.spec) else ("The form now holds a fix for a machine with the GPUs it names; "
                                                  "this machine can plan it but not load it.")
    plan_marked, fit_marked = outdated(plan_shown, fit_shown)
    return {**{tab.form[name]: value for name, value in values.items()}, context_length: chosen.context_length,
            fix_error: note, tab.plan_out: plan_marked, tab.fit_out: fit_marked}


def outdated(*shown: str):
    """The shown results, each marked as outdated (once)."""
    marked = [text if not text or text.startswith(OUTDATED) else OUTDATED + text for text in shown]
    return marked[0] if len(marked) == 1 else tuple(marked)


def loadable_here(spec: LoadSpec) -> bool:
    """Whether this machine could load `spec`: it names no GPU the machine lacks."""
    mapped = [] if isinstance(spec.device_map, str) else [d for _, d in spec.device_map]
    gpus = [d for d in [*dict(spec.max_memory), *mapped] if isinstance(d, int)]
    return all(g < loading.cuda_device_count() for g in gpus)


def fix_label(fix: fit.Fix) -> str:
    return fix.label if loadable_here(fix.spec) else f"{fix.label} (for a machine with that GPU; not this one)"


def form_values(spec: LoadSpec, fast_path: bool, show_paths: bool) -> dict[str, object]:
    """The form that loads `spec` again, with the fast path as it is now; a local folder by its name alone for a
    caller who may not see server paths."""
    values = {**load_form.values_of(spec), "fast_path": fast_path}
    if not show_paths and str(values["model"]).startswith("/"):
        values["model"] = str(values["model"]).rsplit("/", 1)[-1]
    return values


def sampling_updates(defaults, source: str) -> tuple:
    """Values for the Generate tab's sampling controls and the note that says where they came from."""
    return (defaults.greedy, defaults.temperature, defaults.top_p, defaults.top_k, defaults.repetition_penalty,
            source)
