"""Helpers shared by the end-to-end turn tests (llama-cpp and vLLM): a dispatcher over the test
settings and Redis, funded users, and the holds still open."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import redis
import redis.asyncio as aioredis
from sqlalchemy import select

from backend.attestation.settings import AttestationSettings
from backend.db import Database
from backend.dispatch import Dispatcher, Turn, TurnDone, TurnText
from backend.ledger import Ledger
from backend.models import Hold, HoldState
from backend.settings import Settings
from backend.users import get_or_create_user

TON = 1_000_000_000


@contextlib.asynccontextmanager
async def dev_stack(
    settings: Settings, redis_url: str, *, first_token_timeout_s: float, idle_timeout_s: float
) -> AsyncIterator[tuple[Dispatcher, Ledger]]:
    """A dispatcher and ledger on a fresh database. The tests' nodes register directly
    (unattested dev workers), so dev mode is on: they are dispatched only then."""
    settings = settings.model_copy(update={"attestation": AttestationSettings(allow_dev=True)})
    db = Database.from_settings(settings)
    await db.upgrade()
    ledger = Ledger(db)
    dispatcher = Dispatcher(
        settings,
        ledger,
        aioredis.Redis.from_url(redis_url),
        redis.Redis.from_url(redis_url),
        first_token_timeout_s=first_token_timeout_s,
        idle_timeout_s=idle_timeout_s,
    )
    try:
        yield dispatcher, ledger
    finally:
        await dispatcher.close()
        await db.close()


async def funded_user(ledger: Ledger, telegram_id: int, amount: int = TON) -> int:
    user = await get_or_create_user(ledger.db, telegram_id)
    if amount:
        await ledger.credit_deposit(user.id, amount, f"dep:{telegram_id}")
    return user.id


async def open_holds(ledger: Ledger) -> list[Hold]:
    async with ledger.db.session() as session:
        return list(await session.scalars(select(Hold).where(Hold.state == HoldState.OPEN)))


async def cancel_after(turn: Turn, chunks: int) -> TurnDone | None:
    """Read a turn to its end, pressing stop once ``chunks`` text chunks have arrived; the
    turn's final event (None if it ended without one)."""
    seen = 0
    done: TurnDone | None = None
    async for event in turn.events():
        if isinstance(event, TurnText):
            seen += 1
            if seen == chunks:
                await turn.cancel()
        else:
            done = event
    return done
