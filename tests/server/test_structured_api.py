"""Structured outputs and tool calls over HTTP with the real default model (issue 32).

The session server runs the default configuration (DSpark with context lookup on); the same
request with `max_draft_tokens: 0` decodes plainly on the same server, so "identical with DSpark
on and off" compares the two answers token for token (greedy)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from server_helpers import metric_value

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                         "zip": {"type": "integer"}},
                        "required": ["city", "zip"], "additionalProperties": False},
        },
        "required": ["name", "address"], "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
        "required": ["color", "ok"], "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}},
        "required": ["items"], "additionalProperties": False,
    },
    "pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"], "additionalProperties": False,
    },
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}},
                   "required": ["timezone"], "additionalProperties": False}}}


def _chat(oai, model, content, max_tokens=96, **kw):
    extra = kw.pop("extra_body", {})
    return oai.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                       temperature=0, max_tokens=max_tokens, extra_body=extra, **kw)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_outputs_validate_and_match_plain_decoding(oai, model_name, name):
    schema = SCHEMAS[name]
    rf = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    spec = _chat(oai, model_name, "Describe a person as JSON.", response_format=rf)
    plain = _chat(oai, model_name, "Describe a person as JSON.", response_format=rf, extra_body={"max_draft_tokens": 0})
    choice = spec.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), schema)
    assert choice.message.content == plain.choices[0].message.content


def test_json_object_output_parses(oai, model_name):
    out = _chat(oai, model_name, 'What is 2 + 2? Reply with a JSON object like {"answer": ...}.', max_tokens=200,
                response_format={"type": "json_object"})
    assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
    assert isinstance(json.loads(out.choices[0].message.content), dict)


@pytest.mark.parametrize("so,check", [
    ({"choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")),
    ({"regex": "[0-9]{3}-[a-z]{2,4}"}, lambda t: len(t.split("-")[0]) == 3 and t.split("-")[1].isalpha()),
])
def test_structured_outputs_extension(oai, model_name, so, check):
    out = _chat(oai, model_name, "Answer briefly.", extra_body={"structured_outputs": so})
    assert check(out.choices[0].message.content), out.choices[0].message.content
    legacy = {"guided_choice": so["choice"]} if "choice" in so else {"guided_regex": so["regex"]}
    again = _chat(oai, model_name, "Answer briefly.", extra_body=legacy)
    assert again.choices[0].message.content == out.choices[0].message.content


def test_completions_take_structured_outputs(client, model_name):
    r = client.post("/v1/completions", json={"model": model_name, "prompt": "The answer is", "max_tokens": 8,
                                             "temperature": 0, "structured_outputs": {"choice": ["A", "B"]}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] in ("A", "B")


def _args_valid(call, tool):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_required_tool_call_is_valid_and_matches_plain(oai, model_name):
    kw = dict(tools=[WEATHER, TIME], tool_choice="required", max_tokens=80)
    out = _chat(oai, model_name, "What is the weather in Paris?", **kw)
    plain = _chat(oai, model_name, "What is the weather in Paris?", extra_body={"max_draft_tokens": 0}, **kw)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        _args_valid(call, WEATHER if call.function.name == "get_weather" else TIME)
    assert [c.function.model_dump() for c in choice.message.tool_calls] == \
        [c.function.model_dump() for c in plain.choices[0].message.tool_calls]


def test_named_tool_call(oai, model_name):
    out = _chat(oai, model_name, "Tell me something.", tools=[WEATHER, TIME],
                tool_choice={"type": "function", "function": {"name": "get_time"}})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    _args_valid(choice.message.tool_calls[0], TIME)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_call_deltas_reassemble_to_the_answer(oai, model_name, tool_choice):
    kw = dict(tools=[WEATHER, TIME], tool_choice=tool_choice, max_tokens=80)
    whole = _chat(oai, model_name, "Weather in Rome please.", **kw).choices[0]
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in _chat(oai, model_name, "Weather in Rome please.", stream=True, **kw):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                entry["id"] = d.id or entry["id"]
                if d.function is not None:
                    entry["name"] = d.function.name or entry["name"]
                    entry["arguments"] += d.function.arguments or ""
    assert finish == whole.finish_reason == "tool_calls"
    assert (content.strip() or None) == whole.message.content
    assert all(c["id"] and c["id"].startswith("call_") for c in calls.values())  # each call's first delta has it
    assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_tool_history_and_auto_choice(oai, model_name):
    """An assistant turn with tool_calls and the tool's answer render into the prompt; with
    tool_choice auto the answer is text or calls, never an error."""
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                               "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 3}'},
    ]
    out = oai.chat.completions.create(model=model_name, messages=messages, tools=[WEATHER], temperature=0,
                                      max_tokens=40)
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs"),
])
def test_bad_constraints_are_400_naming_the_field(client, model_name, body, param):
    r = client.post("/v1/chat/completions", json={"model": model_name, "max_tokens": 8,
                                                  "messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_a_grammar_that_cannot_finish_in_time_ends_with_length(oai, model_name):
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 500}}, "required": ["s"]}
    out = _chat(oai, model_name, "Write.", max_tokens=12,
                response_format={"type": "json_schema", "json_schema": {"name": "long", "schema": schema}})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12


def test_metrics_count_structured_requests(client, oai, model_name):
    before = metric_value(client.get("/metrics").text, "dspark_structured_requests_total")
    _chat(oai, model_name, "JSON please.", max_tokens=16, response_format={"type": "json_object"})
    text = client.get("/metrics").text
    assert metric_value(text, "dspark_structured_requests_total") == before + 1
    assert metric_value(text, "dspark_grammar_mask_tokens_total") > 0
    assert metric_value(text, "dspark_grammar_compiles_total") >= 1


def test_a_constraint_the_tokenizer_cannot_continue_is_a_400_not_a_500(client, model_name):
    """A regex literal with multi-byte characters that no token of this vocabulary can continue
    (found by the API fuzzer: it was a 500): the request fails alone, as its own fault."""
    regex = "\x86A\U000b61b3\x1dI\xad\U000becab\x9bll\U0001fa4fda"
    r = client.post("/v1/chat/completions", json={"model": model_name, "max_tokens": 16, "guided_regex": regex,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "grammar_dead_end" and err["type"] == "invalid_request_error" and "cannot be continued" in err["message"]
    ok = client.post("/v1/chat/completions", json={"model": model_name, "max_tokens": 4,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200
