"""``POST /v1/responses``, OpenAI's Responses API for text: ``input`` (a string, or a list of
messages whose content is text), ``instructions`` (a system message first), ``max_output_tokens``,
``temperature``, ``top_p``, ``stream``. The same turn of the dispatcher as a chat completion
(billing, limits, errors); the reply is one output message of ``output_text``, or streamed as
the Responses events (``response.created`` ... ``response.output_text.delta`` ...
``response.completed``).

Refused by name (a 400), as nothing here keeps or runs them: ``previous_response_id`` and
``conversation`` (no response is stored), ``tools``, ``reasoning``, ``background``, ``include``,
``prompt``, a ``text.format`` other than text, item types other than messages, content other
than text, and an ``Idempotency-Key``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from backend.dispatch import Turn, TurnDone, TurnError, TurnRequest, TurnText
from backend.openai_api import completions
from backend.openai_api import protocol as p
from backend.openai_api.service import OpenAIService, conversation_id_for
from workers.wire import ChatMessage, SamplingParams

REFUSED: dict[str, tuple[object, ...]] = {
    "previous_response_id": (None,),
    "conversation": (None,),
    "tools": (None, []),
    "reasoning": (None,),
    "background": (None, False),
    "include": (None, []),
    "prompt": (None,),
    "text": (None, {}, {"format": {"type": "text"}}),
    "tool_choice": (None, "auto", "none"),
    "truncation": (None, "disabled"),
}
"""Parameters honoured only at these values (absent, null, or their no-op)."""


class InputText(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[InputMessage] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stream: bool = False

    def messages(self) -> list[ChatMessage]:
        messages = []
        if self.instructions:
            messages.append(ChatMessage(role="system", content=self.instructions))
        if isinstance(self.input, str):
            return [*messages, ChatMessage(role="user", content=self.input)]
        for item in self.input:
            role = "system" if item.role == "developer" else item.role
            messages.append(ChatMessage(role=role, content=item.text))
        return messages

    def turn(self, user_id: int) -> TurnRequest:
        messages = self.messages()
        return TurnRequest(
            user_id=user_id,
            model=self.model,
            messages=messages,
            max_tokens=self.max_output_tokens,
            sampling=SamplingParams(temperature=self.temperature, top_p=self.top_p),
            conversation_id=conversation_id_for(user_id, messages),
        )


def parse(raw: object) -> ResponsesRequest:
    """The request of a JSON body (nulls already dropped); ApiError naming what is refused,
    ValidationError for what is malformed."""
    p.refuse_unsupported(raw, REFUSED, "/v1/responses")
    return ResponsesRequest.model_validate(raw)


class _Shape:
    """The ids, time and settings every object of one response repeats."""

    def __init__(self, turn: Turn, body: ResponsesRequest) -> None:
        self.body = body
        self.response_id = f"resp_{turn.turn_id}"
        self.message_id = f"msg_{turn.turn_id}"
        self.created = int(time.time())
        self.sequence = 0

    def message(self, text: str, status: str) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content if status == "completed" or text else [],
        }

    def response(self, text: str, done: TurnDone | None, record: Any = None) -> dict[str, Any]:
        status, incomplete, output = "in_progress", None, []
        extra: dict[str, Any] = {}
        if done is not None:
            status = "incomplete" if done.finish_reason != "stop" else "completed"
            if done.finish_reason == "length":
                incomplete = {"reason": "max_output_tokens"}
            output = [self.message(text, "completed")]
            extra = {
                "usage": {
                    "input_tokens": done.prompt_tokens,
                    "input_tokens_details": {"cached_tokens": done.cached_prompt_tokens},
                    "output_tokens": done.completion_tokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": done.prompt_tokens + done.completion_tokens,
                },
                "cocoon": p.CocoonExtra.of(done, record).model_dump(mode="json"),
            }
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": self.body.instructions,
            "max_output_tokens": self.body.max_output_tokens,
            "model": self.body.model,
            "output": output,
            "parallel_tool_calls": False,
            "temperature": self.body.temperature,
            "top_p": self.body.top_p,
            "tool_choice": "none",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "store": False,
            "metadata": {},
            **extra,
        }

    def event(self, kind: str, **fields: Any) -> bytes:
        self.sequence += 1
        return p.sse({"type": kind, "sequence_number": self.sequence - 1, **fields})


async def answer(
    request: web.Request, service: OpenAIService, body: ResponsesRequest, turn: Turn
) -> web.StreamResponse:
    """The response, JSON or a stream of Responses events."""
    shape = _Shape(turn, body)
    if body.stream:
        return await _stream(request, service, turn, shape)
    try:
        text, done, _ = await completions.collect_watching(request, turn, cancel_on_disconnect=True)
    except TurnError as error:
        return completions.error_response(error)
    payload = shape.response(text, done, await service.attestation(done))
    return web.json_response(payload, headers={completions.COST_HEADER: str(done.cost)})


async def _stream(
    request: web.Request, service: OpenAIService, turn: Turn, shape: _Shape
) -> web.StreamResponse:
    async with completions.event_stream(request, turn) as stream:
        if isinstance(stream, web.Response):
            return stream
        place = {"item_id": shape.message_id, "output_index": 0, "content_index": 0}
        await stream.write(shape.event("response.created", response=shape.response("", None)))
        await stream.write(shape.event("response.in_progress", response=shape.response("", None)))
        await stream.write(
            shape.event(
                "response.output_item.added",
                output_index=0,
                item=shape.message("", "in_progress"),
            )
        )
        part = {"type": "output_text", "text": "", "annotations": []}
        await stream.write(shape.event("response.content_part.added", **place, part=part))
        parts: list[str] = []
        try:
            async for event in stream:
                if isinstance(event, TurnText):
                    parts.append(event.text)
                    delta = shape.event(
                        "response.output_text.delta", **place, delta=event.text, logprobs=[]
                    )
                    await stream.write(delta)
                else:
                    text = "".join(parts)
                    await stream.write(
                        shape.event("response.output_text.done", **place, text=text, logprobs=[])
                    )
                    part = {"type": "output_text", "text": text, "annotations": []}
                    await stream.write(
                        shape.event("response.content_part.done", **place, part=part)
                    )
                    await stream.write(
                        shape.event(
                            "response.output_item.done",
                            output_index=0,
                            item=shape.message(text, "completed"),
                        )
                    )
                    final = shape.response(text, event, await service.attestation(event))
                    kind = "response.completed"
                    if final["status"] == "incomplete":
                        kind = "response.incomplete"
                    await stream.write(shape.event(kind, response=final))
        except TurnError as error:
            body = p.error_body(error, with_param=False)
            await stream.write(shape.event("error", **body))
        return stream.response
