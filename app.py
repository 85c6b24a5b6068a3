"""The Gradio app: tabs for the model and its quantization, generation, save & push, and compare.

It wires widgets to core and holds no model logic. Every action has a stable API name, so
`gradio_client` can script it (see the README). Importing this module builds nothing; `build()`
makes the Blocks and `main()` launches them.

    python app.py [--host 0.0.0.0] [--port 7860] [--share] [--auth user:password]
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
import threading
from collections.abc import Callable, Iterator

import gradio as gr

from core import compare as core_compare
from core import fastpath, fit, generation, hub, placement, quality
from core.engine import Engine
from core.errors import EngineError, NoModelLoadedError
from core.spec import (GenerationSpec, LoadSpec, QuantSpec, parse_device_map, parse_max_memory, parse_model)
from ui import render

log = logging.getLogger("app")
ENGINE = Engine()
QUANT_CHOICES = [("none (full precision)", "none"), ("LLM.int8() 8-bit", "int8"), ("FP4 4-bit", "fp4"),
                 ("NF4 4-bit", "nf4")]


def ui_errors(handler: Callable) -> Callable:
    """Core's errors become gr.Error with their message; anything else a short message, never a traceback."""

    def translate(error: Exception) -> gr.Error:
        if isinstance(error, EngineError):
            return gr.Error(str(error), title=error.title)
        log.exception("unexpected error in %s", handler.__name__)
        return gr.Error(f"Unexpected error ({type(error).__name__}). The server log has the details.",
                        title="Unexpected error")

    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def stream(*args, **kwargs):
            try:
                yield from handler(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as error:
                raise translate(error) from None
        return stream

    @functools.wraps(handler)
    def call(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as error:
            raise translate(error) from None
    return call


def load_spec(model: str, revision: str, dtype: str, quant: str, compute_dtype: str, double_quant: bool,
              quant_storage: str, int8_threshold: float, skip_modules: str, fp32_cpu_offload: bool,
              device_map: str, max_memory: str, fast_path: bool, fast_path_compile: bool,
              trust_remote_code: bool) -> LoadSpec:
    skip = tuple(s.strip() for s in (skip_modules or "").split(",") if s.strip())
    return LoadSpec(
        model=parse_model(model), revision=(revision or "").strip() or None, dtype=dtype,
        quant=QuantSpec(mode=quant, compute_dtype=compute_dtype, double_quant=bool(double_quant),
                        quant_storage=quant_storage, int8_threshold=float(int8_threshold), skip_modules=skip,
                        fp32_cpu_offload=bool(fp32_cpu_offload)),
        device_map=parse_device_map(device_map), max_memory=parse_max_memory(max_memory),
        fast_path=bool(fast_path), fast_path_compile=bool(fast_path_compile),
        trust_remote_code=bool(trust_remote_code))


@ui_errors
def plan_model(*fields) -> str:
    return render.plan(placement.plan(load_spec(*fields)))


@ui_errors
def check_fit(*fields_and_sizes) -> tuple[str, dict, list]:
    *fields, context_length, batch_size = fields_and_sizes
    report = fit.estimate(load_spec(*fields), context_length=int(context_length), batch_size=int(batch_size))
    labels = [f.label for f in report.fixes]
    return render.fit_report(report), gr.update(choices=labels, value=labels[0] if labels else None), \
        list(report.fixes)


@ui_errors
def apply_fix(label: str, fixes: list) -> tuple:
    """Sets the form to the chosen fix: quantization, fp32 CPU offload, budget and context length."""
    chosen = next((f for f in fixes or [] if f.label == label), None)
    if chosen is None:
        raise gr.Error("Run 'Will it fit?' first, then pick a fix.", title="No fix chosen")
    spec = chosen.spec
    return spec.quant.mode, spec.quant.fp32_cpu_offload, render.max_memory_text(dict(spec.max_memory)), \
        chosen.context_length


@ui_errors
def load_model(*fields, progress=gr.Progress()) -> tuple[str, bool]:
    spec = load_spec(*fields)
    loaded = ENGINE.load(spec, progress=lambda fraction, message: progress(fraction, desc=message))
    state = fastpath.state(loaded)
    return render.load(loaded.report, state), state.enabled


@ui_errors
def set_fast_path(on: bool) -> str:
    with ENGINE.lock:
        return fastpath.set_enabled(ENGINE.current, bool(on)).summary()


def generation_spec(max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty, seed,
                    system_prompt="") -> GenerationSpec:
    return GenerationSpec(max_new_tokens=int(max_new_tokens), greedy=bool(greedy), temperature=float(temperature),
                          top_p=float(top_p), top_k=int(top_k), repetition_penalty=float(repetition_penalty),
                          seed=None if seed in (None, "", -1) else int(seed),
                          system_prompt=(system_prompt or "").strip() or None)


@ui_errors
def chat(message: str, history: list[dict] | None, max_new_tokens, greedy, temperature, top_p, top_k,
         repetition_penalty, seed, system_prompt) -> Iterator[tuple[list[dict], str]]:
    """Streams the answer into the chat history; returns the final history and the speed metrics."""
    history = [{"role": m["role"], "content": _text(m["content"])} for m in (history or [])]
    if not (message or "").strip():
        raise gr.Error("Type a message first.", title="Empty message")
    spec = generation_spec(max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty, seed,
                           system_prompt)
    conversation = history + [{"role": "user", "content": message}]
    cancel = threading.Event()
    with ENGINE.lock:
        loaded = ENGINE.current
        try:
            for update in generation.stream(loaded, conversation, spec, cancel):
                shown = conversation + [{"role": "assistant", "content": update.text}]
                if update.done:
                    yield shown, render.metrics(update.metrics, fastpath.state(loaded))
                else:
                    yield shown, "generating…"
        finally:
            cancel.set()  # the Stop button closes this generator: stop the model too


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # gradio 6 may send [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


@ui_errors
def save_model(folder: str) -> str:
    if not (folder or "").strip():
        raise gr.Error("Give a folder to save to.", title="No folder")
    with ENGINE.lock:
        return render.saved(hub.save(ENGINE.current, folder.strip()))


def _token(oauth_token: gr.OAuthToken | None) -> str | None:
    if oauth_token is not None:
        return oauth_token.token
    from huggingface_hub import get_token

    return get_token()  # HF_TOKEN or the cached `hf auth login`


@ui_errors
def push_to_hub(repo_id: str, private: bool, commit_message: str, oauth_token: gr.OAuthToken | None = None) -> str:
    with ENGINE.lock:
        result = hub.push(ENGINE.current, (repo_id or "").strip(), token=_token(oauth_token), private=bool(private),
                          commit_message=(commit_message or "").strip() or "Upload quantized model")
    return render.pushed(result)


@ui_errors
def compare_variants(prompt: str, modes: list[str], max_new_tokens, progress=gr.Progress()) -> str:
    if not ENGINE.loaded:
        raise NoModelLoadedError("Load a model first: Compare runs the loaded model in each variant.")
    if not (prompt or "").strip():
        raise gr.Error("Type a prompt to compare.", title="Empty prompt")
    with ENGINE.lock:
        rows = core_compare.compare(ENGINE, prompt, modes or ["none"], int(max_new_tokens),
                                    progress=lambda fraction, message: progress(fraction, desc=message))
    return render.comparison(rows)


def current_status() -> tuple[str, bool]:
    """What the Model tab shows when a page opens: the model already loaded, if any."""
    if not ENGINE.loaded:
        return "No model loaded yet.", False
    state = fastpath.state(ENGINE.current)
    return render.load(ENGINE.current.report, state), state.enabled


@ui_errors
def quality_check(progress=gr.Progress()) -> str:
    with ENGINE.lock:
        report = quality.check(ENGINE, progress=lambda fraction, message: progress(fraction, desc=message))
    return render.quality_report(report)


def on_space() -> bool:
    return bool(os.environ.get("SPACE_ID") or os.environ.get("OAUTH_CLIENT_ID"))


def build() -> gr.Blocks:
    with gr.Blocks(title="Quantized LLM") as demo:
        gr.Markdown("# Quantized LLM on one GPU\nLoad a causal LM with bitsandbytes (8-bit or 4-bit), place it "
                    "under a memory budget, chat with it, and push it to the Hub.")
        with gr.Tab("Model"):
            with gr.Row():
                model = gr.Textbox(label="Model (Hub id or local folder; empty: embedded SmolLM2-135M-Instruct)",
                                   value="", placeholder="HuggingFaceTB/SmolLM2-360M-Instruct", scale=3)
                revision = gr.Textbox(label="Revision", value="", placeholder="main", scale=1)
                dtype = gr.Dropdown(["auto", "float32", "bfloat16", "float16"], value="auto", label="dtype", scale=1)
            quant = gr.Radio(QUANT_CHOICES, value="none", label="Quantization (bitsandbytes)")
            with gr.Accordion("Quantization settings", open=False):
                with gr.Row():
                    compute_dtype = gr.Dropdown(["auto", "float32", "bfloat16", "float16"], value="auto",
                                                label="4-bit compute dtype")
                    double_quant = gr.Checkbox(label="4-bit double quantization", value=False)
                    quant_storage = gr.Dropdown(["uint8", "bfloat16", "float16", "float32"], value="uint8",
                                                label="4-bit quant storage")
                with gr.Row():
                    int8_threshold = gr.Number(value=6.0, label="LLM.int8() outlier threshold")
                    skip_modules = gr.Textbox(label="Modules to skip (comma-separated)", placeholder="lm_head")
                    fp32_cpu_offload = gr.Checkbox(label="fp32 CPU offload", value=False)
            with gr.Row():
                device_map = gr.Dropdown(["auto", "balanced", "sequential", "cpu", "cuda:0"], value="auto",
                                         allow_custom_value=True, label="Device map")
                max_memory = gr.Textbox(label="Max memory per device", placeholder="0=600MB, 1=1GiB, cpu=8GB")
                fast_path = gr.Checkbox(label="Fast path", value=False)
                fast_path_compile = gr.Checkbox(label="GPU: compile the decode step (~40 s once, +25%)", value=False)
                trust_remote_code = gr.Checkbox(label="Trust remote code", value=False)
            fields = [model, revision, dtype, quant, compute_dtype, double_quant, quant_storage, int8_threshold,
                      skip_modules, fp32_cpu_offload, device_map, max_memory, fast_path, fast_path_compile,
                      trust_remote_code]
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
                fixes = gr.State([])
            load_out = gr.Markdown("No model loaded yet.")
        with gr.Tab("Generate"):
            chatbot = gr.Chatbot(label="Chat", height=380, elem_id="chat")
            with gr.Row():
                message = gr.Textbox(label="Message", placeholder="What is the capital of France?", scale=4)
                send = gr.Button("Send", variant="primary", scale=1)
                stop = gr.Button("Stop", scale=1)
            metrics = gr.Markdown()
            with gr.Row():
                fast_toggle = gr.Checkbox(label="Fast path", value=False)
                fast_out = gr.Markdown()
            with gr.Accordion("Sampling", open=False):
                with gr.Row():
                    max_new_tokens = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens")
                    greedy = gr.Checkbox(label="Greedy", value=False)
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)")
                with gr.Row():
                    temperature = gr.Slider(0.05, 2.0, value=0.7, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, label="Top-p")
                    top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k")
                    repetition_penalty = gr.Slider(0.8, 2.0, value=1.0, label="Repetition penalty")
                system_prompt = gr.Textbox(label="System prompt", value="")
            clear = gr.Button("Clear chat")
        with gr.Tab("Save & push"):
            gr.Markdown("Saving reverses the fast path first, so the checkpoint is a plain transformers one.")
            with gr.Row():
                folder = gr.Textbox(label="Folder", value=str(__import__("core.saves").saves.save_root() / "local-copy"), scale=3)
                save_button = gr.Button("Save", scale=1)
            save_out = gr.Markdown()
            if on_space():
                gr.LoginButton()
            else:
                gr.Markdown("Pushing uses `HF_TOKEN` or your cached `hf auth login`; on a Space, the sign-in "
                            "button appears here.")
            with gr.Row():
                repo_id = gr.Textbox(label="Repo id", placeholder="your-name/smollm2-135m-nf4", scale=3)
                private = gr.Checkbox(label="Private", value=True, scale=1)
            commit_message = gr.Textbox(label="Commit message", value="Upload quantized model")
            push_button = gr.Button("Push to the Hub", variant="primary")
            push_out = gr.Markdown()
        with gr.Tab("Compare"):
            gr.Markdown("One greedy prompt through the loaded model in full precision and each quantized "
                        "variant that fits; agreement is the share of answer tokens equal to full precision.")
            compare_prompt = gr.Textbox(label="Prompt", value="What is the capital of France?")
            with gr.Row():
                compare_modes = gr.CheckboxGroup(["none", "int8", "fp4", "nf4"], value=["none", "int8", "nf4"],
                                                 label="Variants")
                compare_tokens = gr.Slider(8, 256, value=32, step=1, label="Max new tokens")
            compare_button = gr.Button("Compare", variant="primary")
            compare_out = gr.Markdown()
            gr.Markdown("**Quality check**: perplexity and next-token agreement of the loaded model against the "
                        "same model in full precision, on a short public-domain text shipped with the app.")
            quality_button = gr.Button("Run quality check")
            quality_out = gr.Markdown()

        demo.load(current_status, None, [load_out, fast_toggle], api_name=False)
        plan_button.click(plan_model, fields, plan_out, api_name="plan")
        fit_button.click(check_fit, [*fields, context_length, batch_size], [fit_out, fix_choice, fixes],
                         api_name="check_fit")
        fix_button.click(apply_fix, [fix_choice, fixes], [quant, fp32_cpu_offload, max_memory, context_length],
                         api_name=False)
        load_button.click(load_model, fields, [load_out, fast_toggle], api_name="load_model")
        fast_toggle.input(set_fast_path, fast_toggle, fast_out, api_name="set_fast_path")
        sampling = [max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty, seed, system_prompt]
        events = [trigger(chat, [message, chatbot, *sampling], [chatbot, metrics], api_name=name)
                  for trigger, name in ((send.click, "generate"), (message.submit, False))]
        for event in events:
            event.then(lambda: "", None, message, api_name=False)
        stop.click(None, None, None, cancels=events, api_name=False)
        clear.click(lambda: ([], ""), None, [chatbot, metrics], api_name=False)
        save_button.click(save_model, folder, save_out, api_name="save_model")
        push_button.click(push_to_hub, [repo_id, private, commit_message], push_out, api_name="push_to_hub")
        quality_button.click(quality_check, None, quality_out, api_name="quality")
        compare_button.click(compare_variants, [compare_prompt, compare_modes, compare_tokens], compare_out,
                             api_name="compare")
    demo.queue(default_concurrency_limit=1)  # one GPU: requests are served in turn, with queue positions
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Quantized LLM app")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", default=os.environ.get("APP_SHARE") == "1",
                        help="create a public share link for collaborators")
    parser.add_argument("--auth", default=os.environ.get("APP_AUTH"),
                        help="user:password required to open the app (or APP_AUTH)")
    parser.add_argument("--preload", action="store_true", default=os.environ.get("APP_PRELOAD", "1") == "1",
                        help="load the default model at start (APP_PRELOAD=0 to skip)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.preload:
        from space.defaults import default_load_spec

        log.info("Loading the default model…")
        ENGINE.load(default_load_spec())
    auth = tuple(args.auth.split(":", 1)) if args.auth and ":" in args.auth else None
    build().launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                   theme=gr.themes.Soft())


if __name__ == "__main__":
    main()
