"""An OpenAI-compatible endpoint on the same model and queue as the UI: /v1/models, /v1/chat/completions,
/v1/completions.

Requests and responses have the shapes the `openai` client, vLLM and TGI use, so a collaborator's tool
moves between this app and those engines by changing the base URL. Each completion is a job on the
one model worker (core.worker), in line with the browser's chats: the two never run on the model at
the same time. A streamed answer is sent as server-sent events ending in `data: [DONE]`; a client
that disconnects cancels its job. Every response carries `usage` (prompt and completion tokens) and
the app's own `metrics` (time to first token, decode tokens/s), an extra field other clients ignore.

Access: off unless the app is started with `--api`; a bearer key (APP_API_KEY, compared in constant
time) is required whenever one is set, and the app refuses to start the API on a shared deployment
(a share link, a Space, a login) without one, so the API never opens a way around the UI's login.
Errors follow OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a fitting status.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from core import constrain, generation, tools
from core.errors import (EngineError, InputTooLongError, ModelNotFoundError, NoModelLoadedError, QueueFullError,
                         SpecError)
from core.serving.requests import ChatRequest, ChatResult, Finish, TokenLogprob
from core.spec import MAX_MODEL_CHARS, GenerationSpec, check_text, parse_number
from core.tools import ToolUse
from core.worker import Chunk, Job
from server.access import Action
from server.context import AppContext
from server.limits import LimitError, RateLimitError
from server.settings import is_loopback

_END = object()


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


_PARAMS = {"message": "messages", "history": "messages", "system_prompt": "messages",
           "max_new_tokens": "max_tokens"}  # the app's field names -> the request's


def from_engine(error: EngineError) -> ApiError:
    """The engine's user errors in OpenAI's shape, with the status that fits."""
    if isinstance(error, NoModelLoadedError):
        return ApiError(503, error.message, "server_error", code="model_not_loaded")
    if isinstance(error, ModelNotFoundError):
        return ApiError(404, error.message, param="model", code="model_not_found")
    if isinstance(error, (QueueFullError, RateLimitError)):
        return ApiError(429, error.message, "rate_limit_error", code="rate_limit_exceeded")
    if isinstance(error, InputTooLongError):
        return ApiError(400, error.message, param="messages", code="context_length_exceeded")
    field = error.field if isinstance(error, (SpecError, LimitError)) else None
    return ApiError(400, error.message, param=_PARAMS.get(field, field))


@dataclass(frozen=True)
class Completion:
    """One parsed request: what to generate, for which model, and how to answer."""

    model: str
    prompt: str | list[dict]
    spec: GenerationSpec
    stream: bool
    include_usage: bool
    tools: ToolUse | None = None  # the tools offered (chat only)




def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ApiError(400, "only text content is supported (a string, or a list of {'type': 'text'} parts)",
                   param="messages")


def parse(ctx: AppContext, body: Any, chat: bool, defaults: GenerationSpec) -> Completion:
    """A request body as a Completion, with every field checked (and every text bounded) before it is queued."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    limits = ctx.settings.limits
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: see GET /v1/models for the loaded model's id", param="model")
    if len(model) > MAX_MODEL_CHARS:
        raise ApiError(400, f"model is {len(model):,} characters long; no id is longer than {MAX_MODEL_CHARS}: see "
                            "GET /v1/models for the loaded model's id", param="model")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        prompt: str | list[dict] = [_message(message) for message in messages]
        limits.check_conversation(prompt, field="messages")
    else:
        raw = body.get("prompt")
        if isinstance(raw, list) and len(raw) == 1:
            raw = raw[0]
        if not isinstance(raw, str):
            raise ApiError(400, "prompt must be a string (one prompt per request)", param="prompt")
        limits.check_message(raw, field="prompt")
        prompt = raw
    parse_number("n", 1 if body.get("n") is None else body["n"], int, 1, 1)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = limits.max_new_tokens if max_tokens is None else parse_number("max_tokens", max_tokens, int, 1)
    limits.check_new_tokens(max_tokens, field="max_tokens")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of strings", param="stop")
    for text in stop:
        check_text("stop", text)
    temperature, top_p, seed = (None if body.get(name) is None else parse_number(name, body[name], kind, low, high)
                                for name, kind, low, high in (("temperature", float, 0.0, 2.0),
                                                              ("top_p", float, 0.0, 1.0),
                                                              ("seed", int, 0, generation.MAX_SEED)))
    sampling = {} if temperature is None else ({"greedy": True} if temperature == 0 else
                                               {"greedy": False, "temperature": temperature})
    if top_p is not None and top_p > 0:
        sampling["top_p"] = top_p
    structured, use = _structured(body, chat)
    spec = GenerationSpec(**{**defaults.__dict__, **sampling, "max_new_tokens": max_tokens, "seed": seed,
                             "stop": tuple(stop), "use_chat_template": chat, "system_prompt": None, **structured})
    generation.validate_generation(spec)  # here, not in the queue: the stop strings' count and lengths above all
    options = body.get("stream_options") or {}
    return Completion(model=model, prompt=prompt, spec=spec, stream=bool(body.get("stream")),
                      include_usage=bool(isinstance(options, dict) and options.get("include_usage")), tools=use)


def _message(message: Any) -> dict:
    """One chat message: text content, and for tools an assistant's `tool_calls` or a `tool` result with its
    `tool_call_id` (core.tools reads them into the prompt)."""
    roles = ("system", "user", "assistant", "tool")
    if not isinstance(message, dict) or message.get("role") not in roles:
        raise ApiError(400, "each message needs a role of system, user, assistant or tool", param="messages")
    role = message["role"]
    if role == "assistant" and message.get("tool_calls"):
        return {"role": role, "content": _text(message.get("content") or ""),
                "tool_calls": tools.parse_tool_calls(message["tool_calls"], "messages")}
    if role == "tool":
        if not isinstance(message.get("tool_call_id"), str):
            raise ApiError(400, "a tool message needs the tool_call_id of the call it answers", param="messages")
        return {"role": role, "content": _text(message.get("content")), "tool_call_id": message["tool_call_id"]}
    return {"role": role, "content": _text(message.get("content"))}


# OpenAI parameters the app does not implement, with the value that means "off" (sent by some clients as defaults).
UNSUPPORTED = {"echo": False, "best_of": 1, "suffix": None, "logit_bias": None, "presence_penalty": 0,
               "frequency_penalty": 0, "functions": None, "function_call": None, "prediction": None, "audio": None}


def _structured(body: dict, chat: bool) -> tuple[dict, ToolUse | None]:
    """What the collaborators' tools ask for (logprobs, response_format, tools) as GenerationSpec fields, and the
    tools offered; parameters the app does not implement are refused by name rather than ignored."""
    for name, off in UNSUPPORTED.items():
        if body.get(name) not in (off, None, "", {}, []):
            hint = " (use tools and tool_choice)" if name.startswith("function") else ""
            raise ApiError(400, f"{name} is not supported here{hint}; leave it out", param=name)
    use = _tool_use(body, chat)
    constraint = constrain.from_response_format(body.get("response_format"))
    if constraint is not None and use is not None and use.constraint is not None:
        raise ApiError(400, "response_format and a forced tool call (tool_choice) both decide the answer's shape; "
                            "use one of them", param="response_format")
    if use is not None and use.constraint is not None:
        constraint = use.constraint
    return {"logprobs": _logprobs(body, chat), "constraint": constraint,
            "tools": use.shown if use is not None else ()}, use


def _tool_use(body: dict, chat: bool) -> ToolUse | None:
    if not chat:
        for name in ("tools", "tool_choice"):
            if body.get(name) is not None:
                raise ApiError(400, f"{name} is for /v1/chat/completions", param=name)
        return None
    return tools.parse_tools(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives to report per token: None for none, 0 for the chosen token's only. Chat takes
    `logprobs: true` and `top_logprobs`; completions take `logprobs: N`."""
    name = "top_logprobs" if chat else "logprobs"
    top = None if body.get(name) is None else parse_number(name, body[name], int, 0, generation.MAX_TOP_LOGPROBS)
    if not chat:
        return top
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise ApiError(400, "logprobs must be true or false (top_logprobs sets how many alternatives)",
                       param="logprobs")
    if top is not None and not wanted:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return (top or 0) if wanted else None


def check_key(ctx: AppContext, request: Request) -> None:
    """The bearer key when one is set. Without one (a local app only: settings refuse a shared app without a key),
    a web page the owner visits could still reach this loopback API from the browser, so a keyless API answers only
    requests that name a loopback host, carry no other site's Origin, and send JSON (a page cannot send JSON to
    another site without the browser asking first)."""
    expected = ctx.settings.api_key
    if not expected:
        _check_same_site(request)
        return
    given = request.headers.get("authorization", "")
    token = given[7:].strip() if given.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise ApiError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")


def _check_same_site(request: Request) -> None:
    host = request.headers.get("host", "")
    if not is_loopback(urlsplit(f"//{host}").hostname or ""):
        raise ApiError(403, f"This API has no key, so it answers only on this machine's own address, not {host!r}. "
                            "Set APP_API_KEY to serve it under another name.", code="forbidden_host")
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != host:
        raise ApiError(403, f"Requests from the web page at {origin!r} are refused: this API has no key. Set "
                            "APP_API_KEY to call it from other sites.", code="forbidden_origin")
    if request.method == "POST" and request.headers.get("content-type", "").split(";")[0].strip().lower() \
            != "application/json":
        raise ApiError(415, "Send the body as JSON, with 'Content-Type: application/json'.", code="unsupported_media")


def _job(ctx: AppContext, completion: Completion, visitor: str | None) -> Job:
    """The completion as a chat request on the model worker: it joins the running batch with the UI's chats."""
    request = ChatRequest(completion.prompt, completion.spec, visitor=visitor,
                          max_input_tokens=ctx.settings.limits.max_input_tokens, model=completion.model)
    return ctx.worker.submit_chat(request, "api", session=f"api-{uuid.uuid4().hex}")


async def _events(job: Job, request: Request) -> AsyncIterator[object]:
    """The job's events without blocking the event loop. A client that has gone (checked at every poll, streamed
    or not) or a closed iterator (a broken stream) cancels the job at once, so nobody waits for it."""
    events = job.follow(poll=0.25)
    try:
        while (event := await anyio.to_thread.run_sync(next, events, _END)) is not _END:
            if await request.is_disconnected():
                break
            yield event
    finally:
        job.cancel.set()
        events.close()


def _usage(result: ChatResult) -> dict:
    metrics = result.metrics
    return {"prompt_tokens": metrics.prompt_tokens, "completion_tokens": metrics.new_tokens,
            "total_tokens": metrics.prompt_tokens + metrics.new_tokens}


def _metrics(result: ChatResult) -> dict:
    metrics = result.metrics
    return {"ttft_s": round(metrics.ttft_s, 4), "decode_tokens_per_s": round(metrics.decode_tokens_per_s, 2),
            "total_s": round(metrics.total_s, 4), "answered_together": result.together}


def _finish_reason(result: ChatResult, calls: int = 0) -> str:
    return "tool_calls" if calls else "length" if result.finish is Finish.LENGTH else "stop"


def _chat_logprobs(entries: tuple[TokenLogprob, ...]) -> dict:
    """OpenAI's chat shape: each token with its log-probability, its UTF-8 bytes and the most likely alternatives."""
    def item(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def _completion_logprobs(entries: tuple[TokenLogprob, ...], offset: int = 0) -> dict:
    """The completions shape: parallel lists, each alternative as {token: logprob}, offsets into the text."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}


def _call_json(index: int | None, call_id: str | None, name: str | None, arguments: str) -> dict:
    """A tool call as a message holds it (no index) or as a stream's delta carries it (no id or name after its
    first delta)."""
    function = {"arguments": arguments} if name is None else {"name": name, "arguments": arguments}
    head = {} if call_id is None else {"id": call_id, "type": "function"}
    return {**({} if index is None else {"index": index}), **head, "function": function}


def routes(ctx: AppContext) -> list:
    router = APIRouter(prefix="/v1")

    async def guarded(request: Request, handle) -> Any:
        try:
            check_key(ctx, request)
            response = await handle(ctx.admit(request, None, Action.CHAT))
        except ApiError as error:
            response = error.response()
        except EngineError as error:
            response = from_engine(error).response()
        if ctx.metrics is not None:
            ctx.metrics.request(request.url.path, getattr(response, "status_code", 200))
        return response

    @router.get("/models")
    async def models(request: Request):
        async def handle(_):
            snap = ctx.worker.snapshot
            if snap is None:
                return {"object": "list", "data": []}
            return {"object": "list", "data": [{
                "id": snap.model, "object": "model", "created": int(time.time()), "owned_by": "quantized-llm-app",
                "quantization": snap.spec.quant.mode, "dtype": snap.spec.dtype,
                "max_model_len": snap.context_window}]}
        return await guarded(request, handle)

    async def complete(request: Request, chat: bool):
        async def handle(caller):
            try:
                body = json.loads(await request.body() or b"null")
            except ValueError:
                raise ApiError(400, "The body is not valid JSON.") from None
            snap = ctx.worker.snapshot
            if snap is None:
                raise NoModelLoadedError("No model is loaded yet: the app's owner loads one in the Model tab.")
            completion = parse(ctx, body, chat, snap.defaults)
            job = _job(ctx, completion, None if caller.is_owner else caller.key)
            if completion.stream:
                return StreamingResponse(_stream(ctx, job, completion, chat, request), media_type="text/event-stream")
            return await _whole(ctx, job, completion, chat, request)
        return await guarded(request, handle)

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @router.post("/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    if ctx.metrics is None:
        return router.routes
    page = APIRouter()

    @page.get("/metrics")
    async def metrics(request: Request):
        """Prometheus' text format (server.metrics), behind the API's key when one is set."""
        try:
            check_key(ctx, request)
        except ApiError as error:
            return error.response()
        body, content_type = ctx.metrics.page(request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    return router.routes + page.routes


def _ids(chat: bool) -> tuple[str, str, int]:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", ("chat.completion" if chat else "text_completion"), \
        int(time.time())


def _observe(ctx: AppContext, result: ChatResult | None) -> None:
    if ctx.metrics is not None and result is not None:
        ctx.metrics.answered(result, "api")


async def _whole(ctx: AppContext, job: Job, completion: Completion, chat: bool, request: Request) -> dict:
    async for _ in _events(job, request):
        pass
    result = job.result
    _observe(ctx, result)
    if result is None or result.cancelled:
        raise ApiError(499, "The request was cancelled.", code="cancelled")
    ident, kind, created = _ids(chat)
    asked = completion.spec.logprobs is not None
    if chat:
        text, calls = tools.read_answer(result.text, completion.tools)
        message = {"role": "assistant", "content": text or (None if calls else "")}
        if calls:
            message["tool_calls"] = [_call_json(None, c.id, c.name, c.arguments) for c in calls]
        choice = {"index": 0, "message": message, "finish_reason": _finish_reason(result, len(calls)),
                  "logprobs": _chat_logprobs(result.logprobs) if asked else None}
    else:
        choice = {"index": 0, "text": result.text, "finish_reason": _finish_reason(result),
                  "logprobs": _completion_logprobs(result.logprobs) if asked else None}
    return {"id": ident, "object": kind, "created": created, "model": result.model, "choices": [choice],
            "usage": _usage(result), "metrics": _metrics(result)}


async def _stream(ctx: AppContext, job: Job, completion: Completion, chat: bool,
                  request: Request) -> AsyncIterator[str]:
    ident, kind, created = _ids(chat)
    kind += ".chunk" if chat else ""
    served = completion.model
    asked = completion.spec.logprobs is not None
    calls = tools.CallStream(completion.tools if chat else None)
    offset = 0  # characters of the completion's text before this chunk's tokens (its logprobs' text_offset)

    def envelope(choices: list, **extra) -> str:
        return "data: " + json.dumps({"id": ident, "object": kind, "created": created, "model": served,
                                      "choices": choices, **extra}) + "\n\n"

    def chunk(delta: tools.Delta | None, reason: str | None = None, logprobs: tuple = (), **extra) -> str:
        nonlocal offset
        if chat:
            choice = {"index": 0, "delta": _delta(delta), "finish_reason": reason}
            if asked:
                choice["logprobs"] = _chat_logprobs(logprobs) if logprobs else None
        else:
            choice = {"index": 0, "text": delta.text if delta else "", "finish_reason": reason,
                      "logprobs": _completion_logprobs(logprobs, offset) if asked and logprobs else None}
            offset += sum(len(entry.token) for entry in logprobs)
        return envelope([choice], **extra)

    try:
        if chat:
            yield envelope([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        async for event in _events(job, request):
            if isinstance(event, Chunk) and (event.value or event.logprobs):
                deltas = calls.feed(event.value) or [None]  # logprobs of held text go out on an empty delta
                for index, delta in enumerate(deltas):
                    yield chunk(delta, logprobs=event.logprobs if index == 0 else ())
        for delta in calls.finish():
            yield chunk(delta)
        result = job.result
        _observe(ctx, result)
        if result is None:
            return
        reason = _finish_reason(result, calls.calls)
        if completion.include_usage:  # OpenAI sends usage once, in a last chunk with no choices
            yield chunk(None, reason, metrics=_metrics(result))
            yield envelope([], usage=_usage(result))
        else:
            yield chunk(None, reason, usage=_usage(result), metrics=_metrics(result))
    except ApiError as error:
        yield "data: " + json.dumps(error.body()) + "\n\n"
    except EngineError as error:
        yield "data: " + json.dumps(from_engine(error).body()) + "\n\n"
    yield "data: [DONE]\n\n"


def _delta(delta: tools.Delta | None) -> dict:
    """A chat chunk's delta: text, or a tool call's head (id, name) or a piece of its arguments."""
    if isinstance(delta, tools.Text):
        return {"content": delta.text}
    if isinstance(delta, tools.CallHead):
        return {"tool_calls": [_call_json(delta.index, delta.id, delta.name, "")]}
    if isinstance(delta, tools.CallArguments):
        return {"tool_calls": [_call_json(delta.index, None, None, delta.text)]}
    return {}
