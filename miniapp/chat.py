"""The Mini App's chat turn as it streams to the page: NDJSON lines, ``{"type": "start",
"turn"}`` (the token ``POST /app/api/chat/stop`` takes), ``{"type": "text", "text"}``…, then
one ``{"type": "done", ...}`` (cost, tokens, privacy report) or ``{"type": "error", ...}``.

A turn ends here in every case: read to its end (settled), stopped or left by the page while
it streams (billed for what was generated, in the background), or never started because the
response could not be (the hold given back at once, not left to the sweeper).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from backend.dispatch import Turn, TurnDone, TurnError, TurnText
from miniapp import protocol as p
from miniapp.service import Caller, MiniApp

log = logging.getLogger("cocoon.miniapp")

ErrorLine = Callable[[TurnError], dict[str, Any]]


async def stream_turn(
    request: web.Request, service: MiniApp, caller: Caller, turn: Turn, error_line: ErrorLine
) -> web.StreamResponse:
    """Stream ``turn`` to the page; ``error_line`` puts a refusal in the page's words."""
    token = service.track(caller, turn)
    response = web.StreamResponse(
        headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"}
    )

    async def send(line: dict[str, Any]) -> None:
        await response.write(json.dumps(line).encode() + b"\n")

    try:
        await response.prepare(request)
        await send({"type": "start", "turn": token})
    except BaseException as error:
        # Not a line reached the page (it left, or the response broke): the turn's events
        # were never read, so nothing else would end it but the sweeper. End it now.
        await service.drop_unread(token, turn)
        if isinstance(error, ConnectionResetError):
            log.info("mini app chat: the page left before the reply started")
            return response
        raise
    events = turn.events()
    try:
        async with contextlib.aclosing(events):  # a client that leaves cancels the turn
            async for event in events:
                if isinstance(event, TurnText):
                    await send({"type": "text", "text": event.text})
                elif isinstance(event, TurnDone):
                    done = p.ChatDone(
                        model=event.model,
                        prompt_tokens=event.prompt_tokens,
                        completion_tokens=event.completion_tokens,
                        finish_reason=event.finish_reason,
                        cost=str(event.cost),
                        balance=str(await service.balance(caller)),
                        privacy=await service.privacy(event),
                    )
                    await send(done.model_dump(mode="json"))
        await response.write_eof()
    except TurnError as error:  # the turn ended itself (its hold settled or released)
        with contextlib.suppress(ConnectionResetError):  # the page may be gone too
            await send({"type": "error", **error_line(error)})
            await response.write_eof()
    except ConnectionResetError:  # the page went away: its turn was stopped and billed above
        log.info("mini app chat: the page left before the reply ended")
    finally:
        service.untrack(token)
    return response
