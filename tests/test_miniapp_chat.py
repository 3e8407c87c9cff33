"""The Mini App's chat turn when the page is gone before its reply starts (cocoon web served
as `cocoon web` serves it, a real socket that closes after its request, the real ledger on
SQLite and PostgreSQL, Redis): the turn's hold comes back as the request ends, not when the
sweeper comes by 15 minutes later."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from aiohttp import web
from sqlalchemy import select

from backend import appkeys
from backend.db import Database
from backend.ledger import Ledger
from backend.models import Hold, HoldState
from backend.settings import AttestationSettings, Settings
from backend.users import get_or_create_user
from backend.web import create_app
from tests.support.attest import worker_info
from tests.support.miniapp_helpers import TON, app_settings, init_data
from workers import registry, streams
from workers.wire import WorkerKeys

ALICE = 7101
MODEL = "smollm2-135m"
BUSY_JOB = "someone-elses-job"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Wait for ``condition`` (a bound for a broken build only: never a timing assertion)."""
    async with asyncio.timeout(30):
        while not await condition():  # noqa: ASYNC110 (a database row, a socket: no event to wait on)
            await asyncio.sleep(0.02)


async def holds_of(db: Database, user_id: int) -> list[HoldState]:
    async with db.session() as session:
        return list(await session.scalars(select(Hold.state).where(Hold.user_id == user_id)))


async def test_a_page_that_leaves_before_the_reply_starts_gets_its_hold_back_at_once(
    settings: Settings, db_url: str, redis_url: str
) -> None:
    configured = app_settings(settings, db_url, attestation=AttestationSettings(allow_dev=True))
    app = create_app(configured)
    seen: list[web.Request] = []
    ended = asyncio.Event()  # cocoon web finished the chat request

    @web.middleware
    async def watch(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append(request)
        try:
            return await handler(request)
        finally:
            if request.path == "/app/api/chat":
                ended.set()

    app.middlewares.append(watch)
    # Served as backend.web.start_web serves it: a handler is not cancelled when its client
    # goes away (aiohttp's TestServer would cancel it), it finds out when it answers.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        db = app[appkeys.DATABASE]
        await db.upgrade()
        ledger: Ledger = app[appkeys.LEDGER]
        user = await get_or_create_user(db, ALICE)
        await ledger.credit_deposit(user.id, TON, "dep:leaves")
        # The model's one worker is busy: the turn is held and waits for its slot.
        redis = app[appkeys.DISPATCHER].redis
        info = worker_info("w-busy", WorkerKeys.generate(), model=MODEL, capacity=1)
        await registry.register(redis, info, ttl_s=30)
        assert await registry.reserve_slot(redis, "w-busy", BUSY_JOB, ttl_s=60)

        body = json.dumps(
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "Hello"}],
                "conversation": "c0nversation-1",
            }
        ).encode()
        head = (
            f"POST /app/api/chat HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: tma {init_data(ALICE)}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        _reader, writer = await asyncio.open_connection(host, port)
        writer.write(head + body)
        await writer.drain()

        async def held() -> bool:
            return await holds_of(db, user.id) == [HoldState.OPEN]

        await until(held)
        writer.close()  # the page is gone (a closed tab, a lost network) before any answer
        await writer.wait_closed()

        async def connection_gone() -> bool:
            return seen[-1].transport is None

        await until(connection_gone)
        await registry.release_slot(redis, "w-busy", BUSY_JOB)  # the turn gets its worker
        async with asyncio.timeout(30):  # a bound for a broken build only
            await ended.wait()

        balances = await ledger.balances(user.id)
        assert balances.available == TON and balances.held == 0  # back now, no sweeper
        assert await holds_of(db, user.id) == [HoldState.RELEASED]  # nothing charged
        assert await redis.keys(streams.cancel_key("*")), "the worker is told not to run it"
    finally:
        await runner.cleanup()
