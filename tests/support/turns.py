"""Helpers shared by the end-to-end turn tests (llama-cpp and vLLM): a worker node process on the
real small model, a dispatcher over the test settings and Redis, funded users, the holds still
open, what a hold wrote, and what a turn's signed usage costs and who it pays; and a wallet
linked to a user as a checked ton_proof leaves it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import redis
import redis.asyncio as aioredis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.db import Database
from backend.dispatch import Dispatcher, Turn, TurnDone, TurnText
from backend.ledger import Ledger
from backend.metrics import TurnMetrics
from backend.models import Account, AccountKind, Entry, Hold, HoldState, TonWallet, Transaction
from backend.pricing import turn_cost
from backend.settings import DEFAULT_MODEL, AttestationSettings, Settings
from backend.users import get_or_create_user
from workers import registry

TON = 1_000_000_000


class Node:
    """A worker node process, as `cocoon worker` runs it."""

    def __init__(
        self,
        redis_url: str,
        *,
        provider_id: int | None = None,
        model: str = DEFAULT_MODEL,
        heartbeat: float = 0.5,
        ttl: int = 30,
        engine_options: Sequence[str] = (),
    ):
        """``ttl``: how long the registry keeps the node after its last heartbeat. Long by
        default: a node busy on a loaded machine never drops out between heartbeats, and no
        test waits for a dead node to expire (Redis is flushed after each test)."""
        self.worker_id = f"t-{uuid.uuid4().hex[:10]}"
        command = [
            sys.executable, "-m", "workers.node", "--model", model, "--engine", "llama-cpp",
            "--redis-url", redis_url, "--worker-id", self.worker_id, "--log-level", "WARNING",
            "--heartbeat", str(heartbeat), "--ttl", str(ttl),
        ]  # fmt: skip
        if provider_id is not None:
            command += ["--provider-id", str(provider_id)]
        for option in engine_options:  # name=value, e.g. chat_template=FILE
            command += ["--engine-option", option]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        client = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 60
        while not client.exists(registry.worker_key(self.worker_id)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the worker node did not start")
            time.sleep(0.1)
        client.close()

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


@contextlib.asynccontextmanager
async def dev_stack(
    settings: Settings,
    redis_url: str,
    *,
    first_token_timeout_s: float,
    idle_timeout_s: float,
    metrics: TurnMetrics | None = None,
) -> AsyncIterator[tuple[Dispatcher, Ledger]]:
    """A dispatcher (counting its turns on ``metrics``) and ledger on a fresh database. The
    tests' nodes register directly (unattested dev workers), so dev mode is on: they are
    dispatched only then."""
    settings = settings.model_copy(update={"attestation": AttestationSettings(allow_dev=True)})
    db = Database.from_settings(settings)
    await db.upgrade()
    ledger = Ledger(db)
    dispatcher = Dispatcher(
        settings,
        ledger,
        aioredis.Redis.from_url(redis_url),
        first_token_timeout_s=first_token_timeout_s,
        idle_timeout_s=idle_timeout_s,
        metrics=metrics,
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


async def add_wallet(
    db: Database, user_id: int, purpose: str, address: str, public_key: str
) -> None:
    """The wallet ``address`` linked to ``user_id`` for ``purpose`` ("user" or "payout"), as a
    checked ton_proof links it (no proof asked here)."""
    async with db.session() as session, session.begin():
        session.add(
            TonWallet(user_id=user_id, purpose=purpose, address=address, public_key=public_key)
        )


async def open_holds(ledger: Ledger) -> list[Hold]:
    async with ledger.db.session() as session:
        return list(await session.scalars(select(Hold).where(Hold.state == HoldState.OPEN)))


async def hold_rows(
    session: AsyncSession, hold_key: str, key: str
) -> tuple[Hold, Transaction, list[tuple[AccountKind, int]]]:
    """The hold ``hold_key``, the transaction of idempotency key ``key`` and its entries (each
    account's kind and amount, in order): what a hold or its close wrote."""
    hold = await session.scalar(select(Hold).where(Hold.key == hold_key))
    tx = await session.scalar(select(Transaction).where(Transaction.idempotency_key == key))
    assert hold is not None and tx is not None
    entries = [
        (AccountKind(kind), entry.amount)
        for entry, kind in await session.execute(
            select(Entry, Account.kind)
            .join(Account, Account.id == Entry.account_id)
            .where(Entry.transaction_id == tx.id)
            .order_by(Entry.id)
        )
    ]
    return hold, tx, entries


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


def usage_cost(settings: Settings, done: TurnDone) -> int:
    """What ``done`` costs at the default model's price for the usage its worker signed."""
    return turn_cost(
        settings.models[DEFAULT_MODEL],
        prompt_tokens=done.prompt_tokens,
        cached_prompt_tokens=done.cached_prompt_tokens,
        completion_tokens=done.completion_tokens,
    )


async def assert_billed_once(
    ledger: Ledger, settings: Settings, done: TurnDone, *, user: int, provider: int
) -> None:
    """``done`` was billed once, for its signed usage: the user (funded with ``TON``) paid it,
    the provider earned its share and the platform the rest; no hold is open, the ledger
    audits."""
    expected = usage_cost(settings, done)
    assert done.cost == expected > 0
    balances = await ledger.balances(user)
    assert balances.available == TON - expected and balances.held == 0
    share = expected * settings.provider_share_bps // 10_000
    assert (await ledger.balances(provider)).earned == share
    assert await ledger.balance(AccountKind.PLATFORM) == expected - share
    assert not await open_holds(ledger)
    assert (await ledger.audit()).ok
