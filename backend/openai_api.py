"""The OpenAI-compatible HTTP API: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Same holds and billing as every other client (it goes through the :class:`Dispatcher`).
Errors are OpenAI-shaped: ``{"error": {"message", "type", "code", "param"}}``.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from backend import appkeys
from backend.apikeys import user_for_key
from backend.dispatch import TurnDone, TurnError, TurnRequest, TurnText
from workers.wire import ChatMessage, SamplingParams

MAX_BODY_BYTES = 4 * 1024 * 1024

# ------------------------------------------------------------------ protocol


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def to_wire(self) -> ChatMessage:
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(role=role, content=text)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, type_: str, code: str, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param

    def response(self) -> web.Response:
        body = {"error": {"message": str(self), "type": self.type, "code": self.code}}
        body["error"]["param"] = self.param
        return web.json_response(body, status=self.status)


TURN_ERRORS: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "invalid_request_error"),
    "unknown_model": (404, "invalid_request_error"),
    "insufficient_balance": (402, "insufficient_quota"),
    "no_worker": (503, "server_error"),
    "timeout": (504, "server_error"),
    "cancelled": (499, "server_error"),
    "worker_error": (502, "server_error"),
}


def _turn_error(error: TurnError) -> ApiError:
    status, type_ = TURN_ERRORS.get(error.code, (500, "server_error"))
    code = "model_not_found" if error.code == "unknown_model" else error.code
    return ApiError(status, str(error), type_, code)


# -------------------------------------------------------------------- routes


async def _authenticate(request: web.Request) -> int:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(
            401,
            "missing API key: send 'Authorization: Bearer <key>' (get one from the bot's /apikey)",
            "invalid_request_error",
            "invalid_api_key",
        )
    user_id = await user_for_key(request.app[appkeys.DATABASE], key.strip())
    if user_id is None:
        raise ApiError(
            401, "invalid or revoked API key", "invalid_request_error", "invalid_api_key"
        )
    return user_id


async def list_models(request: web.Request) -> web.Response:
    settings = request.app[appkeys.SETTINGS]
    data = [
        {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "cocoon",
            "context_length": price.context_length,
            "pricing": {
                "unit": "nanoTON per 1M tokens",
                "prompt": str(price.prompt),
                "cached_prompt": str(price.cached_prompt),
                "completion": str(price.completion),
            },
        }
        for name, price in sorted(settings.models.items())
    ]
    return web.json_response({"object": "list", "data": data})


def conversation_id_for(user_id: int, messages: list[ChatMessage]) -> str:
    """Turns of one API conversation share their opening messages: route them to one worker so
    its prefix cache hits. Bound to the user, so nothing is shared across users."""
    digest = hashlib.sha256(str(user_id).encode())
    for message in messages[:2]:
        digest.update(b"\0" + message.role.encode() + b"\0" + message.content.encode())
    return "api-" + digest.hexdigest()[:32]


async def chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        user_id = await _authenticate(request)
        body = await _parse_body(request)
        messages = [m.to_wire() for m in body.messages]
        turn_request = TurnRequest(
            user_id=user_id,
            model=body.model,
            messages=messages,
            max_tokens=body.max_completion_tokens or body.max_tokens,
            sampling=SamplingParams(
                temperature=body.temperature,
                top_p=body.top_p,
                stop=body.stop or [],
                seed=body.seed,
            ),
            conversation_id=conversation_id_for(user_id, messages),
        )
        turn = await request.app[appkeys.DISPATCHER].start_turn(turn_request)
    except ApiError as error:
        return error.response()
    except TurnError as error:
        return _turn_error(error).response()
    except ValidationError as error:
        return _validation_error(error).response()

    completion_id = f"chatcmpl-{turn.turn_id}"
    created = int(time.time())
    if not body.stream:
        parts: list[str] = []
        done: TurnDone | None = None
        try:
            async for event in turn.events():
                if isinstance(event, TurnText):
                    parts.append(event.text)
                else:
                    done = event
        except TurnError as error:
            return _turn_error(error).response()
        assert done is not None  # events() ends with TurnDone or raises
        return web.json_response(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(parts)},
                        "finish_reason": _finish(done),
                    }
                ],
                "usage": _usage(done),
                "cocoon": _cocoon_extra(done),
            }
        )

    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    async def send(payload: dict[str, Any]) -> None:
        await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

    await send(chunk({"role": "assistant", "content": ""}))
    try:
        async for event in turn.events():
            if isinstance(event, TurnText):
                await send(chunk({"content": event.text}))
                continue
            await send(chunk({}, _finish(event)))
            if body.stream_options and body.stream_options.include_usage:
                final = chunk({})
                final["choices"] = []
                final["usage"] = _usage(event)
                final["cocoon"] = _cocoon_extra(event)
                await send(final)
    except TurnError as error:
        api_error = _turn_error(error)
        await send(
            {"error": {"message": str(api_error), "type": api_error.type, "code": api_error.code}}
        )
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _parse_body(request: web.Request) -> ChatCompletionRequest:
    if request.content_length and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, "request body too large", "invalid_request_error", "body_too_large")
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(
            400, "the body is not valid JSON", "invalid_request_error", "invalid_json"
        ) from None
    return ChatCompletionRequest.model_validate(raw)


def _validation_error(error: ValidationError) -> ApiError:
    first = error.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return ApiError(
        400, f"{param}: {first['msg']}", "invalid_request_error", "invalid_request", param
    )


def _finish(done: TurnDone) -> str:
    return "stop" if done.finish_reason == "cancelled" else done.finish_reason


def _usage(done: TurnDone) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_prompt_tokens},
    }


def _cocoon_extra(done: TurnDone) -> dict[str, Any]:
    """What OpenAI's schema has no place for: the price paid and who served the turn."""
    return {
        "cost_nanoton": str(done.cost),
        "worker": {
            "tee": done.worker.tee,
            "key_fingerprint": done.worker.key_fingerprint,
            "engine": done.worker.engine,
            "usage_signature_verified": done.worker.usage_signature_verified,
        },
    }


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/chat/completions", chat_completions)
