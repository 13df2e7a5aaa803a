"""Tool calls on /v1/chat/completions, the way vLLM serves a forced choice: by structured output.

Kiln's chat format has no tool-call syntax, so the model cannot choose to call a tool (``tool_choice``
"auto", OpenAI's default when ``tools`` are given): that is a 400, as vLLM answers it without a
tool parser. A *forced* call needs no syntax: the reply is constrained to JSON and read back.

- ``tool_choice: {"type": "function", "function": {"name": f}}``: the reply is f's arguments, one JSON
  value of its ``parameters`` schema; it comes back as one call of f.
- ``tool_choice: "required"``: the reply is a JSON array of at least one ``{"name": tool, "parameters":
  its arguments}`` (any of the tools; vLLM's schema for it); each item comes back as a call.
- ``tool_choice: "none"``: the tools are ignored.

Kiln's chat template has no place for tools, so the model sees only the conversation, as vLLM's
model does under a template that ignores ``tools``: describe them in a system message if the model
should know them (a tiny model's context would not hold their schemas anyway). An assistant turn
that called tools is rendered as the JSON a call is made of; a tool's result (role "tool", which the
template lacks) as a user turn "Tool result (<call id>): <text>". A reply cut by ``max_tokens`` is
not a call: it comes back as text with finish_reason "length".
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from kiln.serve.protocol import APIError

DEFAULT_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools ask of the reply: ``mode`` 'named' or 'required', the tools by name, and
    the JSON schema the reply is held to."""

    mode: str
    tools: dict[str, dict]
    schema: dict

    def calls(self, text: str) -> list[dict] | None:
        """The reply ``text`` read back as OpenAI ``tool_calls``; None when it is not complete JSON."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        if self.mode == "named":
            (name,) = self.tools
            items = [(name, value)]
        else:
            items = [(item["name"], item["parameters"]) for item in value]
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
                for name, args in items]


def plan_tools(tools: list[dict] | None, tool_choice: Any) -> ToolPlan | None:
    """The request's tool plan, None when it asks for no call (no tools, or ``tool_choice`` "none");
    a 400 naming the field for "auto", an unknown function or a malformed tool."""
    if not tools or tool_choice == "none":
        return None
    by_name = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"tools[{i}] is not {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                           param="tools")
        params = fn.get("parameters") or DEFAULT_PARAMETERS
        if not isinstance(params, dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        by_name[fn["name"]] = {"name": fn["name"], "description": fn.get("description") or "", "parameters": params}
    if tool_choice in (None, "auto"):
        raise APIError(400, "tool_choice \"auto\" (the default with tools) is not supported: this model's chat "
                            "format has no tool-call syntax, so it cannot choose to call a tool. Send tool_choice "
                            "\"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}} to have a call "
                            "made, or \"none\" to have the tools ignored",
                       param="tool_choice" if tool_choice is not None else "tools")
    if tool_choice == "required":
        items = [{"type": "object", "properties": {"name": {"const": t["name"]}, "parameters": t["parameters"]},
                  "required": ["name", "parameters"], "additionalProperties": False} for t in by_name.values()]
        return ToolPlan("required", by_name, {"type": "array", "minItems": 1, "items": {"anyOf": items}})
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if name not in by_name:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools "
                            f"({', '.join(sorted(by_name))})" if name else
                       f"tool_choice {tool_choice!r} is not \"none\", \"auto\", \"required\" or "
                       "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")
    return ToolPlan("named", {name: by_name[name]}, by_name[name]["parameters"])


def render_message(message: Any) -> dict[str, str]:
    """A message as the chat template takes it: an assistant turn's tool calls as the JSON a call is
    made of, a tool's result as a user turn."""
    calls = getattr(message, "tool_calls", None)
    if message.role == "assistant" and calls:
        made = [{"name": c.get("function", {}).get("name"),
                 "parameters": _loads(c.get("function", {}).get("arguments", "{}"))} for c in calls]
        text = (message.text() + "\n" if message.content else "") + json.dumps(made, ensure_ascii=False)
        return {"role": "assistant", "content": text}
    if message.role == "tool":
        who = f" ({message.tool_call_id})" if message.tool_call_id else ""
        return {"role": "user", "content": f"Tool result{who}: {message.text()}"}
    return {"role": message.role, "content": message.text()}


def _loads(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError:
        return text
