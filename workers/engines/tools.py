"""Tools (function calling) through the model's chat template, for every engine.

* **Prompt.** The offered functions and the tool conversation (assistant ``tool_calls``,
  ``tool`` results) are handed to the chat template as transformers and vLLM do (``tools=``,
  OpenAI-shaped messages with the arguments as objects). A template that knows no tools (it
  never reads ``tools``, as SmolLM2's) gets them written into the messages instead
  (:func:`fallback_messages`), in the same Hermes format; an engine's ``chat_template`` option
  (a file, e.g. ``workers/templates/hermes_tools.jinja``) replaces the model's template.
* **Choice.** ``required`` (or a named function): the reply is sampled under a JSON schema (the
  engines' grammar or structured outputs) admitting exactly an array of calls of the allowed
  functions, one at most without ``parallel`` (as vLLM does). ``auto``: free text, in which each
  Hermes block ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` is a call.
* **Reply.** :func:`with_tool_calls` turns the engine's text into text and
  :class:`~workers.engines.base.ToolCallDelta` pieces as soon as each call is complete: its name
  first, then its arguments. Bounded: at most :data:`MAX_TOOLS` calls, a call's text at most
  :data:`MAX_CALL_CHARS` (a longer block is given back as text), so a model cannot make the node
  hold more than that.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

from workers.engines.base import (
    GenerationRequest,
    RequestRefused,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from workers.wire_tools import MAX_TOOL_ARGUMENTS_CHARS, MAX_TOOLS, TOOL_NAME

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
MAX_CALL_CHARS = MAX_TOOL_ARGUMENTS_CHARS + 1024
"""The longest text of one call (its name, arguments and JSON around them)."""
HERMES_TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "hermes_tools.jinja"
_NAME = re.compile(TOOL_NAME)


def read_template(path: str | os.PathLike[str]) -> str:
    """A chat template file's text (a ``.jinja`` file, as vLLM's ``--chat-template``)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"cannot read the chat template {path}: {error}") from error


def template_digest(template: str) -> str:
    """The SHA-256 of a chat template's text: how an engine's attested configuration names it."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def knows_tools(template: str) -> bool:
    """Whether a chat template renders the offered functions (it reads ``tools``)."""
    return re.search(r"\btools\b", template) is not None


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def template_tools(request: GenerationRequest) -> list[dict[str, Any]] | None:
    """The offered functions as chat templates take them (OpenAI's ``tools``)."""
    if not request.tools:
        return None
    return [
        {
            "type": "function",
            "function": {
                "name": tool["name"],
                "description": tool.get("description", ""),
                "parameters": _arguments(tool.get("parameters", "{}")),
            },
        }
        for tool in request.tools
    ]


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The messages as chat templates take them: an assistant's calls in OpenAI's shape with
    their arguments as objects (as vLLM passes them), a tool message with its call's id."""
    out: list[dict[str, Any]] = []
    for message in messages:
        item = {k: v for k, v in message.items() if v is not None}
        if message.get("tool_calls"):
            item["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": _arguments(call["arguments"])},
                }
                for call in message["tool_calls"]
            ]
        out.append(item)
    return out


def _call_text(call: Mapping[str, Any]) -> str:
    body = json.dumps({"name": call["name"], "arguments": _arguments(call["arguments"])})
    return f"{OPEN}\n{body}\n{CLOSE}"


def fallback_messages(request: GenerationRequest) -> list[dict[str, Any]]:
    """For a template that knows no tools: the functions described in the system message, a
    call written as its Hermes block, a result as a user message (every template takes those)."""
    messages: list[dict[str, Any]] = []
    history: Sequence[Mapping[str, Any]] = request.messages  # calls are lists of dicts
    for message in history:
        role, content = message["role"], message["content"]
        if role == "tool":
            messages.append(
                {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
            )
        elif message.get("tool_calls"):
            calls = "\n".join(_call_text(call) for call in message["tool_calls"])
            messages.append({"role": "assistant", "content": (content + "\n" + calls).strip()})
        else:
            messages.append({"role": role, "content": content})
    if not request.tools:  # a tool conversation, with no function offered now
        return messages
    described = "\n".join(json.dumps(tool) for tool in template_tools(request) or [])
    system = (
        "You may call one or more functions to assist with the user query. The functions, "
        f"within <tools></tools> XML tags:\n<tools>\n{described}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        f'{OPEN}{CLOSE} XML tags:\n{OPEN}\n{{"name": <function-name>, "arguments": '
        f"<args-json-object>}}\n{CLOSE}"
    )
    if messages and messages[0]["role"] == "system":
        system = messages.pop(0)["content"] + "\n\n" + system
    return [{"role": "system", "content": system}, *messages]


def prompt_parts(
    request: GenerationRequest, tool_template: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and functions an engine renders with its chat template: as they are when
    the template knows tools (``tool_template``), else written by :func:`fallback_messages`
    whenever functions are offered or the conversation holds calls or results."""
    talks_tools = any(m.get("tool_calls") or m["role"] == "tool" for m in request.messages)
    if not tool_template and (request.tools or talks_tools):
        return fallback_messages(request), None
    return list(request.messages), template_tools(request)


def forced_schema(request: GenerationRequest) -> str | None:
    """The JSON schema a reply that must call a function is sampled under (None: free text)."""
    if not request.tools or request.tool_choice != "required":
        return None
    allowed = [t for t in request.tools if request.tool_name in (None, t["name"])]
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t["name"]]},
                "arguments": _arguments(t.get("parameters", "{}")),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in allowed
    ]
    schema: dict[str, Any] = {
        "type": "array",
        "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
        "minItems": 1,
        "maxItems": MAX_TOOLS if request.parallel_tool_calls else 1,
    }
    return json.dumps(schema, sort_keys=True)


def constrained(request: GenerationRequest) -> GenerationRequest:
    """The request with its reply constrained to calls when one is required."""
    schema = forced_schema(request)
    if schema is None:
        return request
    if request.json_mode is not None:
        raise RequestRefused("response_format cannot be combined with a required tool call")
    return dataclasses.replace(request, json_mode="json_schema", json_schema=schema)


class ToolCallParser:
    """Reads calls out of a reply as it streams (see the module). ``forced``: the reply is a JSON
    array of calls; else Hermes blocks within free text. ``limit``: calls kept (the rest are
    dropped); ``names``: the functions offered (a call of another is given back as text)."""

    def __init__(self, *, forced: bool, limit: int, names: Sequence[str]) -> None:
        self.forced = forced
        self.limit = min(limit, MAX_TOOLS)
        self.names = frozenset(names)
        self.calls = 0
        self._buffer = ""
        self._inside = False  # within a Hermes block
        self._pending = ""  # whitespace next to calls, sent once text follows it
        self._position = 0  # forced: where the next array element starts
        self._decoder = json.JSONDecoder()

    def feed(self, text: str) -> tuple[str, tuple[ToolCallDelta, ...]]:
        """Add reply text; return (text to send now, call pieces to send after it)."""
        self._buffer += text
        return self._forced() if self.forced else self._hermes(final=False)

    def finish(self) -> tuple[str, tuple[ToolCallDelta, ...]]:
        """The end of the reply: what was held back (an unfinished call is given back as text)."""
        if self.forced:
            rest, self._buffer = self._buffer[self._position :], ""
            return ("" if self.calls else rest.strip()), ()
        text, calls = self._hermes(final=True)
        if self._inside:
            text += OPEN + self._buffer
        elif not self.calls:
            text += self._pending
        self._buffer = self._pending = ""
        return text, calls

    def _call(self, data: Any) -> tuple[ToolCallDelta, ...] | None:
        """The pieces of one call, or None when it is not a call of an offered function."""
        if not isinstance(data, dict) or set(data) - {"name", "arguments"}:
            return None
        name, arguments = data.get("name"), data.get("arguments", {})
        if not isinstance(name, str) or name not in self.names or not _NAME.fullmatch(name):
            return None
        if not isinstance(arguments, dict):
            return None
        encoded = json.dumps(arguments, ensure_ascii=False)
        if len(encoded) > MAX_TOOL_ARGUMENTS_CHARS:
            return None
        if self.calls >= self.limit:
            return ()  # a call past the limit is dropped, not shown as text
        index, self.calls = self.calls, self.calls + 1
        return (ToolCallDelta(index, name=name), ToolCallDelta(index, arguments=encoded))

    def _forced(self) -> tuple[str, tuple[ToolCallDelta, ...]]:
        pieces: list[ToolCallDelta] = []
        buffer = self._buffer
        while True:
            at = self._position
            while at < len(buffer) and buffer[at] in " \t\r\n[,":
                at += 1
            if at >= len(buffer) or buffer[at] == "]":
                break
            if at - self._position > MAX_CALL_CHARS:
                break
            try:
                data, end = self._decoder.raw_decode(buffer, at)
            except ValueError:
                break  # not complete yet (the grammar makes it valid)
            call = self._call(data)
            pieces += call or ()
            self._position = end
        if self._position > MAX_CALL_CHARS:  # keep the buffer bounded: drop what was read
            self._buffer, self._position = buffer[self._position :], 0
        elif len(self._buffer) - self._position > MAX_CALL_CHARS:
            self._buffer, self._position = "", 0  # one element past every bound: not a call
        return "", tuple(pieces)

    def _hermes(self, *, final: bool) -> tuple[str, tuple[ToolCallDelta, ...]]:
        text: list[str] = []
        pieces: list[ToolCallDelta] = []
        while True:
            if not self._inside:
                start = self._buffer.find(OPEN)
                if start == -1:
                    keep = 0 if final else _partial_suffix(self._buffer, OPEN)
                    text.append(self._outside(self._buffer[: len(self._buffer) - keep]))
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                text.append(self._outside(self._buffer[:start]))
                self._buffer, self._inside = self._buffer[start + len(OPEN) :], True
            end = self._buffer.find(CLOSE)
            if end == -1:
                if len(self._buffer) > MAX_CALL_CHARS:  # no call is that long: it is text
                    text.append(self._outside(OPEN + self._buffer))
                    self._buffer, self._inside = "", False
                break
            block, self._buffer = self._buffer[:end], self._buffer[end + len(CLOSE) :]
            self._inside = False
            try:
                call = self._call(json.loads(block))
            except ValueError:
                call = None
            if call is None:
                text.append(self._outside(OPEN + block + CLOSE))
            else:
                pieces += call
        return "".join(text), tuple(pieces)

    def _outside(self, text: str) -> str:
        """Text between calls: whitespace is held until text follows it (and dropped when the
        reply is only calls)."""
        if not text:
            return ""
        if not text.strip():
            self._pending += text
            return ""
        out, self._pending = self._pending + text, ""
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that begins ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


async def with_tool_calls(
    request: GenerationRequest, deltas: AsyncIterator[TextDelta | Usage]
) -> AsyncIterator[TextDelta | Usage]:
    """The engine's reply with its calls read out (unchanged when no tools are offered)."""
    if not request.tools:
        async with aclosing(deltas):  # type: ignore[type-var]
            async for item in deltas:
                yield item
        return
    parser = ToolCallParser(
        forced=request.tool_choice == "required",
        limit=MAX_TOOLS if request.parallel_tool_calls else 1,
        names=[tool["name"] for tool in request.tools],
    )
    async with aclosing(deltas):  # type: ignore[type-var]
        async for item in deltas:
            if isinstance(item, Usage):
                text, calls = parser.finish()
                if text or calls:
                    yield TextDelta(text, (), calls)
                yield item
                continue
            text, calls = parser.feed(item.text)
            if text or calls or item.logprobs:
                yield TextDelta(text, item.logprobs, calls)
