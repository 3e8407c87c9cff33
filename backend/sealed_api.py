"""The HTTP side of sealed turns and receipts (API keys, OpenAI-shaped errors):

``POST /v1/sealed/chat/completions`` — a turn the client sealed itself (:mod:`backend.sealed`):

    {"model": M, "worker_id": W, "job_id": "<W>_<32 hex>-1", "max_tokens": N,
     "sealed_request": "<base64 sealed box>", "stream": true}

Streamed (the default) as Server-Sent Events, ``data: <json>`` each:
``{"object": "cocoon.sealed.start", "id": "chatcmpl-<turn>", "job_id", "worker_id"}``, then one
``{"object": "cocoon.sealed.event", "sealed": "<base64>", "last": bool}`` per stream entry,
sealed to the client's reply key, then ``{"object": "cocoon.receipt", "receipt": {...},
"cost_nanoton", "usage": {...}}``, then ``data: [DONE]``; a failure is ``{"error": {...}}``
before ``[DONE]``.
With ``"stream": false``, one JSON object: ``{"id", "job_id", "worker_id", "events":
["<base64>", ...], "receipt", "cost_nanoton", "usage"}``.

``GET /v1/receipts/{id}`` — the receipt of turn ``id`` (or ``chatcmpl-<id>``), to its owner
only (404 for anyone else's, as for one that does not exist).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backend import appkeys
from backend.dispatch import TurnDone
from backend.errors import CocoonError, ErrorCode
from backend.openai_api import limits
from backend.openai_api import protocol as p
from backend.openai_api.service import OpenAIService, bearer_key
from backend.receipts import load_receipt
from backend.sealed import SealedEvent, SealedRequest, SealedTurn, start_sealed_turn
from workers.registry import WORKER_ID_PATTERN
from workers.wire import MAX_SEALED_BYTES

__all__ = ["SealedCompletionRequest", "relay", "setup_routes"]

MAX_SEALED_B64 = (MAX_SEALED_BYTES // 3 + 1) * 4


class SealedCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    worker_id: str = Field(pattern=WORKER_ID_PATTERN)
    job_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    max_tokens: int = Field(ge=1, le=1_000_000)
    sealed_request: str = Field(min_length=1, max_length=MAX_SEALED_B64)
    stream: bool = True


def _service(request: web.Request) -> OpenAIService:
    app = request.app
    return OpenAIService(app[appkeys.SETTINGS], app[appkeys.DATABASE], app[appkeys.DISPATCHER])


def _error(error: CocoonError) -> web.Response:
    return web.json_response(p.error_body(error), status=p.error_status(error))


async def _body(request: web.Request) -> SealedCompletionRequest:
    if request.content_length and request.content_length > p.MAX_BODY_BYTES:
        raise p.ApiError(ErrorCode.BODY_TOO_LARGE, "request body too large")
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise p.ApiError(ErrorCode.INVALID_JSON, "the body is not valid JSON") from None
    return SealedCompletionRequest.model_validate(raw)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _ending(done: TurnDone) -> dict[str, Any]:
    return {
        "object": "cocoon.receipt",
        "receipt": done.receipt.model_dump(mode="json") if done.receipt else None,
        "cost_nanoton": str(done.cost),
        "usage": {
            "prompt_tokens": done.prompt_tokens,
            "cached_prompt_tokens": done.cached_prompt_tokens,
            "completion_tokens": done.completion_tokens,
        },
        "finish_reason": done.finish_reason,
    }


async def sealed_completions(request: web.Request) -> web.StreamResponse:
    """A sealed turn, within the same per-user and per-key limits as every API turn."""
    service = _service(request)
    dispatcher = service.dispatcher
    try:
        api_key = bearer_key(request.headers.get("Authorization"))
        user_id = await service.authenticate(request.headers.get("Authorization"))
        body = await _body(request)
        try:
            sealed = base64.b64decode(body.sealed_request, validate=True)
        except (binascii.Error, ValueError):
            raise p.ApiError(
                ErrorCode.INVALID_REQUEST, "sealed_request is not base64", param="sealed_request"
            ) from None
        lease_s = dispatcher.queue_ttl_s + dispatcher.job_timeout_s + dispatcher.deadline_grace_s
        async with limits.turn_limits(
            dispatcher.redis, service.settings, user_id, api_key, lease_s=lease_s
        ):
            turn = await start_sealed_turn(
                dispatcher,
                SealedRequest(
                    user_id, body.model, body.worker_id, body.job_id, body.max_tokens, sealed
                ),
            )
            return await relay(request, turn, body.stream)
    except CocoonError as error:
        return _error(error)
    except ValidationError as error:
        return _error(p.invalid_request(error))


async def relay(request: web.Request, turn: SealedTurn, stream: bool) -> web.StreamResponse:
    """Answer a started sealed turn as the module doc says (the Mini App's sealed chat too)."""
    head = {"id": f"chatcmpl-{turn.turn_id}", "job_id": turn.job_id, "worker_id": turn.wanted}
    if not stream:
        events: list[str] = []
        try:
            async with contextlib.aclosing(turn.sealed_events()) as entries:
                async for event in entries:
                    if isinstance(event, SealedEvent):
                        events.append(_b64(event.data))
                    else:
                        return web.json_response({**head, "events": events, **_ending(event)})
        except CocoonError as error:
            status = p.error_status(error)
            return web.json_response(
                {**head, "events": events, **p.error_body(error)}, status=status
            )
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    try:
        await response.prepare(request)
        await response.write(p.sse({"object": "cocoon.sealed.start", **head}))
    except BaseException as error:
        # Nothing reached the client (it left): the entries will never be read, so nothing
        # else would end the turn but the sweeper. Its hold comes back now.
        await turn.end_unread()
        if isinstance(error, ConnectionResetError):
            return response
        raise
    try:
        # Closed however the handler ends: a client that left hands the turn to a settling task.
        async with contextlib.aclosing(turn.sealed_events()) as entries:
            async for event in entries:
                if isinstance(event, SealedEvent):
                    sealed_event = {"object": "cocoon.sealed.event", "sealed": _b64(event.data)}
                    await response.write(p.sse({**sealed_event, "last": event.last}))
                else:
                    await response.write(p.sse(_ending(event)))
    except CocoonError as error:
        await response.write(p.sse(p.error_body(error, with_param=False)))
    await response.write(p.SSE_DONE)
    await response.write_eof()
    return response


async def get_receipt(request: web.Request) -> web.Response:
    service = _service(request)
    try:
        user_id = await service.authenticate(request.headers.get("Authorization"))
    except CocoonError as error:
        return _error(error)
    record = await load_receipt(service.db, user_id, request.match_info["receipt_id"])
    if record is None:
        missing = p.ApiError(ErrorCode.NOT_FOUND, "no receipt of yours has this id")
        return web.json_response(p.error_body(missing), status=404)
    return web.json_response(record.model_dump(mode="json"))


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/sealed/chat/completions", sealed_completions)
    app.router.add_get("/v1/receipts/{receipt_id}", get_receipt)
