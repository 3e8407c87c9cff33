"""The probes of bench/bot_load.py: the stand-in Telegram in its own process (recording each
call and delivering the burst of webhook updates), and the timestamps taken in the bot's process
(arrival, dispatch, end, and the waits that are not the bot's own work)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
from aiohttp import web

from backend import appkeys

HOOK = "/telegram/webhook"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
WEBHOOK_CONNECTIONS = 100  # Telegram's most (setWebhook max_connections)

# ------------------------------------------------------------------ Telegram, its own process


def telegram_process(ready: Any) -> None:
    asyncio.run(_telegram(ready))


async def _telegram(ready: Any) -> None:
    """The stand-in Bot API server, recording when each call came and how it was answered,
    with two control routes: deliver updates to a webhook, and report what was called."""
    from tests.support.fake_telegram import FakeTelegram

    tg = FakeTelegram()
    log: list[dict[str, Any]] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        at = time.monotonic()
        response = await handler(request)
        if request.path.startswith("/bot"):
            params = await tg._params(request)
            entry = {
                "at": at,
                "method": request.match_info.get("method", ""),
                "chat": params.get("chat_id"),
                "text": params.get("text"),
                "status": response.status,
            }
            if response.status == 429:
                body = json.loads(response.text or "{}")
                entry["retry_after"] = body.get("parameters", {}).get("retry_after", 0)
            log.append(entry)
        return response

    async def deliver(request: web.Request) -> web.Response:
        body = await request.json()
        for update in body["updates"]:
            tg.saw(update)
        connector = aiohttp.TCPConnector(limit=WEBHOOK_CONNECTIONS)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def one(update: dict[str, Any]) -> int:
                headers = {SECRET_HEADER: body["secret"]}
                async with http.post(body["url"], json=update, headers=headers) as reply:
                    await reply.read()
                    return reply.status

            started = time.monotonic()
            statuses = await asyncio.gather(*(one(u) for u in body["updates"]))
        return web.json_response({"statuses": statuses, "delivered_s": time.monotonic() - started})

    async def report(_request: web.Request) -> web.Response:
        return web.json_response({"log": log, "refused": tg.refused})

    tg.app.middlewares.append(record)
    tg.app.router.add_post("/_deliver", deliver)
    tg.app.router.add_get("/_report", report)
    url = await tg.start()
    ready.put(url)
    await asyncio.Event().wait()


# ------------------------------------------------------------------ the bot's process


UPDATE: contextvars.ContextVar[int] = contextvars.ContextVar("bench_update", default=0)


class Timings:
    """Per update: arrival, dispatch, end, and the waits that are not the bot's own work."""

    def __init__(self) -> None:
        self.arrived: dict[int, float] = {}
        self.dispatched: dict[int, float] = {}
        self.ended: dict[int, float] = {}
        self.inference: dict[int, float] = defaultdict(float)
        self.paced: dict[int, float] = defaultdict(float)
        self.queued: dict[int, float] = defaultdict(float)
        self.bare: list[float] = []
        self.busy: dict[int, float] = defaultdict(float)
        self.cpu: dict[int, float] = defaultdict(float)

    @contextlib.contextmanager
    def counting_busy_time(self) -> Iterator[None]:
        """Count the event loop's time in each callback toward the update whose context it
        runs in: an update's own work, without its waits for others (asyncio's ``Handle``); in
        wall time (``busy``, which a loaded machine stretches) and in the thread's CPU time
        (``cpu``)."""
        original = asyncio.events.Handle._run
        busy, cpu = self.busy, self.cpu

        def _run(handle: asyncio.Handle) -> None:
            started, started_cpu = time.perf_counter(), time.thread_time()
            try:
                original(handle)
            finally:
                update = handle._context.get(UPDATE, 0)  # type: ignore[attr-defined]
                if update:
                    busy[update] += time.perf_counter() - started
                    cpu[update] += time.thread_time() - started_cpu

        asyncio.events.Handle._run = _run  # type: ignore[method-assign]
        try:
            yield
        finally:
            asyncio.events.Handle._run = original  # type: ignore[method-assign]

    def handler_s(self) -> list[float]:
        return [
            self.ended[u] - self.arrived[u] - self.inference[u] - self.paced[u] - self.queued[u]
            for u in self.ended
            if u in self.arrived
        ]

    def dispatch_s(self) -> list[float]:
        return [self.dispatched[u] - self.arrived[u] for u in self.dispatched if u in self.arrived]


def instrument(app: web.Application, timings: Timings) -> None:
    """Timestamps at the webhook's arrival, the update's end, the turn's dispatch, and around
    each wait for the turn's events, for a send moment or for the bot's admission of the update
    (no production code changes)."""

    @web.middleware
    async def arrival(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/bare":
            arrived = time.perf_counter()
            response = await handler(request)
            timings.bare.append(time.perf_counter() - arrived)
            return response
        if request.path == HOOK:
            arrived = time.perf_counter()
            update = await request.json()
            timings.arrived[int(update["update_id"])] = arrived
            # The update's handling (a task of its own) inherits this context: all of its work
            # counts toward it, from the request's parsing on.
            token = UPDATE.set(int(update["update_id"]))
            try:
                return await handler(request)
            finally:
                UPDATE.reset(token)
        return await handler(request)

    app.middlewares.append(arrival)

    async def hooked(app: web.Application) -> AsyncIterator[None]:
        from bot.webhook import HANDLER

        handler = app[HANDLER]

        async def ended(call: Any, event: Any, data: dict[str, Any]) -> Any:
            try:
                return await call(event, data)
            finally:
                timings.ended[event.update_id] = time.perf_counter()

        handler.dispatcher.update.outer_middleware(ended)
        turns = app[appkeys.DISPATCHER]
        start_turn = turns.start_turn

        async def timed_start(request: Any) -> Any:
            turn = await start_turn(request)
            update = UPDATE.get()
            timings.dispatched[update] = time.perf_counter()
            events = turn.events

            async def timed_events() -> AsyncIterator[Any]:
                stream = events()
                while True:
                    waited = time.perf_counter()
                    try:
                        event = await stream.__anext__()
                    except StopAsyncIteration:
                        return
                    finally:
                        timings.inference[update] += time.perf_counter() - waited
                    yield event

            turn.events = timed_events
            return turn

        turns.start_turn = timed_start
        with (
            _timed(timings.paced, "bot.pacing", "SendPacer", "pace"),
            _timed(timings.paced, "bot.pacing", "SendPacer", "on_its_way"),
            _timed(timings.queued, "bot.admission", "InFlight", "admit"),
        ):
            yield

    app.cleanup_ctx.append(hooked)


@contextlib.contextmanager
def _timed(waits: dict[int, float], module: str, name: str, method: str) -> Iterator[None]:
    """Count the seconds ``module.name.method`` (a wait that answers the seconds it waited)
    waits toward the update it runs for, while the app runs; nothing where the bot has no such
    wait (the "before" of issue 19)."""
    try:
        owner = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        yield
        return
    original = getattr(owner, method)

    async def timed(self: Any, *args: Any) -> float:
        waited: float = await original(self, *args)
        waits[UPDATE.get()] += waited
        return waited

    setattr(owner, method, timed)
    try:
        yield
    finally:
        setattr(owner, method, original)
