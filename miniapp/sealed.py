"""The Mini App's sealed chat (issue 13): the page seals each turn itself, the server relays it.

The page (``static/sealed.js``, libsodium from ``libsodium-wrappers``) fetches the public
attestation report with a fresh nonce, checks it in the browser, seals the request to the
worker's attested key with a reply key of its own, and posts it here with its ``initData``:

    POST /app/api/sealed/chat   {"model", "worker_id", "job_id", "max_tokens", "sealed_request"}

The answer is the sealed API's stream (:func:`backend.sealed_api.relay`: Server-Sent Events,
the sealed entries, then the receipt), so this process sees the model, the bound, sizes and
ciphertext, never the text; the conversation stays in the page. The turn is held, billed from
the worker's receipt and rate-limited like every Mini App turn.
"""

from __future__ import annotations

import base64
import binascii

from aiohttp import web

from backend import appkeys
from backend.errors import ErrorCode
from backend.ratelimit import RateLimiter
from backend.sealed import SealedRequest, start_sealed_turn
from backend.sealed_api import SealedCompletionRequest, relay
from miniapp.service import Caller, MiniAppError

__all__ = ["SealedCompletionRequest", "post_sealed_chat"]


async def post_sealed_chat(
    request: web.Request, caller: Caller, body: SealedCompletionRequest
) -> web.StreamResponse:
    """Start the page's sealed turn and relay it (the route wraps it: initData, the body)."""
    try:
        sealed = base64.b64decode(body.sealed_request, validate=True)
    except (binascii.Error, ValueError):
        raise MiniAppError(ErrorCode.INVALID_REQUEST, "sealed_request") from None
    dispatcher = request.app[appkeys.DISPATCHER]
    settings = dispatcher.settings
    wait = await RateLimiter(dispatcher.redis, settings.rate_limit_per_minute).allow(caller.user.id)
    if wait:
        raise MiniAppError(ErrorCode.RATE_LIMITED, retry_after=wait)
    turn = await start_sealed_turn(
        dispatcher,
        SealedRequest(
            caller.user.id, body.model, body.worker_id, body.job_id, body.max_tokens, sealed
        ),
    )
    return await relay(request, turn, stream=True)
