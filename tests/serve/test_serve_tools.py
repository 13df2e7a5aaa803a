"""Forced tool calls over HTTP (``kiln.serve.tools``), through the official ``openai`` client against
``kiln serve`` (the engine in its own process and in a thread): a named function's reply is one call
of it whose arguments match its schema; "required" gives one or more calls of the tools; streamed,
the calls arrive whole; a reply cut by max_tokens is text; a conversation holding earlier calls and
their results is served; a tool call together with response_format is a 400."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")

from serve_helpers import openai_client  # noqa: E402

MODEL = "kiln-chat-tiny"
HI = [{"role": "user", "content": "add two and three"}]
ADD = {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["a", "b"], "additionalProperties": False}}}
COLOR = {"type": "function", "function": {"name": "color", "parameters": {
    "type": "object", "properties": {"c": {"enum": ["red", "blue"]}}, "required": ["c"],
    "additionalProperties": False}}}


def _args_ok(name: str, arguments: str) -> None:
    args = json.loads(arguments)
    if name == "add":
        assert set(args) == {"a", "b"} and all(isinstance(v, int) and 0 <= v <= 9 for v in args.values()), args
    else:
        assert name == "color" and args in ({"c": "red"}, {"c": "blue"}), args


def test_named_and_required_calls(srv):
    client = openai_client(srv, timeout=60)
    r = client.chat.completions.create(model=MODEL, messages=HI, tools=[ADD, COLOR], max_tokens=60, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "add"}})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.function.name == "add" and call.id.startswith("call_")
    _args_ok("add", call.function.arguments)
    r = client.chat.completions.create(model=MODEL, messages=HI, tools=[ADD, COLOR], tool_choice="required",
                                       max_tokens=100, temperature=1.0, seed=4, n=2)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) >= 1
        for call in c.message.tool_calls:
            _args_ok(call.function.name, call.function.arguments)
    cut = client.chat.completions.create(model=MODEL, messages=HI, tools=[ADD], max_tokens=3, temperature=0,
                                         tool_choice={"type": "function", "function": {"name": "add"}})
    assert cut.choices[0].finish_reason == "length" and not cut.choices[0].message.tool_calls
    assert cut.choices[0].message.content.startswith("{")


def test_streamed_calls_arrive_whole(srv):
    client = openai_client(srv, timeout=60)
    kw = dict(model=MODEL, messages=HI, tools=[ADD], max_tokens=60, temperature=0,
              tool_choice={"type": "function", "function": {"name": "add"}})
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    calls, finish = {}, None
    for ev in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        for ch in ev.choices:
            for d in ch.delta.tool_calls or []:
                got = calls.setdefault(d.index, {"name": "", "arguments": ""})
                got["name"] += d.function.name or ""
                got["arguments"] += d.function.arguments or ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0] == {"name": "add", "arguments": whole.function.arguments}  # greedy: the same call


def test_a_conversation_with_earlier_calls_and_refusals(srv):
    client = openai_client(srv, timeout=60)
    history = HI + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[ADD], tool_choice="none",
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, tools=[ADD], tool_choice="required",
                                       response_format={"type": "json_object"}, max_tokens=8)
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, tools=[ADD], max_tokens=8)  # "auto"
    assert e.value.body["param"] == "tools" and "no tool-call syntax" in e.value.body["message"]


def test_required_reply_reads_back_as_every_call_it_holds():
    from kiln.serve.tools import plan_tools

    plan = plan_tools([ADD, COLOR], "required")
    assert plan.mode == "required" and plan.schema["minItems"] == 1
    assert [i["properties"]["name"]["const"] for i in plan.schema["items"]["anyOf"]] == ["add", "color"]
    calls = plan.calls('[{"name":"add","parameters":{"a":1,"b":2}},{"name":"color","parameters":{"c":"red"}}]')
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("add", {"a": 1, "b": 2}), ("color", {"c": "red"})]
    assert len({c["id"] for c in calls}) == 2 and plan.calls('[{"name":"add"') is None
    named = plan_tools([ADD, COLOR], {"type": "function", "function": {"name": "color"}})
    assert named.schema == COLOR["function"]["parameters"] and named.calls('{"c":"blue"}')[0]["function"] == {
        "name": "color", "arguments": '{"c": "blue"}'}
    assert plan_tools([ADD], "none") is None and plan_tools(None, "required") is None
