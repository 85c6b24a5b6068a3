"""The Generate tab: a streaming chat with Stop, Retry and Undo, sampling controls, and the fast-path toggle.

A chat is a job on the model worker; the handler follows its events and yields the growing answer.
No lock is held across a `yield`: Gradio may run each step on another thread and close the handler
from any of them. Stop cancels this session's chat job through the worker, so the model stops after
its current token and the handler ends normally, showing the partial answer marked as stopped. A
closed tab closes the handler, whose `finally` cancels the job the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gradio as gr

from core import constrain, fastpath, generation
from core.errors import SpecError
from core.spec import GenerationSpec
from core.serving.requests import ChatRequest
from core.worker import Chunk, Queued
from server.access import Action
from ui import jobs, render
from server.context import AppContext, session_of
from ui.errors import user_errors
from ui.model_tab import number

_FOOTER = re.compile(r"\n\n\*(?:stopped · )?answered by [^\n]*\*\s*$")
ROLES = ("user", "assistant", "system")


@dataclass
class ChatTab:
    chatbot: gr.Chatbot
    status: gr.Markdown
    fast_toggle: gr.Checkbox
    sampling: list  # greedy, temperature, top_p, top_k, repetition_penalty (what a load resets)
    defaults_note: gr.Markdown


def text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # gradio 6 may send [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return "" if content is None else str(content)


def conversation_of(history) -> list[dict]:
    """The chat as the model should see it: roles and plain text, without the app's 'answered by' footers."""
    if history is None:
        return []
    if not isinstance(history, list) or not all(isinstance(m, dict) and m.get("role") in ROLES for m in history):
        raise SpecError("history", str(history)[:60], "send a list of {'role': 'user' | 'assistant' | 'system', "
                                                      "'content': text} messages (or an empty list)")
    return [{"role": m["role"], "content": _FOOTER.sub("", text_of(m.get("content")))} for m in history]


def with_footer(text: str, by: str, stopped: bool) -> str:
    return f"{text}\n\n*{'stopped · ' if stopped else ''}answered by {render.esc(by)}*"


def generation_spec(ctx: AppContext, max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty, seed,
                    system_prompt, answer_json=False, json_schema="") -> GenerationSpec:
    new_tokens = number("max_new_tokens", max_new_tokens, int)
    ctx.settings.limits.check_new_tokens(new_tokens)
    seed_value = None if seed in (None, "") else number("seed", seed, int)
    return GenerationSpec(max_new_tokens=new_tokens, greedy=bool(greedy),
                          temperature=number("temperature", temperature), top_p=number("top_p", top_p),
                          top_k=number("top_k", top_k, int),
                          repetition_penalty=number("repetition_penalty", repetition_penalty),
                          seed=None if seed_value == -1 else seed_value,
                          system_prompt=str(system_prompt or "").strip() or None,
                          constraint=constrain.json_answer(bool(answer_json), json_schema))


def as_code(text: str, answer_json: bool) -> str:
    """A JSON answer shows as a code block, fenced by more backticks than any run inside it (a string may hold some)."""
    if not answer_json:
        return text
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{fence}json\n{text}\n{fence}"


def build(ctx: AppContext) -> ChatTab:
    limits = ctx.settings.limits
    chatbot = gr.Chatbot(label="Chat", height=380, elem_id="chat")
    with gr.Row():
        message = gr.Textbox(label="Message", placeholder="What is the capital of France?", scale=4)
        send = gr.Button("Send", variant="primary", scale=1)
        stop = gr.Button("Stop", scale=1)
    with gr.Row():
        retry = gr.Button("Retry", size="sm")
        undo = gr.Button("Undo", size="sm")
        clear = gr.Button("Clear chat", size="sm")
    status = gr.Markdown(elem_id="chat-status")
    with gr.Row():
        fast_toggle = gr.Checkbox(label="Fast path", value=False, elem_id="fast-toggle")
        fast_out = gr.Markdown()
    with gr.Accordion("Sampling", open=False):
        defaults_note = gr.Markdown("Sampling defaults: taken from the loaded model's generation config.")
        with gr.Row():
            max_new_tokens = gr.Slider(1, limits.max_new_tokens, value=min(128, limits.max_new_tokens), step=1,
                                       label=f"Max new tokens (at most {limits.max_new_tokens})",
                                       elem_id="max-new-tokens")
            greedy = gr.Checkbox(label="Greedy", value=generation.CONSERVATIVE.greedy)
            seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)")
        with gr.Row():
            temperature = gr.Slider(0.05, 2.0, value=0.7, label="Temperature")
            top_p = gr.Slider(0.05, 1.0, value=0.9, label="Top-p")
            top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k (0: off)")
            repetition_penalty = gr.Slider(0.8, 2.0, value=1.0, label="Repetition penalty")
        system_prompt = gr.Textbox(label="System prompt", value="")
        with gr.Row():
            answer_json = gr.Checkbox(label="Answer as JSON", value=False, elem_id="answer-json", scale=1)
            json_schema = gr.Textbox(label="JSON schema (optional: empty for any JSON object)", value="", lines=3,
                                     placeholder='{"type": "object", "properties": {"city": {"type": "string"}}}',
                                     scale=3, elem_id="json-schema")
    pending = gr.State("")
    sampling = [max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty, seed, system_prompt,
                answer_json, json_schema]

    @user_errors(ctx)
    def generate(message: str, history: list | None = None, max_new_tokens: int = 128, greedy: bool = True,
                 temperature: float = 0.7, top_p: float = 0.9, top_k: int = 50, repetition_penalty: float = 1.0,
                 seed: int = -1, system_prompt: str = "", answer_json: bool = False, json_schema: str = "",
                 request: gr.Request = None, profile: gr.OAuthProfile | None = None):
        """Streams the answer into the chat; the last update carries the metrics (or says it was stopped)."""
        ctx.admit(request, profile, Action.CHAT)
        text = str(message or "")
        if not text.strip():
            raise SpecError("message", text, "type a message first")
        limits.check_message(text)
        spec = generation_spec(ctx, max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty, seed,
                               system_prompt, answer_json, json_schema)
        conversation = conversation_of(history) + [{"role": "user", "content": text}]

        caller = ctx.caller(request, profile)
        job = ctx.worker.submit_chat(ChatRequest(conversation, spec, visitor=None if caller.is_owner else caller.key,
                                                 max_input_tokens=limits.max_input_tokens),
                                     "chat", session_of(request))  # first: an update below means it is queued
        shown = conversation + [{"role": "assistant", "content": "*waiting for the model…*"}]
        answer = ""
        try:
            yield shown, "Waiting for the model…"
            for event in job.follow():
                if isinstance(event, Chunk):
                    answer += event.value
                    shown_answer = as_code(answer, answer_json)
                    yield conversation + [{"role": "assistant", "content": shown_answer}], "Generating…"
                elif isinstance(event, Queued):
                    yield shown, jobs.waiting_text(event.ahead)
                else:
                    yield gr.skip(), gr.skip()  # a quiet poll: nothing new; keeps each step short
        except Exception:
            yield list(history or []), ""  # the chat as it was; the error itself shows as one message
            raise
        finally:
            job.cancel.set()  # a closed handler (a closed tab, a dropped client) stops the model too
        result = job.result
        if result is None:  # stopped before it joined the batch
            yield conversation + [{"role": "assistant", "content": "*stopped before the model started*"}], "Stopped."
            return
        if ctx.metrics is not None:
            ctx.metrics.answered(result, "ui")
        by = render.answered_by(result.model, result.precision)
        text = as_code(result.text, answer_json)
        final = conversation + [{"role": "assistant", "content": with_footer(text, by, result.cancelled)}]
        yield final, render.metrics(result, by)

    def stop_chat(request: gr.Request = None) -> None:
        """Stops this session's chat after its current token (and drops it if it is still waiting)."""
        ctx.worker.cancel(session_of(request) or "", "chat")

    def take_message(text: str):
        return "", text

    def last_exchange(history: list | None) -> tuple[list, str]:
        """The chat without its last exchange, and that exchange's user message."""
        conversation = list(history or [])
        while conversation and conversation[-1].get("role") == "assistant":
            conversation.pop()
        if not conversation:
            return [], ""
        return conversation[:-1], text_of(conversation[-1].get("content"))

    def undo_last(history: list | None):
        return last_exchange(history)[0]

    def retry_last(history, *rest, request: gr.Request = None, profile: gr.OAuthProfile | None = None):
        before, message = last_exchange(history)
        if not message:
            yield history or [], "Nothing to retry yet."
            return
        yield from generate(message, before, *rest, request=request, profile=profile)

    @user_errors(ctx)
    def set_fast_path(on: bool = False, request: gr.Request = None, profile: gr.OAuthProfile | None = None) -> str:
        ctx.admit(request, profile, Action.FAST_PATH)
        return jobs.run(ctx, lambda engine, job: fastpath.set_enabled(engine.current, bool(on)).summary(),
                        "fast path", request)

    api_send = gr.Button(visible=False)  # the API's /generate takes the message itself; the UI's Send goes via State
    api_send.click(generate, [message, chatbot, *sampling], [chatbot, status], api_name="generate",
                   concurrency_limit=None)
    for trigger in (send.click, message.submit):
        trigger(take_message, message, [message, pending], queue=False, api_visibility="private").then(
            generate, [pending, chatbot, *sampling], [chatbot, status], api_visibility="private",
            concurrency_limit=None, show_progress_on=[status])
    stop.click(stop_chat, None, None, api_name="stop", queue=False)
    retry.click(retry_last, [chatbot, *sampling], [chatbot, status], api_visibility="private",
                concurrency_limit=None, show_progress_on=[status])
    undo.click(undo_last, chatbot, chatbot, api_visibility="private", queue=False)
    clear.click(lambda: ([], ""), None, [chatbot, status], api_visibility="private", queue=False)
    fast_toggle.input(set_fast_path, fast_toggle, fast_out, api_name="set_fast_path", concurrency_limit=None,
                      show_progress_on=[fast_out]).success(
        lambda on: f"Fast path turned {'on' if on else 'off'}: the next answer's metrics show its effect.",
        fast_toggle, status, queue=False, api_visibility="private")
    return ChatTab(chatbot=chatbot, status=status, fast_toggle=fast_toggle,
                   sampling=[greedy, temperature, top_p, top_k, repetition_penalty], defaults_note=defaults_note)
