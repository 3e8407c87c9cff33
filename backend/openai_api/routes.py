"""The OpenAI-compatible API's HTTP side: ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/chat/completions`` (JSON, or Server-Sent Events with ``stream``), ``POST
/v1/completions`` (:mod:`backend.openai_api.text_completions`), ``POST /v1/responses``
(:mod:`backend.openai_api.responses`) and ``GET /health``.
Thin: read the request, call :class:`~backend.openai_api.service.OpenAIService`, write the
answer (:mod:`backend.openai_api.completions`). What every answer carries (request id, CORS,
JSON errors): :mod:`backend.openai_api.edge`."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from aiohttp import web
from pydantic import ValidationError

from backend import appkeys
from backend.dispatch import Turn, TurnRequest
from backend.errors import CocoonError, ErrorCode
from backend.openai_api import (
    completions,
    edge,
    idempotency,
    limits,
    params,
    responses,
    text_completions,
)
from backend.openai_api import protocol as p
from backend.openai_api.service import OpenAIService, bearer_key

_B = TypeVar("_B", bound="_TextBody")

IDEMPOTENCY_WAIT_S = 60.0
"""How long a repeat waits for its key's first request to end before a 409."""


def _service(request: web.Request) -> OpenAIService:
    app = request.app
    return OpenAIService(app[appkeys.SETTINGS], app[appkeys.DATABASE], app[appkeys.DISPATCHER])


async def _read_body(request: web.Request) -> tuple[bytes, p.ChatCompletionRequest]:
    """The raw body and the request it holds: ``null`` read as defaults, every parameter that
    cannot be honoured refused by name."""
    raw, parsed = await _read_json(request)
    params.refuse_unsupported(parsed)
    return raw, p.ChatCompletionRequest.model_validate(parsed)


async def _read_json(request: web.Request) -> tuple[bytes, object]:
    """The raw body and its JSON, ``null`` read as defaults; ApiError for a body too large or
    not JSON."""
    if request.content_length and request.content_length > p.MAX_BODY_BYTES:
        raise p.ApiError(ErrorCode.BODY_TOO_LARGE, "request body too large", status=413)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise p.ApiError(ErrorCode.BODY_TOO_LARGE, "request body too large", status=413) from None
    try:
        parsed = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise p.ApiError(ErrorCode.INVALID_JSON, "the body is not valid JSON") from None
    return raw, params.drop_nulls(parsed)


async def list_models(request: web.Request) -> web.Response:
    return web.json_response(_service(request).models().model_dump())


async def get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model"]
    for card in _service(request).models().data:
        if card.id == model_id:
            return web.json_response(card.model_dump())
    refusal = p.ApiError(
        ErrorCode.UNKNOWN_MODEL, f"unknown model {model_id!r}; see GET /v1/models", param="model"
    )
    return completions.error_response(refusal)


async def health(request: web.Request) -> web.Response:
    """Liveness of the API for clients and probes: the models it offers and whether a worker
    serves each right now (from the dispatcher's registry snapshot; no request reads Redis)."""
    dispatcher = request.app[appkeys.DISPATCHER]
    workers = await dispatcher.workers.workers()
    serving = {w.model for w in workers}
    models = {name: name in serving for name in sorted(request.app[appkeys.SETTINGS].models)}
    return web.json_response({"status": "ok", "models": models})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    service = _service(request)
    settings = service.settings
    dispatcher = service.dispatcher
    try:
        api_key = bearer_key(request.headers.get("Authorization"))
        user_id = await service.authenticate(request.headers.get("Authorization"))
        raw, body = await _read_body(request)
        idem_key = idempotency.parse_key(request.headers.get(idempotency.HEADER))
        lease_s = dispatcher.queue_ttl_s + dispatcher.job_timeout_s + dispatcher.deadline_grace_s
        idem = None
        if idem_key is not None:
            idem = idempotency.IdempotencyKey(
                dispatcher.redis,
                user_id,
                api_key,
                idem_key,
                raw,
                ttl_s=settings.api_idempotency_ttl_s,
                running_ttl_s=int(lease_s + settings.api_queue_timeout_s),
            )
            kept = await idem.begin(IDEMPOTENCY_WAIT_S)
            if kept is not None:
                return await completions.replay(request, body, kept)
    except CocoonError as error:  # ApiError, TurnError
        return completions.error_response(error)
    except ValidationError as error:
        return completions.error_response(p.invalid_request(error))
    try:
        async with limits.turn_limits(
            dispatcher.redis, settings, user_id, api_key, lease_s=lease_s
        ):
            turn = await service.start(user_id, body)
            return await completions.answer(request, service, body, turn, idem)
    except (CocoonError, ValidationError) as error:  # the limits, a turn that did not start
        if idem is not None:
            await idem.abandon()
        if isinstance(error, ValidationError):
            return completions.error_response(p.invalid_request(error))
        return completions.error_response(error)


class _TextBody(Protocol):
    def turn(self, user_id: int) -> TurnRequest: ...


async def _text_turn(
    request: web.Request,
    endpoint: str,
    parse: Callable[[object], _B],
    answer: Callable[[web.Request, OpenAIService, _B, Turn], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """A turn of ``/v1/completions`` or ``/v1/responses``: the key, the body (``parse``), the
    limits, the turn, then ``answer``; no ``Idempotency-Key`` (kept results are chat's)."""
    service = _service(request)
    dispatcher = service.dispatcher
    try:
        api_key = bearer_key(request.headers.get("Authorization"))
        user_id = await service.authenticate(request.headers.get("Authorization"))
        _, parsed = await _read_json(request)
        body = parse(parsed)
        if request.headers.get(idempotency.HEADER) is not None:
            message = f"{idempotency.HEADER} is not supported on {endpoint}"
            raise p.ApiError(ErrorCode.INVALID_REQUEST, message)
        lease_s = dispatcher.queue_ttl_s + dispatcher.job_timeout_s + dispatcher.deadline_grace_s
        async with limits.turn_limits(
            dispatcher.redis, service.settings, user_id, api_key, lease_s=lease_s
        ):
            turn = await dispatcher.start_turn(body.turn(user_id))
            return await answer(request, service, body, turn)
    except CocoonError as error:  # ApiError, TurnError, the limits
        return completions.error_response(error)
    except ValidationError as error:
        return completions.error_response(p.invalid_request(error))


async def legacy_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``: :mod:`backend.openai_api.text_completions`."""
    return await _text_turn(
        request, "/v1/completions", text_completions.parse, text_completions.answer
    )


async def create_response(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``: :mod:`backend.openai_api.responses`."""
    return await _text_turn(request, "/v1/responses", responses.parse, responses.answer)


def setup_routes(app: web.Application) -> None:
    edge.setup(app)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", legacy_completions)
    app.router.add_post("/v1/responses", create_response)
