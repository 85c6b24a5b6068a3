"""The Generate tab: a streaming chat with Stop, Retry, Undo and editing, sampling controls, the fast-path toggle,
and past conversations kept in the visitor's browser (ui.conversations).

A chat is a request to the model worker (`ChatRequest` -> `Worker.submit_chat`), answered together with other
visitors' chats; `answer` follows its events and yields the growing answer. No lock is held across a `yield`:
Gradio may run each step on another thread and close the handler from any of them. Stop cancels this session's
chat through the worker, so the model stops after its current token and the handler ends normally, showing the
partial answer marked as stopped. A closed tab closes the handler, whose `finally` cancels the request the same way.
Every answer keeps a label naming the model and quantization that wrote it; the model never sees those labels.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr

from core import constrain, fastpath, generation
from core.errors import SpecError
from core.serving.requests import ChatRequest
from core.spec import GenerationSpec, parse_number
from core.worker import Chunk, Queued
from server.access import Action
from server.context import AppContext, session_of
from ui import conversations, jobs, render
from ui.conversations import text_of
from ui.handlers import handler

log = logging.getLogger(__name__)
_FOOTER = re.compile(r"\n\n\*(?:stopped · )?answered by [^\n]*\*\s*$")
ROLES = ("user", "assistant", "system")
WAITING = "*waiting for the model…*"


@dataclass
class ChatTab:
    chatbot: gr.Chatbot
    status: gr.Markdown
    fast_toggle: gr.Checkbox
    fast_note: gr.Markdown
    sampling: list  # greedy, temperature, top_p, top_k, repetition_penalty (what a load resets)
    defaults_note: gr.Markdown
    saved: gr.BrowserState
    current: gr.State  # which saved conversation is open (None: a new one)
    restored: gr.State  # whether the stored conversations have been shown since the page opened
    conversation_list: gr.Radio


def conversation_of(history) -> list[dict]:
    """The chat as the model should see it: roles and plain text, without the app's 'answered by' labels."""
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
    new_tokens = parse_number("max_new_tokens", max_new_tokens, int)
    ctx.settings.limits.check_new_tokens(new_tokens)
    seed_value = None if seed in (None, "") else parse_number("seed", seed, int)
    return GenerationSpec(max_new_tokens=new_tokens, greedy=bool(greedy),
                          temperature=parse_number("temperature", temperature), top_p=parse_number("top_p", top_p),
                          top_k=parse_number("top_k", top_k, int),
                          repetition_penalty=parse_number("repetition_penalty", repetition_penalty),
                          seed=None if seed_value == -1 else seed_value,
                          system_prompt=str(system_prompt or "").strip() or None,
                          constraint=constrain.json_answer(bool(answer_json), json_schema))


def as_code(text: str, answer_json: bool) -> str:
    """A JSON answer shows as a code block, fenced by more backticks than any run inside it (a string may hold some)."""
    if not answer_json:
        return text
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{fence}json\n{text}\n{fence}"


# ----------------------------------------------------------------------------- a chat request, from the page


def generate(ctx: AppContext, message: str, history: list | None = None, max_new_tokens: int = 128,
             greedy: bool = True, temperature: float = 0.7, top_p: float = 0.9, top_k: int = 50,
             repetition_penalty: float = 1.0, seed: int = -1, system_prompt: str = "", answer_json: bool = False,
             json_schema: str = "", request: gr.Request = None, profile: gr.OAuthProfile | None = None):
    """Streams the answer into the chat; the last update carries the metrics (or says it was stopped)."""
    ctx.admit(request, profile, Action.CHAT)
    text = str(message or "")
    if not text.strip():
        raise SpecError("message", text, "type a message first")
    ctx.settings.limits.check_message(text)
    ctx.settings.limits.check_conversation(conversation_of(history) + [{"role": "user", "content": text}],
                                           str(system_prompt or ""))
    spec = generation_spec(ctx, max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty, seed,
                           system_prompt, answer_json, json_schema)
    yield from answer(ctx, text, list(history or []), spec, request, profile, bool(answer_json))


def answer(ctx: AppContext, text: str, history: list, spec: GenerationSpec, request: gr.Request | None,
           profile: gr.OAuthProfile | None, answer_json: bool = False) -> Iterator[tuple]:
    """One chat request's life as the page sees it: submitted to the worker, followed, shown with its author.

    `history` is the chat as shown (earlier answers keep their labels); the model gets it without them."""
    conversation = conversation_of(history) + [{"role": "user", "content": text}]
    caller = ctx.caller(request, profile)
    limits = ctx.settings.limits
    job = ctx.worker.submit_chat(ChatRequest(conversation, spec, visitor=None if caller.is_owner else caller.key,
                                             max_input_tokens=limits.max_input_tokens),
                                 "chat", session_of(request))  # first: an update below means it is queued
    asked = history + [{"role": "user", "content": text}]
    waiting = asked + [{"role": "assistant", "content": WAITING}]
    so_far = ""
    watch = jobs.UnreadWatch(request)
    try:
        yield waiting, "Waiting for the model…"
        for event in job.follow():
            if watch.unread():  # a call whose results nobody reads: gone, like a closed tab
                job.cancel.set()
            if isinstance(event, Chunk):
                so_far += event.value
                yield asked + [{"role": "assistant", "content": as_code(so_far, answer_json)}], "Generating…"
            elif isinstance(event, Queued):
                yield waiting, jobs.waiting_text(event.ahead)
            else:
                yield gr.skip(), gr.skip()  # a quiet poll: nothing new; keeps each step short
    except GeneratorExit:  # Gradio closes the handler when the tab is closed or the client hangs up
        log.info("chat %s: its page or client went away; the answer stops after the current token", job.id)
        raise
    except Exception:
        yield history, ""  # the chat as it was; the error itself shows as one message
        raise
    finally:
        job.cancel.set()  # a closed handler (a closed tab, a dropped client) stops the model too
    result = job.result
    if result is None:  # stopped before it joined the batch
        yield asked + [{"role": "assistant", "content": "*stopped before the model started*"}], "Stopped."
        return
    if ctx.metrics is not None:
        ctx.metrics.answered(result, "ui")
    by = render.answered_by(result.model, result.precision)
    shown = with_footer(as_code(result.text, answer_json), by, result.cancelled)
    yield asked + [{"role": "assistant", "content": shown}], render.metrics(result, by)


def split_last(history: list | None) -> tuple[list, str]:
    """The chat without its last exchange, and that exchange's user message ('' when there is none)."""
    conversation = list(history or [])
    while conversation and conversation[-1].get("role") == "assistant":
        conversation.pop()
    if not conversation:
        return [], ""
    return conversation[:-1], text_of(conversation[-1].get("content"))


def retry_last(ctx: AppContext, history: list | None, request: gr.Request, profile: gr.OAuthProfile | None,
               *sampling):
    """Answers the last message again, in place of its answer."""
    before, message = split_last(history)
    if not message:
        yield list(history or []), "Nothing to retry yet: send a message first."
        return
    yield from generate(ctx, message, before, *sampling, request=request, profile=profile)


def edit_message(ctx: AppContext, history: list | None, edit: gr.EditData, request: gr.Request,
                 profile: gr.OAuthProfile | None, *sampling):
    """A user message edited in place: the chat up to it, then the edited message answered anew."""
    index = edit.index[0] if isinstance(edit.index, (list, tuple)) else edit.index
    yield from generate(ctx, text_of(edit.value), list(history or [])[:index], *sampling, request=request,
                        profile=profile)


def undo_last(history: list | None):
    """Drops the last exchange, and the status line that described its answer."""
    before, message = split_last(history)
    if not message:
        return list(history or []), "Nothing to undo yet."
    return before, "Removed the last exchange."


def stop_chat(ctx: AppContext, request: gr.Request = None) -> None:
    """Stops this session's chat after its current token (and drops it if it is still waiting)."""
    ctx.worker.cancel(session_of(request) or "", "chat")


def set_fast_path(ctx: AppContext, on: bool = False, request: gr.Request = None,
                  profile: gr.OAuthProfile | None = None) -> str:
    ctx.admit(request, profile, Action.FAST_PATH)
    return jobs.run(ctx, lambda engine, job: fastpath.set_enabled(engine.current, bool(on)).summary(),
                    "fast path", request)


def take_message(text: str):
    return "", text


# ----------------------------------------------------------------------------- the tab


def build(ctx: AppContext) -> ChatTab:
    limits = ctx.settings.limits
    saved, current, restored = conversations.storage(), gr.State(None), gr.State(False)
    with gr.Accordion("Conversations", open=False, elem_id="conversations"):
        conversation_list = gr.Radio([], label="Conversations (0)", type="value", elem_id="conversation-list",
                                     show_label=False)
        delete_chat = gr.Button("Delete this chat", size="sm")
    chatbot = gr.Chatbot(show_label=False, height=380, elem_id="chat", editable="user", buttons=["copy", "copy_all"],
                         placeholder="Ask something: the answer streams in, with the model that wrote it.")
    with gr.Row():
        message = gr.Textbox(label="Message", placeholder="What is the capital of France?", scale=4, min_width=200)
        send = gr.Button("Send", variant="primary", scale=1, min_width=70)
        stop = gr.Button("Stop", scale=1, min_width=70)
    with gr.Row():
        retry = gr.Button("Retry", size="sm", min_width=70)
        undo = gr.Button("Undo", size="sm", min_width=70)
        new_chat = gr.Button("New chat", size="sm", min_width=70)
    status = gr.Markdown(elem_id="chat-status")
    with gr.Row():
        fast_toggle = gr.Checkbox(label="Fast path", value=False, elem_id="fast-toggle", scale=0, min_width=120)
        fast_note = gr.Markdown(elem_id="fast-note")
    with gr.Accordion("Sampling", open=False):
        defaults_note = gr.Markdown("Sampling defaults: taken from the loaded model's generation config.")
        with gr.Row():
            max_new_tokens = gr.Slider(1, limits.max_new_tokens, value=min(128, limits.max_new_tokens), step=1,
                                       label=f"Max new tokens (at most {limits.max_new_tokens})",
                                       elem_id="max-new-tokens", min_width=200)
            greedy = gr.Checkbox(label="Greedy", value=generation.CONSERVATIVE.greedy, min_width=100)
            seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", min_width=120)
        with gr.Row():
            temperature = gr.Slider(0.05, 2.0, value=0.7, label="Temperature", min_width=160)
            top_p = gr.Slider(0.05, 1.0, value=0.9, label="Top-p", min_width=160)
            top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k (0: off)", min_width=160)
            repetition_penalty = gr.Slider(0.8, 2.0, value=1.0, label="Repetition penalty", min_width=160)
        system_prompt = gr.Textbox(label="System prompt", value="")
        with gr.Row():
            answer_json = gr.Checkbox(label="Answer as JSON", value=False, elem_id="answer-json", scale=1)
            json_schema = gr.Textbox(label="JSON schema (optional: empty for any JSON object)", value="", lines=3,
                                     placeholder='{"type": "object", "properties": {"city": {"type": "string"}}}',
                                     scale=3, elem_id="json-schema")
    pending = gr.State("")
    sampling = [max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty, seed, system_prompt,
                answer_json, json_schema]
    tab = ChatTab(chatbot=chatbot, status=status, fast_toggle=fast_toggle, fast_note=fast_note,
                  sampling=[greedy, temperature, top_p, top_k, repetition_penalty], defaults_note=defaults_note,
                  saved=saved, current=current, restored=restored, conversation_list=conversation_list)

    answering = dict(outputs=[chatbot, status], api_visibility="private", concurrency_limit=None,
                     show_progress_on=[status])
    api_send = gr.Button(visible=False)  # the API's /generate takes the message itself; the UI's Send goes via State
    # The API's history is plain JSON, checked by conversation_of: the Chatbot's own schema would refuse the README's
    # {"role", "content": "text"} messages with a raw validation error, and parse a huge history before any limit.
    api_history = gr.JSON(visible=False)
    api_send.click(handler(ctx, generate), [message, api_history, *sampling], [chatbot, status], api_name="generate",
                   concurrency_limit=None)
    for trigger in (send.click, message.submit):
        remember_after(tab, trigger(take_message, message, [message, pending], queue=False,
                                    api_visibility="private").then(handler(ctx, generate),
                                                                   [pending, chatbot, *sampling], **answering))
    remember_after(tab, retry.click(handler(ctx, retry_last), [chatbot, *sampling], **answering))
    remember_after(tab, chatbot.edit(handler(ctx, edit_message), [chatbot, *sampling], **answering))
    remember_after(tab, undo.click(undo_last, chatbot, [chatbot, status], api_visibility="private", queue=False))
    stop.click(handler(ctx, stop_chat), None, None, api_name="stop", queue=False)

    for starts_afresh in (new_chat.click, chatbot.clear):  # the chat's own trash button starts a new one too
        starts_afresh(conversations.new_chat, saved, [chatbot, current, status, conversation_list], queue=False,
                      api_visibility="private")
    delete_chat.click(conversations.delete, [saved, current], [saved, chatbot, current, status, conversation_list],
                      queue=False, api_visibility="private")
    conversation_list.input(conversations.open_one, [conversation_list, saved], [chatbot, current, status],
                            queue=False, api_visibility="private")
    gr.on([saved.change], conversations.restore, [saved, chatbot, current, restored],
          [chatbot, current, conversation_list, restored], queue=False, api_visibility="private")
    return tab


def remember_after(tab: ChatTab, event) -> None:
    """Once an answer (or an undo) has ended, the conversation is stored in the visitor's browser."""
    event.then(conversations.remember, [tab.chatbot, tab.saved, tab.current],
               [tab.saved, tab.current, tab.conversation_list], queue=False, api_visibility="private")
