"""The Mini App's chat turns when the page is gone before the reply starts (cocoon web served
as `cocoon web` serves it, a real socket that closes after its request, the real ledger,
Redis): the turn's hold comes back as the request ends, not when the sweeper comes by 15
minutes later. Both chats: the one the server seals, and the one the page seals itself."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from sqlalchemy import select, text

from backend import appkeys
from backend.db import Database
from backend.ledger import Ledger
from backend.models import Account, AccountKind, Hold, HoldState
from backend.settings import AttestationSettings, Settings
from backend.users import get_or_create_user
from backend.web import create_app
from tests.support.attest import worker_info
from tests.support.miniapp_helpers import TON, app_settings, init_data
from workers import registry, streams
from workers.wire import WorkerKeys

ALICE = 7101
MODEL = "smollm2-135m"
WORKER = "w-one"
BUSY_JOB = "someone-elses-job"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Wait for ``condition`` (a bound for a broken build only: never a timing assertion)."""
    async with asyncio.timeout(30):
        while not await condition():  # noqa: ASYNC110 (a row, a socket: no event to wait on)
            await asyncio.sleep(0.02)


@dataclass
class Web:
    app: web.Application
    host: str
    port: int
    user_id: int
    seen: list[web.Request] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def db(self) -> Database:
        return self.app[appkeys.DATABASE]

    @property
    def ledger(self) -> Ledger:
        return self.app[appkeys.LEDGER]

    async def holds(self) -> list[HoldState]:
        async with self.db.session() as session:
            return list(
                await session.scalars(select(Hold.state).where(Hold.user_id == self.user_id))
            )

    async def post_and_leave(
        self, path: str, body: dict[str, Any], before_leaving: Callable[[], Awaitable[bool]]
    ) -> None:
        """POST ``body`` on a socket of its own, close it once ``before_leaving`` holds, and
        return when cocoon web has seen the close."""
        raw = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: tma {init_data(ALICE)}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n"
        ).encode()
        _reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(head + raw)
        await writer.drain()
        await until(before_leaving)
        writer.close()  # the page is gone (a closed tab, a lost network) before any answer
        await writer.wait_closed()

        async def connection_gone() -> bool:
            return self.seen[-1].transport is None

        await until(connection_gone)


@contextlib.asynccontextmanager
async def serving(settings: Settings, db_url: str) -> AsyncIterator[Web]:
    """cocoon web as backend.web.start_web serves it (a handler is not cancelled when its
    client goes away, as aiohttp's TestServer would: it finds out when it answers), a funded
    user, and the model's one worker online (its registry entry: it never answers)."""
    configured = app_settings(settings, db_url, attestation=AttestationSettings(allow_dev=True))
    database = Database(db_url)  # migrated before it serves, as `cocoon web` finds it
    try:
        await database.upgrade()
    finally:
        await database.close()
    app = create_app(configured)
    seen: list[web.Request] = []
    ended = asyncio.Event()  # cocoon web finished the chat request

    @web.middleware
    async def watch(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append(request)
        try:
            return await handler(request)
        finally:
            if request.path.startswith("/app/api/") and request.path.endswith("chat"):
                ended.set()

    app.middlewares.append(watch)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        user = await get_or_create_user(app[appkeys.DATABASE], ALICE)
        await app[appkeys.LEDGER].credit_deposit(user.id, TON, "dep:leaves")
        info = worker_info(WORKER, WorkerKeys.generate(), model=MODEL, capacity=1)
        await registry.register(app[appkeys.DISPATCHER].redis, info, ttl_s=30)
        # The dispatcher picks from its copy of the registry, read at start: a worker that came
        # since is dispatched to once the copy is read again. Read it now, as the bench does;
        # else a turn can be told no worker serves the model, and its hold never waits.
        await app[appkeys.DISPATCHER].workers.refresh()
        yield Web(app, host, port, user.id, seen, ended)
    finally:
        await runner.cleanup()


async def assert_given_back(server: Web) -> None:
    async with asyncio.timeout(30):  # a bound for a broken build only
        await server.ended.wait()
    balances = await server.ledger.balances(server.user_id)
    assert balances.available == TON and balances.held == 0  # back now, no sweeper
    assert await server.holds() == [HoldState.RELEASED]  # nothing charged
    redis = server.app[appkeys.DISPATCHER].redis
    assert await redis.keys(streams.cancel_key("*")), "the worker is told not to run it"


async def test_a_page_that_leaves_before_the_reply_starts_gets_its_hold_back_at_once(
    settings: Settings, db_url: str, redis_url: str
) -> None:
    async with serving(settings, db_url) as server:
        # The model's one worker is busy: the turn is held and waits for its slot.
        redis = server.app[appkeys.DISPATCHER].redis
        assert await registry.reserve_slot(redis, WORKER, BUSY_JOB, ttl_s=60)

        async def held() -> bool:
            return await server.holds() == [HoldState.OPEN]

        chat = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hello"}],
            "conversation": "c0nversation-1",
        }
        await server.post_and_leave("/app/api/chat", chat, held)
        await registry.release_slot(redis, WORKER, BUSY_JOB)  # the turn gets its worker
        await assert_given_back(server)


async def test_a_sealed_chat_whose_page_leaves_before_the_reply_gets_its_hold_back(
    settings: Settings, postgres_url: str, redis_url: str
) -> None:
    """The page's own sealed turn (miniapp/sealed.py, backend.sealed_api.relay). The turn
    is kept between the page's request and its answer by a lock on the user's balance row
    (PostgreSQL's), so the page is surely gone when cocoon web answers."""
    async with serving(settings, postgres_url) as server:
        locker = Database(postgres_url)
        try:
            async with locker.session() as session, session.begin():
                await session.execute(
                    select(Account)
                    .where(Account.kind == AccountKind.USER, Account.owner_id == server.user_id)
                    .with_for_update()
                )

                async def hold_waits() -> bool:  # cocoon web read the request and holds now
                    waiting = await session.execute(
                        text(
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                            "'Lock' AND datname = current_database()"
                        )
                    )
                    return bool(waiting.scalar_one())

                sealed = {
                    "model": MODEL,
                    "worker_id": WORKER,
                    "job_id": f"{WORKER}_{secrets.token_hex(16)}-1",
                    "max_tokens": 64,
                    "sealed_request": base64.b64encode(secrets.token_bytes(200)).decode(),
                }
                await server.post_and_leave("/app/api/sealed/chat", sealed, hold_waits)
            # The lock is gone: the turn is held, dispatched, and finds the page gone.
            await assert_given_back(server)
        finally:
            await locker.close()
