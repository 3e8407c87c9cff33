"""Tools (function calling): what the worker gets, and what of its reply the client gets.

* **Prompt.** The offered functions (name, description, JSON schema of the arguments), the
  choice and ``parallel_tool_calls`` travel in the sealed request (:class:`workers.wire.Tools`),
  and so do an assistant message's ``tool_calls`` and a ``tool`` message's ``tool_call_id``:
  the worker's engine renders them with the model's chat template (``tools=``, as transformers
  and vLLM do), or, for a template that knows no tools, writes them into the messages in the
  same Hermes format (:mod:`workers.engines.tools`). The worker says which in its attested
  engine configuration (``chat_template_sha256`` names a template file that replaces the
  model's, e.g. the shipped ``workers/templates/hermes_tools.jinja``).
* **Choice.** ``"required"`` or a named function: the reply is sampled under a JSON schema (the
  engines' grammar or structured outputs) that admits only calls of the allowed functions with
  arguments valid against their schema. ``"auto"``: free text, in which each
  ``<tool_call>{...}</tool_call>`` block is a call. ``"none"`` (or no tools): none offered.
* **Reply.** Several calls per reply (one at most with ``parallel_tool_calls`` false) come back
  as ``tool_calls`` with ``finish_reason`` ``"tool_calls"``; streamed, each call is sent as
  OpenAI does (index, id, type and name first, then its arguments) as soon as the worker has
  read it out of the reply. A worker is a stranger: :class:`CallReader` lets through only calls
  of offered (or the named) functions, in order, within the count, with JSON-object
  arguments within :data:`~workers.wire.MAX_TOOL_ARGUMENTS_CHARS`; anything else fails the turn
  as a worker error.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

from backend.errors import ErrorCode
from backend.openai_api.protocol import ApiError, ChatCompletionRequest, Message
from backend.openai_api.tool_types import FunctionCall, Tool, ToolCall
from backend.turns import TurnError
from workers.wire import MAX_TOOL_ARGUMENTS_CHARS, MAX_TOOLS, ChatMessage, ToolCallDelta, ToolSpec
from workers.wire import ResponseFormat as WireResponseFormat
from workers.wire import ToolCall as WireToolCall
from workers.wire import Tools as WireTools


def offered(body: ChatCompletionRequest) -> list[Tool]:
    """The functions the model is told about (none with ``tool_choice`` "none")."""
    if not body.tools or body.tool_choice == "none":
        return []
    return list(body.tools)


def _named(body: ChatCompletionRequest) -> str | None:
    choice = body.tool_choice
    if choice is None or isinstance(choice, str):
        return None
    if choice.function.name not in {t.function.name for t in offered(body)}:
        raise ApiError(
            ErrorCode.INVALID_REQUEST,
            f"tool_choice names {choice.function.name!r}, which is not among the tools",
            param="tool_choice",
        )
    return choice.function.name


def wire_tools(body: ChatCompletionRequest) -> WireTools | None:
    """The offered functions and how they may be called, as the worker gets them."""
    tools = offered(body)
    if not tools:
        return None
    name = _named(body)
    required = body.tool_choice == "required" or name is not None
    return WireTools(
        functions=[
            ToolSpec(
                name=t.function.name,
                description=t.function.description or "",
                parameters=json.dumps(t.function.parameters, sort_keys=True),
            )
            for t in tools
        ],
        choice="required" if required else "auto",
        name=name,
        parallel=body.parallel_tool_calls is not False,
    )


def prompt(body: ChatCompletionRequest) -> list[ChatMessage]:
    """The messages the worker gets; call ids are renumbered (``call_0``, ...), so no client's
    id reaches the worker, and a tool result names the call it answers."""
    ids: dict[str, str] = {}

    def renamed(client_id: str | None) -> str:
        return ids.setdefault(client_id or f"unnamed-{len(ids)}", f"call_{len(ids)}")

    messages = []
    for message in body.messages:
        if message.role == "tool":
            content = message.text
            messages.append(
                ChatMessage(
                    role="tool", content=content, tool_call_id=renamed(message.tool_call_id)
                )
            )
        elif message.role == "assistant" and message.tool_calls:
            messages.append(_assistant(message, renamed))
        else:
            messages.append(message.to_wire())
    return messages


def _assistant(message: Message, renamed: Callable[[str | None], str]) -> ChatMessage:
    return ChatMessage(
        role="assistant",
        content=message.text,
        tool_calls=[
            WireToolCall(
                id=renamed(call.id), name=call.function.name, arguments=call.function.arguments
            )
            for call in message.tool_calls or []
        ],
    )


def response_format(body: ChatCompletionRequest) -> WireResponseFormat | None:
    """The reply's constraint: the request's own ``response_format`` (a required call is
    constrained by the worker, from the request's tools)."""
    required = offered(body) and (body.tool_choice == "required" or _named(body) is not None)
    if required and body.response_format is not None and body.response_format.type != "text":
        raise ApiError(
            ErrorCode.INVALID_REQUEST,
            "response_format cannot be combined with a required tool call",
            param="response_format",
        )
    return body.response_format.to_wire() if body.response_format else None


class ToolCallRefused(TurnError):
    """The worker's reply holds a call the request did not allow: a worker error."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.WORKER_ERROR, message)


class CallReader:
    """The reply's calls, checked piece by piece as the worker streams them (see the module)."""

    def __init__(self, body: ChatCompletionRequest) -> None:
        tools = offered(body)
        named = _named(body) if tools else None
        self.names = {named} if named else {t.function.name for t in tools}
        self.limit = 1 if body.parallel_tool_calls is False else MAX_TOOLS
        self.calls: list[ToolCall] = []
        self._arguments: list[list[str]] = []
        self._sizes: list[int] = []

    def read(self, piece: ToolCallDelta) -> dict[str, object]:
        """A checked piece as OpenAI streams it; ToolCallRefused when it is not allowed."""
        if piece.name is not None:  # the first piece of the next call
            if piece.index != len(self.calls) or piece.index >= self.limit:
                raise ToolCallRefused("the worker's calls are out of order or too many")
            if piece.name not in self.names:
                raise ToolCallRefused("the worker called a function that was not offered")
            call = ToolCall(
                id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=piece.name)
            )
            self.calls.append(call)
            self._arguments.append([piece.arguments])
            self._sizes.append(len(piece.arguments))
            function = {"name": piece.name, "arguments": piece.arguments}
            return {"index": piece.index, "id": call.id, "type": "function", "function": function}
        if piece.index != len(self.calls) - 1:
            raise ToolCallRefused("the worker's call pieces are out of order")
        self._sizes[piece.index] += len(piece.arguments)
        if self._sizes[piece.index] > MAX_TOOL_ARGUMENTS_CHARS:
            raise ToolCallRefused("the worker's call arguments are too long")
        self._arguments[piece.index].append(piece.arguments)
        return {"index": piece.index, "function": {"arguments": piece.arguments}}

    def finish(self) -> list[ToolCall]:
        """The whole calls; ToolCallRefused when an argument text is not a JSON object."""
        calls = []
        for call, parts in zip(self.calls, self._arguments, strict=True):
            arguments = "".join(parts)
            try:
                parsed = json.loads(arguments)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                raise ToolCallRefused("the worker's call arguments are not a JSON object")
            calls.append(
                call.model_copy(
                    update={"function": FunctionCall(name=call.function.name, arguments=arguments)}
                )
            )
        return calls
