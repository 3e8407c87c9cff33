"""``POST /v1/completions``, OpenAI's legacy text completions: a prompt continued as it is, with
no chat template (the wire's ``SamplingParams.chat_template`` false), billed, bounded and refused
as a chat completion is (the same turn of the dispatcher, the same limits and errors).

Taken: ``prompt`` (a string, or a list of one string), ``max_tokens``, ``temperature``,
``top_p``, ``stop``, ``seed``, the penalties, ``logit_bias``, ``stream`` (with
``stream_options.include_usage``). Refused by name (a 400): ``echo``, ``suffix``, ``best_of``
and ``n`` above 1, ``logprobs`` (the legacy shape is another one than chat's), a list of
several prompts or of token ids, and an ``Idempotency-Key`` (kept results are chat's only).
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from backend.dispatch import Turn, TurnDone, TurnError, TurnRequest, TurnText
from backend.openai_api import completions
from backend.openai_api import protocol as p
from backend.openai_api.service import OpenAIService, conversation_id_for
from workers.wire import MAX_LOGIT_BIAS, ChatMessage, SamplingParams, TokenId

REFUSED = {"echo": (None, False), "suffix": (None, ""), "best_of": (None, 1), "logprobs": (None,)}
"""Parameters honoured only at these values (absent, null, or their no-op)."""


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[str]
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[TokenId, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: p.StreamOptions | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("one prompt per request (a list of one string)")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > p.MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {p.MAX_STOP_SEQUENCES} stop sequences")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        return p.checked_logit_bias(value)

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def turn(self, user_id: int) -> TurnRequest:
        """The turn: the prompt as the one user message, no chat template."""
        messages = [ChatMessage(role="user", content=self.text)]
        return TurnRequest(
            user_id=user_id,
            model=self.model,
            messages=messages,
            max_tokens=self.max_tokens,
            sampling=SamplingParams(
                temperature=self.temperature,
                top_p=self.top_p,
                stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
                seed=self.seed,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                logit_bias=self.logit_bias or {},
                chat_template=False,
            ),
            conversation_id=conversation_id_for(user_id, messages),
        )


def parse(raw: object) -> CompletionRequest:
    """The request of a JSON body (nulls already dropped); ApiError naming what is refused,
    ValidationError for what is malformed."""
    p.refuse_unsupported(raw, REFUSED, "/v1/completions")
    return CompletionRequest.model_validate(raw)


def _choice(text: str, finish: str | None) -> dict[str, Any]:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}


class _Head:
    def __init__(self, turn: Turn, body: CompletionRequest) -> None:
        self.fields: dict[str, Any] = {
            "id": f"cmpl-{turn.turn_id}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
        }

    def body(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {**self.fields, "choices": choices, **extra}


def _billing(done: TurnDone, record: Any) -> dict[str, Any]:
    return {
        "usage": p.Usage.of(done).model_dump(),
        "cocoon": p.CocoonExtra.of(done, record).model_dump(mode="json"),
    }


async def answer(
    request: web.Request, service: OpenAIService, body: CompletionRequest, turn: Turn
) -> web.StreamResponse:
    """The completion, JSON or a stream (the same rules as chat's)."""
    head = _Head(turn, body)
    if body.stream:
        return await _stream(request, service, body, turn, head)
    try:
        text, done, _ = await completions.collect_watching(request, turn, cancel_on_disconnect=True)
    except TurnError as error:
        return completions.error_response(error)
    record = await service.attestation(done)
    payload = head.body([_choice(text, p.finish_reason(done))], **_billing(done, record))
    return web.json_response(payload, headers={completions.COST_HEADER: str(done.cost)})


async def _stream(
    request: web.Request,
    service: OpenAIService,
    body: CompletionRequest,
    turn: Turn,
    head: _Head,
) -> web.StreamResponse:
    async with completions.event_stream(request, turn) as stream:
        if isinstance(stream, web.Response):
            return stream
        try:
            async for event in stream:
                if isinstance(event, TurnText):
                    await stream.write(p.sse(head.body([_choice(event.text, None)])))
                else:
                    finish = p.finish_reason(event)
                    await stream.write(p.sse(head.body([_choice("", finish)])))
                    if body.stream_options and body.stream_options.include_usage:
                        record = await service.attestation(event)
                        await stream.write(p.sse(head.body([], **_billing(event, record))))
        except TurnError as error:
            await stream.write(p.sse(p.error_body(error, with_param=False)))
        return stream.response
