"""core.constrain and core.tools without a model: schemas compiled or refused by name, the grammar's mask on the
embedded tokenizer, the prompt with and without a template's tool support, and answers read back into calls (whole
and streamed). The same features against a real app and the real `openai` client are in tests/test_openai.py."""

from __future__ import annotations

import json

import pytest
import torch

from core import constrain, tools
from core.errors import SpecError

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def test_schemas_the_library_cannot_enforce_are_refused_naming_the_construct():
    for schema, construct in (({"type": "array", "uniqueItems": True}, "uniqueItems"),
                              ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, '"not"'),
                              ({"type": "strnig"}, "strnig"), ({"$ref": "#/$defs/gone"}, "/$defs/gone"),
                              ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf")):
        with pytest.raises(SpecError, match="could not be held to this schema") as refused:
            constrain.from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        assert construct in refused.value.message and refused.value.field == "response_format.json_schema.schema"
    for bad in ({"type": "yaml"}, "json", {"type": "json_schema"}):
        with pytest.raises(SpecError) as refused:
            constrain.from_response_format(bad)
        assert refused.value.field.startswith("response_format")
    assert constrain.from_response_format({"type": "text"}) is None and constrain.json_answer(False, "x") is None
    with pytest.raises(SpecError, match="not valid JSON"):
        constrain.json_answer(True, "{type: object}")


def test_the_mask_allows_only_what_continues_the_schema_and_the_end_only_when_complete(tokenizer):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    matcher = constrain.compile_schema(schema, "schema").matcher(tokenizer)
    eos = tokenizer.eos_token_id
    scores = torch.zeros(len(tokenizer) + 64)  # a model may pad its vocabulary beyond the tokenizer's
    first = matcher.mask(scores)
    assert first.shape == scores.shape and not torch.isinf(scores).any()  # the input is not changed
    allowed = {tokenizer.decode([i]) for i in (first == 0).nonzero().flatten().tolist()}
    assert allowed and all("{".startswith(t) or t.startswith("{") for t in allowed)
    assert torch.isinf(first[len(tokenizer):]).all() and torch.isinf(first[eos])
    for token in tokenizer.encode('{"n": 12', add_special_tokens=False):
        assert not torch.isinf(matcher.mask(scores)[token])
        matcher.accept(token)
    assert torch.isinf(matcher.mask(scores)[eos]) and not matcher.is_terminated()  # "}" still missing
    for token in tokenizer.encode("}", add_special_tokens=False):
        matcher.accept(token)
    assert matcher.is_terminated() and not torch.isinf(matcher.mask(scores)[eos])
    assert constrain.tokenizer_index(tokenizer) is constrain.tokenizer_index(tokenizer)  # built once
    any_object = constrain.from_response_format({"type": "json_object"}).matcher(tokenizer)
    for token in tokenizer.encode('{"a": [1, "x"]}', add_special_tokens=False):
        assert not torch.isinf(any_object.mask(scores)[token])
        any_object.accept(token)
    assert any_object.is_terminated()


def test_tools_and_tool_choice_are_checked_and_a_forced_call_is_constrained():
    use = tools.parse_tools([WEATHER, TIME], "required")
    assert use.forced and use.constraint is not None and not use.parallel and use.names == ("get_weather", "get_time")
    named = tools.parse_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    assert named.choice == "get_time" and '"get_time"' in named.constraint.schema
    assert '"get_weather"' not in named.constraint.schema
    assert tools.parse_tools([WEATHER], "none").shown == () and tools.parse_tools([WEATHER]).choice == "auto"
    assert tools.parse_tools(None) is None
    for raw, choice, field in (([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
                               ([WEATHER], "sometimes", "tool_choice"), (None, "required", "tool_choice"),
                               ([{"type": "function", "function": {"name": "bad name"}}], None,
                                "tools[0].function.name"),
                               ([WEATHER, WEATHER], None, "tools"), ([{"type": "retrieval"}], None, "tools[0]"),
                               ([{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}],
                                "required", "tools")):
        with pytest.raises(SpecError) as refused:
            tools.parse_tools(raw, choice)
        assert refused.value.field == field


def test_the_prompt_uses_the_templates_tool_support_or_the_fallback(tokenizer):
    conversation = [{"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": "", "tool_calls": (
                        {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},)},
                    {"role": "tool", "content": "Sunny", "tool_call_id": "call_1"}]
    assert not tools.renders_tools(tokenizer)  # SmolLM2's template ignores tools
    turns, extra = tools.for_template(tokenizer, conversation, [WEATHER])
    assert extra == {} and turns[0]["role"] == "system" and '"name": "get_weather"' in turns[0]["content"]
    assert turns[2] == {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'}
    assert turns[3] == {"role": "user", "content": "Here is the result of get_weather: Sunny. Now answer my "
                                                   "question in a sentence."}
    two = tools.fallback(conversation + [{"role": "tool", "content": "Windy.", "tool_call_id": "call_9"}], [])
    assert len(two) == 3 and two[2]["content"].startswith("Here is the result of get_weather: Sunny. Here is the "
                                                          "result of the function: Windy. Now")

    aware = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    aware.chat_template = ("{% for t in tools or [] %}TOOL {{ t.function.name }}\n{% endfor %}"
                           "{% for m in messages %}{{ m.role }}: {{ m.content }}"
                           "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }}"
                           "{% endfor %}{% if m.name %} FROM {{ m.name }}{% endif %}\n{% endfor %}")
    assert tools.renders_tools(aware)
    turns, extra = tools.for_template(aware, conversation, [WEATHER])
    text = aware.apply_chat_template(turns, tokenize=False, **extra)
    assert "TOOL get_weather" in text and "CALL get_weather Paris" in text and "tool: Sunny FROM get_weather" in text


def test_answers_are_read_into_calls_whole_and_streamed():
    use = tools.parse_tools([WEATHER, TIME])
    qwen = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    text, calls = tools.read_answer(qwen, use)
    assert text == "Let me check." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})]
    llama = '[{"name": "get_weather", "parameters": {"city": "Lyon"}}, {"name": "get_time", "arguments": {}}]'
    assert [c.name for c in tools.read_answer(llama, use)[1]] == ["get_weather", "get_time"]
    single = tools.parse_tools([WEATHER, TIME], parallel=False)
    assert len(tools.read_answer(llama, single)[1]) == 1
    for plain in ('{"name": "launch_rockets", "arguments": {}}', "Paris is sunny.", '{"city": "Paris"}'):
        assert tools.read_answer(plain, use) == (plain, ())
    assert tools.read_answer(qwen, tools.parse_tools([WEATHER], "none")) == (qwen, ())

    forced = tools.parse_tools([WEATHER], "required")
    stream = tools.CallStream(forced)
    pieces = ['{"name": "get_', 'weather", "argu', 'ments": {"ci', 'ty": "Par', 'is"}', "}"]
    deltas = [d for piece in pieces for d in stream.feed(piece)] + stream.finish()
    assert isinstance(deltas[0], tools.CallHead) and deltas[0].name == "get_weather" and stream.calls == 1
    arguments = "".join(d.text for d in deltas[1:])
    assert json.loads(arguments) == {"city": "Paris"} and len(deltas) > 3  # sent in pieces as decoded

    text_first = tools.CallStream(use)
    assert text_first.feed("  ") == [] and text_first.feed("Sunny") == [tools.Text("  Sunny")]
    assert text_first.finish() == []
    later = tools.CallStream(use)
    streamed = [d for piece in ("Let me ", "check.\n<tool", "_call>\n{", qwen[qwen.index('"name'):]) for d in
                later.feed(piece)] + later.finish()
    assert streamed[:2] == [tools.Text("Let me "), tools.Text("check.\n")] and later.calls == 1
    assert [type(d) for d in streamed[2:]] == [tools.CallHead, tools.CallArguments]
    held = tools.CallStream(use)
    assert held.feed("<tool_") == [] and held.feed(qwen[len("Let me check.\n") + 6:]) == []
    finished = held.finish()
    assert [type(d) for d in finished] == [tools.CallHead, tools.CallArguments] and held.calls == 1
