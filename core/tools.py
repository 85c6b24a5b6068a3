"""Tool calls: what the model is shown, the constraint that makes a forced call parse, and how its answer becomes
OpenAI's `tool_calls`.

- **Parsing** (`parse_tools`, `parse_tool_calls`): OpenAI's `tools`, `tool_choice`, `parallel_tool_calls` and an
  assistant message's `tool_calls`, checked, with SpecError naming the field.
- **The prompt** (`for_template`, called by core.generation when it applies the chat template): a model whose chat
  template renders tools gets them through `apply_chat_template(tools=...)`, and the conversation's calls and
  results in the shape transformers' templates read. Any other model gets the fallback: a system message listing
  the tools and asking for a call as `{"name": ..., "arguments": {...}}` (FALLBACK_PROMPT), earlier calls written
  in that shape and tool results as user messages. `tool_choice: "none"` shows no tools.
- **Forced calls** (`tool_choice` "required" or a named function): decoding is held to `{"name": ..., "arguments":
  {its parameters}}` (core.constrain), one call, so the call always parses and names a real function.
- **Reading the answer** (`read_answer`, and `CallStream` for a stream): a forced call is that JSON object; with
  "auto" the answer is a call when it is one of the shapes models are trained to write (`<tool_call>{...}</tool_call>`
  blocks as Qwen and Hermes write them, or a bare JSON object or list of them with `name` and `arguments` or
  `parameters`, as Llama 3 and the fallback do) naming a tool offered; anything else is text.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.constrain import JsonConstraint, compile_schema, short
from core.errors import SpecError

MAX_TOOLS = 64
MAX_TOOLS_CHARS = 32_000  # the tools' JSON, all together: it is read into the prompt
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
CHOICES = ("auto", "none", "required")

FALLBACK_PROMPT = """You can call these functions:
{tools}
To call a function, answer with only this JSON object and nothing else: {{"name": "<function name>", "arguments": \
{{<its arguments>}}}}. If no function fits, answer in plain text."""
# How results come back to a model without tool support. Measured on the embedded SmolLM2-135M: asked only
# "Result of get_weather: Sunny, 24 C" (or told to answer "in plain text"), it repeated its call; this wording
# made it answer "The weather in Paris is sunny, with a temperature of 24 degrees Celsius."
FALLBACK_RESULTS = "{results} Now answer my question in a sentence."


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)


@dataclass(frozen=True)
class ToolUse:
    """The tools a chat offers and how the model may use them."""

    tools: tuple[dict, ...]  # {"type": "function", "function": {"name", "description", "parameters"}}, checked
    choice: str  # "auto", "none", "required", or the name of the function it must call
    parallel: bool = True  # with "auto", whether an answer may hold several calls
    constraint: JsonConstraint | None = None  # for a forced call: its JSON

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(tool["function"]["name"] for tool in self.tools)

    @property
    def forced(self) -> bool:
        return self.choice not in ("auto", "none")

    @property
    def shown(self) -> tuple[dict, ...]:
        """The tools the model is shown: none with "none"."""
        return () if self.choice == "none" else self.tools


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ----------------------------------------------------------------------------- parsing requests


def parse_tools(tools: Any, choice: Any = None, parallel: Any = None) -> ToolUse | None:
    """OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`; None when no tools are offered."""
    if not tools:
        if choice not in (None, "auto", "none"):
            raise SpecError("tool_choice", short(choice), "it names a tool, but the request offers no tools")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise SpecError("tools", short(tools), f"give a list of up to {MAX_TOOLS} tools, each {{\"type\": "
                                                "\"function\", \"function\": {\"name\", \"description\", "
                                                "\"parameters\"}}")
    if len(json.dumps(tools, ensure_ascii=False, default=str)) > MAX_TOOLS_CHARS:
        raise SpecError("tools", f"{len(tools)} tools", f"their JSON is over {MAX_TOOLS_CHARS:,} characters")
    checked = tuple(_tool(tool, index) for index, tool in enumerate(tools))
    names = [tool["function"]["name"] for tool in checked]
    if len(set(names)) != len(names):
        raise SpecError("tools", names, "each function needs its own name")
    if parallel is not None and not isinstance(parallel, bool):
        raise SpecError("parallel_tool_calls", short(parallel), "use true or false")
    mode = _choice(choice, names)
    use = ToolUse(tools=checked, choice=mode, parallel=parallel is not False)
    if use.forced:
        offered = [tool for tool in checked if mode in ("required", tool["function"]["name"])]
        schemas = [_call_schema(tool["function"]) for tool in offered]
        schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        use = ToolUse(tools=checked, choice=mode, parallel=False, constraint=compile_schema(schema, "tools"))
    return use


def _tool(tool: Any, index: int) -> dict:
    field = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
            or not isinstance(tool.get("function"), dict):
        raise SpecError(field, short(tool), "a tool is {\"type\": \"function\", \"function\": {\"name\": ..., "
                                             "\"description\": ..., \"parameters\": {...}}}")
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(f"{field}.function.name", short(name), "use 1 to 64 letters, digits, '_' or '-'")
    description = function.get("description", "")
    if not isinstance(description, str):
        raise SpecError(f"{field}.function.description", short(description), "use text")
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise SpecError(f"{field}.function.parameters", short(parameters), "use a JSON schema object")
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def _choice(choice: Any, names: Sequence[str]) -> str:
    if choice is None:
        return "auto"
    if isinstance(choice, str) and choice in CHOICES:
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) \
        and isinstance(choice.get("function"), dict) else None
    if name is None:
        raise SpecError("tool_choice", short(choice), "use \"auto\", \"none\", \"required\" or {\"type\": "
                                                       "\"function\", \"function\": {\"name\": ...}}")
    if name not in names:
        raise SpecError("tool_choice", short(name), f"name one of the tools offered: {', '.join(names)}")
    return name


def _call_schema(function: dict) -> dict:
    """The JSON of one call: the function's name, then its arguments (properties come out in this order, so a stream
    can send the name before the arguments)."""
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": function["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}


def parse_tool_calls(calls: Any, field: str) -> tuple[dict, ...]:
    """An assistant message's `tool_calls` sent back: ({"id", "name", "arguments"}, ...)."""
    if not isinstance(calls, list) or not calls:
        raise SpecError(field, short(calls), "give a list of {\"id\", \"type\": \"function\", \"function\": "
                                              "{\"name\", \"arguments\"}}")
    parsed = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(function.get("arguments", ""), str) or not isinstance(call.get("id", ""), str):
            raise SpecError(field, short(call), "each call is {\"id\": ..., \"type\": \"function\", \"function\": "
                                                 "{\"name\": ..., \"arguments\": \"<JSON text>\"}}")
        parsed.append({"id": call.get("id") or new_call_id(), "name": function["name"],
                       "arguments": function.get("arguments") or "{}"})
    return tuple(parsed)


# ----------------------------------------------------------------------------- the prompt


def has_tool_turns(messages: Sequence[dict]) -> bool:
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def for_template(tokenizer, messages: Sequence[dict], tools: Sequence[dict]) -> tuple[list[dict], dict]:
    """The conversation as the chat template should read it, and the extra arguments for `apply_chat_template`:
    the template's own tool support when it has one (`tokenizer` given and `renders_tools`), else the fallback."""
    if tokenizer is not None and renders_tools(tokenizer):
        names = _call_names(messages)
        return [_template_turn(m, names) for m in messages], ({"tools": list(tools)} if tools else {})
    return fallback(messages, tools), {}


_renders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_renders_lock = threading.Lock()
_PROBE = {"type": "function", "function": {"name": "probe_tool_4f1c", "description": "probe",
                                           "parameters": {"type": "object", "properties": {}}}}


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template writes the tools it is given into the prompt (checked once)."""
    with _renders_lock:
        known = _renders.get(tokenizer)
        if known is None:
            try:
                text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[_PROBE],
                                                     add_generation_prompt=True, tokenize=False)
                known = _PROBE["function"]["name"] in text
            except Exception:  # a template that fails on tools has no tool support worth using
                known = False
            _renders[tokenizer] = known
        return known


def _call_names(messages: Sequence[dict]) -> dict[str, str]:
    return {call["id"]: call["name"] for m in messages for call in m.get("tool_calls") or ()}


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _template_turn(message: dict, names: dict[str, str]) -> dict:
    """A turn in the shape transformers' chat templates read (arguments as objects; a result with its tool's name)."""
    if message.get("tool_calls"):
        return {"role": "assistant", "content": message.get("content") or "",
                "tool_calls": [{"id": c["id"], "type": "function",
                                "function": {"name": c["name"], "arguments": _arguments(c["arguments"])}}
                               for c in message["tool_calls"]]}
    if message.get("role") == "tool":
        return {"role": "tool", "content": message["content"], "tool_call_id": message.get("tool_call_id", ""),
                "name": names.get(message.get("tool_call_id", ""), "")}
    return message


def fallback(messages: Sequence[dict], tools: Sequence[dict]) -> list[dict]:
    """The conversation for a template without tool support: the tools in a system message (FALLBACK_PROMPT),
    earlier calls as the JSON the model is asked to write, one turn's tool results as one user message that asks
    for the answer (FALLBACK_RESULTS)."""
    names = _call_names(messages)
    turns: list[dict] = []
    for message in messages:
        if message.get("tool_calls"):
            calls = "\n".join(json.dumps({"name": c["name"], "arguments": _arguments(c["arguments"])},
                                         ensure_ascii=False) for c in message["tool_calls"])
            text = f"{message['content']}\n{calls}" if message.get("content") else calls
            turns.append({"role": "assistant", "content": text})
        elif message.get("role") == "tool":
            result = (names.get(message.get("tool_call_id", ""), "the function"), message["content"].rstrip(". "))
            if turns and "results" in turns[-1]:
                turns[-1]["results"].append(result)
            else:
                turns.append({"role": "user", "results": [result]})
        else:
            turns.append({"role": message["role"], "content": message.get("content") or ""})
    turns = [{"role": t["role"], "content": t["content"] if "results" not in t else FALLBACK_RESULTS.format(
        results=" ".join(f"Here is the result of {name}: {content}." for name, content in t["results"]))}
        for t in turns]
    if tools:
        listed = "\n".join(json.dumps({k: t["function"][k] for k in ("name", "description", "parameters")},
                                      ensure_ascii=False) for t in tools)
        prompt = FALLBACK_PROMPT.format(tools=listed)
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{prompt}"}
        else:
            turns.insert(0, {"role": "system", "content": prompt})
    return turns


# ----------------------------------------------------------------------------- reading the answer

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def read_answer(text: str, use: ToolUse | None) -> tuple[str, tuple[ToolCall, ...]]:
    """The answer's text and the calls it makes (none when it makes none, or no tools were shown)."""
    if use is None or not use.shown:
        return text, ()
    calls, rest = _blocks(text, use)
    if not calls:
        calls, rest = _bare(text, use), ""
    if not calls:
        return text, ()
    return rest, calls if use.parallel else calls[:1]


def _blocks(text: str, use: ToolUse) -> tuple[tuple[ToolCall, ...], str]:
    found = _BLOCK.findall(text)
    calls = [_call(_load(block), use) for block in found]
    if not found or None in calls:
        return (), text
    return tuple(calls), _BLOCK.sub("", text).strip()


def _bare(text: str, use: ToolUse) -> tuple[ToolCall, ...]:
    body = text.strip()
    fenced = _FENCE.match(body)
    value = _load(fenced.group(1) if fenced else body)
    items = value if isinstance(value, list) else [value]
    calls = [_call(item, use) for item in items]
    return tuple(calls) if calls and None not in calls else ()


def _load(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(item: Any, use: ToolUse) -> ToolCall | None:
    if not isinstance(item, dict) or item.get("name") not in use.names:
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _load(arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(new_call_id(), item["name"], json.dumps(arguments, ensure_ascii=False))


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class CallHead:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    text: str


Delta = Text | CallHead | CallArguments
_HEAD = re.compile(r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_TAG = "<tool_call>"
_CALL_STARTS = ("{", "[", "```", _TAG)


class CallStream:
    """A streamed answer as OpenAI streams it: text deltas, or a call's head (id and name) and then its arguments.

    A forced call's arguments go out as they are decoded (all but a trailing run of spaces and closing braces, which
    may be the call's own end). With "auto", an answer that starts the way a call does, or the part of it from a
    `<tool_call>` tag on, is held until the answer ends and then read by `read_answer`; other text streams at once
    (but for a piece that may be the start of a tag)."""

    def __init__(self, use: ToolUse | None) -> None:
        self.use = use
        self.mode = "plain" if use is None or not use.shown else ("forced" if use.forced else "undecided")
        self.buffer = ""
        self.sent = 0  # characters of the forced call's arguments sent
        self.calls = 0

    def feed(self, text: str) -> list[Delta]:
        if self.mode == "plain":
            return [Text(text)] if text else []
        self.buffer += text
        if self.mode == "forced":
            return self._forced(final=False)
        if self.mode == "undecided":
            head = self.buffer.lstrip()
            if any(head.startswith(s) for s in _CALL_STARTS):
                self.mode = "held"
            elif not head or any(s.startswith(head) for s in _CALL_STARTS):
                return []
            else:
                self.mode = "text"
        return self._text() if self.mode == "text" else []

    def _text(self) -> list[Delta]:
        start = self.buffer.find(_TAG)
        if start >= 0:
            shown, self.buffer, self.mode = self.buffer[:start], self.buffer[start:], "held"
        else:
            keep = next((k for k in range(min(len(_TAG) - 1, len(self.buffer)), 0, -1)
                         if self.buffer.endswith(_TAG[:k])), 0)
            cut = len(self.buffer) - keep
            shown, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return [Text(shown)] if shown else []

    def finish(self) -> list[Delta]:
        if self.mode == "forced":
            return self._forced(final=True)
        if self.mode != "held":
            rest, self.buffer = self.buffer, ""
            return [Text(rest)] if rest else []
        text, calls = read_answer(self.buffer, self.use)
        deltas: list[Delta] = [Text(text)] if text else []
        for index, call in enumerate(calls):
            deltas += [CallHead(index, call.id, call.name), CallArguments(index, call.arguments)]
        self.calls = len(calls)
        return deltas

    def _forced(self, final: bool) -> list[Delta]:
        head = _HEAD.match(self.buffer)
        if head is None:
            return [Text(self.buffer)] if final and self.buffer else []  # cut before the name (max_tokens)
        deltas: list[Delta] = []
        if not self.calls:
            self.calls = 1
            deltas.append(CallHead(0, new_call_id(), json.loads(f'"{head.group(1)}"')))
        arguments = self.buffer[head.end():]
        if final:
            end = arguments.rstrip()
            arguments = end[:-1].rstrip() if end.endswith("}") else end  # the call object's own closing brace
        else:
            arguments = arguments[:len(arguments) - len(re.search(r"[\s}]*$", arguments).group(0))]
        if len(arguments) > self.sent:
            deltas.append(CallArguments(0, arguments[self.sent:]))
            self.sent = len(arguments)
        return deltas
