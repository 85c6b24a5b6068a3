"""The Model tab: what to load and how (quantization, placement, fast path), Plan, Will it fit?, Load.

Plan and the fit check read only a config and build the model on the meta device, so they run in
the handler's thread and never wait for the model worker. Load is a worker job. Every handler has
named parameters with defaults (the components' values), so scripts may name only what they change:
`client.predict(quant="nf4", api_name="/load_model")`.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from core import fit, loading, placement
from core.spec import (COMPUTE_DTYPES, DEVICE_MAP_NAMES, DTYPES, QUANT_LABELS, QUANT_STORAGES, GenerationSpec,
                       LoadSpec, QuantSpec, parse_device_map, parse_max_memory, parse_number)
from server.access import Action, Caller, checked_model
from ui import jobs, render
from server.context import AppContext
from ui.errors import user_errors

OUTDATED = "**Outdated**: the form has changed since this was computed; press the button again.\n\n"
QUANT_CHOICES = [(label, mode) for mode, label in QUANT_LABELS.items()]


@dataclass
class ModelTab:
    fields: list
    load_button: gr.Button
    load_out: gr.Markdown
    load_handler: object = None  # wired in ui.blocks: its outputs include the Generate tab's sampling controls


def load_spec(ctx: AppContext, caller: Caller, model, revision, dtype, quant, compute_dtype, double_quant,
              quant_storage, int8_threshold, skip_modules, fp32_cpu_offload, device_map, max_memory, fast_path,
              fast_path_compile) -> LoadSpec:
    skip = tuple(s.strip() for s in str(skip_modules or "").split(",") if s.strip())
    return LoadSpec(
        model=checked_model(caller, ctx.settings, model), revision=str(revision or "").strip() or None,
        dtype=str(dtype), quant=QuantSpec(mode=str(quant), compute_dtype=str(compute_dtype),
                                          double_quant=bool(double_quant), quant_storage=str(quant_storage),
                                          int8_threshold=parse_number("int8_threshold", int8_threshold),
                                          skip_modules=skip, fp32_cpu_offload=bool(fp32_cpu_offload)),
        device_map=parse_device_map(device_map), max_memory=parse_max_memory(max_memory), fast_path=bool(fast_path),
        fast_path_compile=bool(fast_path_compile), trust_remote_code=ctx.settings.trust_remote_code,
        use_server_token=caller.is_owner)


def build(ctx: AppContext) -> ModelTab:
    with gr.Row():
        model = gr.Textbox(label="Model (Hub id or local folder; empty: embedded SmolLM2-135M-Instruct)", value="",
                           placeholder="HuggingFaceTB/SmolLM2-360M-Instruct", scale=3,
                           info="A causal LM (Llama, Qwen, SmolLM, ...) or an encoder-decoder (T5, Flan-T5, BART, "
                                "...): the kind is read from its config.")
        revision = gr.Textbox(label="Revision (Hub models)", value="", placeholder="main", scale=1)
        dtype = gr.Dropdown(list(DTYPES), value="auto", label="dtype", scale=1)
    quant = gr.Radio(QUANT_CHOICES, value="none", label="Quantization (bitsandbytes)")
    with gr.Accordion("Quantization settings", open=False):
        with gr.Row():
            compute_dtype = gr.Dropdown(list(COMPUTE_DTYPES), value="auto", label="4-bit compute dtype")
            double_quant = gr.Checkbox(label="4-bit double quantization", value=False)
            quant_storage = gr.Dropdown(list(QUANT_STORAGES), value="uint8", label="4-bit quant storage")
        with gr.Row():
            int8_threshold = gr.Number(value=6.0, label="LLM.int8() outlier threshold")
            skip_modules = gr.Textbox(label="Modules to skip (comma-separated)", value="", placeholder="lm_head")
            fp32_cpu_offload = gr.Checkbox(label="fp32 CPU offload", value=False)
    with gr.Row():
        device_map = gr.Dropdown([*DEVICE_MAP_NAMES, "cuda:0"], value="auto",
                                 allow_custom_value=True, label="Device map")
        max_memory = gr.Textbox(label="Max memory per device", value="", placeholder="0=600MB, 1=1GiB, cpu=8GB")
        fast_path = gr.Checkbox(label="Fast path", value=False)
        fast_path_compile = gr.Checkbox(label="GPU: compile the decode step (~40 s once, +25%)", value=False)
    fields = [model, revision, dtype, quant, compute_dtype, double_quant, quant_storage, int8_threshold,
              skip_modules, fp32_cpu_offload, device_map, max_memory, fast_path, fast_path_compile]
    with gr.Row():
        plan_button = gr.Button("Plan")
        load_button = gr.Button("Load", variant="primary")
    plan_out = gr.Markdown()
    with gr.Accordion("Will it fit? (weights + KV cache + activations)", open=False):
        with gr.Row():
            context_length = gr.Number(value=2048, precision=0, label="Context length (tokens)")
            batch_size = gr.Number(value=1, precision=0, label="Batch size")
            fit_button = gr.Button("Will it fit?")
        fit_out = gr.Markdown()
        with gr.Row():
            fix_choice = gr.Dropdown([], label="Fix", interactive=True, scale=3)
            fix_button = gr.Button("Apply fix", scale=1)
        fix_error = gr.Markdown()
        fixes = gr.State([])
    load_out = gr.Markdown("No model loaded yet.")
    tab = ModelTab(fields=fields, load_button=load_button, load_out=load_out)

    @user_errors(ctx)
    def plan(model: str = "", revision: str = "", dtype: str = "auto", quant: str = "none",
             compute_dtype: str = "auto", double_quant: bool = False, quant_storage: str = "uint8",
             int8_threshold: float = 6.0, skip_modules: str = "", fp32_cpu_offload: bool = False,
             device_map: str = "auto", max_memory: str = "", fast_path: bool = False, fast_path_compile: bool = False,
             request: gr.Request = None, profile: gr.OAuthProfile | None = None) -> str:
        caller = ctx.admit(request, profile, Action.PLAN)
        spec = load_spec(ctx, caller, model, revision, dtype, quant, compute_dtype, double_quant, quant_storage,
                         int8_threshold, skip_modules, fp32_cpu_offload, device_map, max_memory, fast_path,
                         fast_path_compile)
        return render.plan(placement.plan(spec), loading.cuda_device_count())

    @user_errors(ctx)
    def check_fit(model: str = "", revision: str = "", dtype: str = "auto", quant: str = "none",
                  compute_dtype: str = "auto", double_quant: bool = False, quant_storage: str = "uint8",
                  int8_threshold: float = 6.0, skip_modules: str = "", fp32_cpu_offload: bool = False,
                  device_map: str = "auto", max_memory: str = "", fast_path: bool = False,
                  fast_path_compile: bool = False, context_length: int = 2048, batch_size: int = 1,
                  request: gr.Request = None, profile: gr.OAuthProfile | None = None):
        caller = ctx.admit(request, profile, Action.PLAN)
        spec = load_spec(ctx, caller, model, revision, dtype, quant, compute_dtype, double_quant, quant_storage,
                         int8_threshold, skip_modules, fp32_cpu_offload, device_map, max_memory, fast_path,
                         fast_path_compile)
        report = fit.estimate(spec, context_length=parse_number("context_length", context_length, int),
                              batch_size=parse_number("batch_size", batch_size, int))
        labels = [fix_label(f) for f in report.fixes]
        return (render.fit_report(report, loading.cuda_device_count()),
                gr.update(choices=labels, value=labels[0] if labels else None), list(report.fixes), "")

    def apply_fix(label: str, chosen_fixes: list):
        """Sets the form to the chosen fix; with no fix chosen, says so beside the button and changes nothing."""
        chosen = next((f for f in chosen_fixes or [] if fix_label(f) == label), None)
        if chosen is None:
            return (gr.skip(), gr.skip(), gr.skip(), gr.skip(),
                    "Run *Will it fit?* first, then pick one of the fixes it lists.")
        spec = chosen.spec
        note = "" if loadable_here(spec) else ("The form now holds a fix for a machine with the GPUs it names; this "
                                               "machine can plan it but not load it.")
        return (spec.quant.mode, spec.quant.fp32_cpu_offload, render.max_memory_text(dict(spec.max_memory)),
                chosen.context_length, note)

    @user_errors(ctx)
    def load_model(model: str = "", revision: str = "", dtype: str = "auto", quant: str = "none",
                   compute_dtype: str = "auto", double_quant: bool = False, quant_storage: str = "uint8",
                   int8_threshold: float = 6.0, skip_modules: str = "", fp32_cpu_offload: bool = False,
                   device_map: str = "auto", max_memory: str = "", fast_path: bool = False,
                   fast_path_compile: bool = False, request: gr.Request = None,
                   profile: gr.OAuthProfile | None = None, progress=gr.Progress()):
        caller = ctx.admit(request, profile, Action.LOAD)
        spec = load_spec(ctx, caller, model, revision, dtype, quant, compute_dtype, double_quant, quant_storage,
                         int8_threshold, skip_modules, fp32_cpu_offload, device_map, max_memory, fast_path,
                         fast_path_compile)

        jobs.run(ctx, lambda engine, job: engine.load(spec, progress=job.progress) and None, "load", request, progress)
        snap = ctx.worker.snapshot  # published before the load's job ended
        return (render.load(snap.report, snap.fast_path), snap.fast_path.enabled,
                *sampling_updates(snap.defaults, snap.defaults_note))

    tab.load_handler = load_model

    for field in fields:  # a result says what it was computed for, and is marked once its inputs change
        field.change(outdated, [plan_out, fit_out], [plan_out, fit_out], queue=False, api_visibility="private",
                     show_progress="hidden")
    for field in (context_length, batch_size):
        field.change(outdated, fit_out, fit_out, queue=False, api_visibility="private", show_progress="hidden")
    plan_button.click(plan, fields, plan_out, api_name="plan", concurrency_limit=2, concurrency_id="planning")
    fit_button.click(check_fit, [*fields, context_length, batch_size], [fit_out, fix_choice, fixes, fix_error],
                     api_name="check_fit", concurrency_limit=2, concurrency_id="planning",
                     show_progress_on=[fit_out])
    fix_button.click(apply_fix, [fix_choice, fixes], [quant, fp32_cpu_offload, max_memory, context_length, fix_error],
                     api_visibility="private", show_progress_on=[fix_error])
    return tab


def outdated(*shown: str):
    """The shown results, each marked as outdated (once)."""
    marked = [text if not text or text.startswith(OUTDATED) else OUTDATED + text for text in shown]
    return marked[0] if len(marked) == 1 else tuple(marked)


def loadable_here(spec: LoadSpec) -> bool:
    """Whether this machine could load `spec`: it names no GPU the machine lacks."""
    gpus = [d for d, _ in spec.max_memory if isinstance(d, int)]
    return all(g < loading.cuda_device_count() for g in gpus)


def fix_label(fix: fit.Fix) -> str:
    return fix.label if loadable_here(fix.spec) else f"{fix.label} (for a machine with that GPU; not this one)"


def sampling_updates(defaults: GenerationSpec, source: str) -> tuple:
    """Values for the Generate tab's sampling controls and the note that says where they came from."""
    return (defaults.greedy, defaults.temperature, defaults.top_p, defaults.top_k, defaults.repetition_penalty,
            source)
