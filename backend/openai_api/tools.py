"""Tools (function calling): what the worker gets, and what of its reply the client gets.

* **Prompt.** The offered functions (name, description, JSON schema of the arguments), the
  choice and ``parallel_tool_calls`` travel in the sealed request (:class:`workers.wire.Tools`),
  and so do an assistant message's ``tool_calls`` and a ``tool`` message's ``tool_call_id``
  (renumbered ``call_0``, ``call_1``...: no client's id reaches the worker). The worker's
  engine renders them with the model's chat template (``tools=``, as transformers and vLLM do),
  or, for a template that knows no tools, writes them into the messages in the same Hermes
  format (:mod:`workers.engines.tools`). A template file that replaces the model's (an engine
  option ``chat_template=FILE``, e.g. the shipped ``workers/templates/hermes_tools.jinja``)
  is part of the worker's attested engine configuration (``chat_template_sha256``). An engine
  that cannot render tools (``openai``, ``instant``) refuses them: a 400.
* **Choice.** ``"required"`` or a named function: the reply is sampled under a JSON schema (the
  engines' grammar or structured outputs) that admits only an array of calls of the allowed
  functions with arguments valid against their schema (one call without
  ``parallel_tool_calls``). ``"auto"``: free text, in which each
  ``<tool_call>{...}</tool_call>`` block is a call. ``"none"`` (or no tools): none offered.
* **Reply.** Several calls per reply (one at most with ``parallel_tool_calls`` false; the
  engine drops any past it) come back as ``tool_calls`` with ``finish_reason``
  ``"tool_calls"``, beside any text before them; streamed, each call is sent as OpenAI does
  (index, id, type and name first, then its arguments) as soon as the worker has read it out
  of the reply. A worker is a stranger: the turn lets through only calls the request allowed
  (:mod:`backend.tool_checks`) and cuts off a worker sending any other (``worker_misbehaved``,
  billed only what it delivered, flagged); :class:`CallReader` then shows them as OpenAI does.
* **Billing.** The backend's bound on the prompt's tokens counts the text the template writes
  for the functions, calls and results (:func:`backend.bounds.tools_token_bound`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

from backend.errors import ErrorCode
from backend.openai_api.protocol import ApiError, ChatCompletionRequest, Message
from backend.openai_api.tool_types import FunctionCall, Tool, ToolCall
from workers.wire import ChatMessage
from workers.wire import ResponseFormat as WireResponseFormat
from workers.wire_tools import ToolCall as WireToolCall
from workers.wire_tools import ToolCallDelta, ToolSpec
from workers.wire_tools import Tools as WireTools


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


class CallReader:
    """The reply's calls as OpenAI shows them: each given an id of its own, streamed as OpenAI
    streams them, then whole. The turn has checked them already (:mod:`backend.tool_checks`:
    an offered function, in order, within the count, JSON-object arguments)."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self._arguments: list[list[str]] = []

    def read(self, piece: ToolCallDelta) -> dict[str, object]:
        """A piece as OpenAI streams it: a call's index, id, type and name first, then
        fragments of its arguments."""
        if piece.name is not None:  # the first piece of the next call
            call = ToolCall(
                id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=piece.name)
            )
            self.calls.append(call)
            self._arguments.append([piece.arguments])
            function = {"name": piece.name, "arguments": piece.arguments}
            return {"index": piece.index, "id": call.id, "type": "function", "function": function}
        self._arguments[piece.index].append(piece.arguments)
        return {"index": piece.index, "function": {"arguments": piece.arguments}}

    def finish(self) -> list[ToolCall]:
        """The whole calls, in order."""
        return [
            call.model_copy(
                update={"function": FunctionCall(name=call.function.name, arguments="".join(parts))}
            )
            for call, parts in zip(self.calls, self._arguments, strict=True)
        ]
