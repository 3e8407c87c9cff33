"""The OpenAI-compatible API's HTTP side: ``GET /v1/models`` and ``POST /v1/chat/completions``
(JSON, or Server-Sent Events with ``stream``). Thin: read the request, call
:class:`~backend.openai_api.service.OpenAIService`, write the answer."""

from __future__ import annotations

import json
import time

from aiohttp import web
from pydantic import ValidationError

from backend import appkeys
from backend.dispatch import TurnError, TurnText
from backend.errors import CocoonError, ErrorCode
from backend.openai_api import protocol as p
from backend.openai_api.service import OpenAIService


def _service(request: web.Request) -> OpenAIService:
    app = request.app
    return OpenAIService(app[appkeys.SETTINGS], app[appkeys.DATABASE], app[appkeys.DISPATCHER])


def error_response(error: CocoonError) -> web.Response:
    return web.json_response(p.error_body(error), status=p.error_status(error))


async def _parse_body(request: web.Request) -> p.ChatCompletionRequest:
    if request.content_length and request.content_length > p.MAX_BODY_BYTES:
        raise p.ApiError(ErrorCode.BODY_TOO_LARGE, "request body too large")
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise p.ApiError(ErrorCode.INVALID_JSON, "the body is not valid JSON") from None
    return p.ChatCompletionRequest.model_validate(raw)


async def list_models(request: web.Request) -> web.Response:
    return web.json_response(_service(request).models().model_dump())


async def chat_completions(request: web.Request) -> web.StreamResponse:
    service = _service(request)
    try:
        user_id = await service.authenticate(request.headers.get("Authorization"))
        body = await _parse_body(request)
        turn = await service.start(user_id, body)
    except CocoonError as error:  # ApiError, TurnError
        return error_response(error)
    except ValidationError as error:
        return error_response(p.invalid_request(error))

    completion_id = f"chatcmpl-{turn.turn_id}"
    created = int(time.time())
    if not body.stream:
        try:
            text, done = await service.collect(turn)
        except TurnError as error:
            return error_response(error)
        record = await service.attestation(done)
        completion = p.ChatCompletion.of(completion_id, created, body.model, text, done, record)
        return web.json_response(completion.model_dump())

    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    chunks = p.ChunkStream(completion_id, created, body.model)
    await response.write(chunks.start())
    try:
        async for event in turn.events():
            if isinstance(event, TurnText):
                await response.write(chunks.text(event.text))
                continue
            await response.write(chunks.finish(event))
            if body.include_usage:
                await response.write(chunks.usage(event, await service.attestation(event)))
    except TurnError as error:
        await response.write(p.sse(p.error_body(error, with_param=False)))
    await response.write(p.SSE_DONE)
    await response.write_eof()
    return response


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/chat/completions", chat_completions)
