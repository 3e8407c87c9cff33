"""Tools (function calling) with any engine: the backend writes the tool conversation into the
prompt, constrains the reply when a call is required, and reads the call back out of it.

* **Prompt.** The offered functions (name, description, JSON schema of the arguments) go into a
  system message with how to call one: reply with only ``{"name": ..., "arguments": {...}}``.
  An assistant message's ``tool_calls`` is written as those objects, and a ``tool`` message as
  the result of its call, so a whole tool round trip fits every model's chat template.
* **Choice.** ``tool_choice`` ``"required"`` or a named function: the reply is sampled under a
  JSON schema (the engines' grammar or structured outputs) that admits exactly a call of the
  allowed functions with arguments valid against their schema. ``"auto"``: free text, read as a
  call when it is one. ``"none"`` (or no tools): the functions are not offered.
* **Reply.** A call comes back as ``tool_calls`` (one call; ``parallel_tool_calls`` is not
  honoured beyond one) with ``finish_reason`` ``"tool_calls"``; streamed, the reply is held
  back until it is known whether it is a call, then sent as one delta.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from backend.errors import ErrorCode
from backend.openai_api.protocol import ApiError, ChatCompletionRequest, Message
from backend.openai_api.tool_types import FunctionCall, Tool, ToolCall
from workers.wire import ChatMessage
from workers.wire import ResponseFormat as WireResponseFormat

HOW_TO_CALL = (
    "You can call these functions. To call one, reply with only a JSON object of the form "
    '{"name": "<function name>", "arguments": {<arguments>}} and nothing else; '
    "otherwise answer normally.\n\nFunctions:\n"
)


def offered(body: ChatCompletionRequest) -> list[Tool]:
    """The functions the model is told about (none with ``tool_choice`` "none")."""
    if not body.tools or body.tool_choice == "none":
        return []
    return list(body.tools)


def _allowed(body: ChatCompletionRequest) -> list[Tool] | None:
    """The functions the reply must call one of, when a call is required; else None."""
    tools = offered(body)
    choice = body.tool_choice
    if not tools or choice in (None, "auto", "none"):
        return None
    if choice == "required":
        return tools
    assert not isinstance(choice, str)
    named = [t for t in tools if t.function.name == choice.function.name]
    if not named:
        raise ApiError(
            ErrorCode.INVALID_REQUEST,
            f"tool_choice names {choice.function.name!r}, which is not among the tools",
            param="tool_choice",
        )
    return named


def _describe(tools: list[Tool]) -> str:
    lines = [
        json.dumps(
            {
                "name": t.function.name,
                "description": t.function.description or "",
                "parameters": t.function.parameters,
            },
            sort_keys=True,
        )
        for t in tools
    ]
    return HOW_TO_CALL + "\n".join(lines)


def _call_text(call: ToolCall) -> str:
    try:
        arguments: Any = json.loads(call.function.arguments)
    except ValueError:
        arguments = call.function.arguments
    return json.dumps({"name": call.function.name, "arguments": arguments}, sort_keys=True)


def _wire(message: Message, names: dict[str, str]) -> ChatMessage:
    if message.role == "tool":
        name = names.get(message.tool_call_id or "", "a function")
        return ChatMessage(role="user", content=f"Result of calling {name}: {message.text}")
    if message.role == "assistant" and message.tool_calls:
        calls = "\n".join(_call_text(call) for call in message.tool_calls)
        return ChatMessage(role="assistant", content=(message.text + "\n" + calls).strip())
    return message.to_wire()


def prompt(body: ChatCompletionRequest) -> list[ChatMessage]:
    """The messages the worker gets: the tool conversation written out (see the module)."""
    names = {
        call.id: call.function.name
        for message in body.messages
        for call in message.tool_calls or []
    }
    messages = [_wire(message, names) for message in body.messages]
    tools = offered(body)
    if tools:
        described = _describe(tools)
        if messages and messages[0].role == "system":
            described = messages[0].content + "\n\n" + described
            messages = messages[1:]
        messages.insert(0, ChatMessage(role="system", content=described))
    return messages


def response_format(body: ChatCompletionRequest) -> WireResponseFormat | None:
    """The reply's constraint: a call of an allowed function when one is required, else the
    request's own ``response_format``."""
    allowed = _allowed(body)
    if allowed is None:
        return body.response_format.to_wire() if body.response_format else None
    if body.response_format is not None and body.response_format.type != "text":
        raise ApiError(
            ErrorCode.INVALID_REQUEST,
            "response_format cannot be combined with a required tool call",
            param="response_format",
        )
    shapes = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters,
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in allowed
    ]
    schema = shapes[0] if len(shapes) == 1 else {"anyOf": shapes}
    return WireResponseFormat(type="json_schema", json_schema=json.dumps(schema, sort_keys=True))


def tool_call(body: ChatCompletionRequest, text: str) -> ToolCall | None:
    """The reply as a call of an offered function, when it is one."""
    tools = {t.function.name for t in offered(body)}
    if not tools:
        return None
    try:
        data = json.loads(text.strip())
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("name") not in tools:
        return None
    arguments = data.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        function=FunctionCall(name=data["name"], arguments=json.dumps(arguments)),
    )
