"""Chaos scenario ``postgres-drops``: PostgreSQL backends terminated while ledger operations
run, each retried under its idempotency key as callers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from backend.db import Database
from backend.ledger import Ledger
from backend.users import get_or_create_user
from bench.chaos.common import (
    TON,
    Figures,
)


async def postgres_drops(
    db: Database,
    *,
    operations: int,
    concurrency: int = 8,
    kill_every_s: tuple[float, float] = (0.02, 0.25),
) -> Figures:
    """Ledger operations (hold, then settle or release; deposits) while every other backend of
    the database is terminated at random moments. Each operation is retried under its key until
    it goes through, as the dispatcher and the watcher do; each must apply exactly once."""
    if db.dialect != "postgresql":
        raise ValueError("postgres-drops needs a PostgreSQL database")
    figures = Figures("postgres-drops", operations=operations)
    started = time.monotonic()
    ledger = Ledger(db)
    user = await get_or_create_user(db, 9201)
    provider = await get_or_create_user(db, 9202)
    run = os.urandom(4).hex()
    await ledger.credit_deposit(user.id, 10**6 * TON, f"pg-seed:{run}")
    start_balance = (await ledger.balances(user.id)).available
    charged = 0
    credited = 0
    done = asyncio.Event()
    admin = Database(db.url)
    terminated = 0

    async def killer() -> None:
        nonlocal terminated
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), random.uniform(*kill_every_s))
            try:
                async with admin.session() as session:
                    killed = await session.scalar(
                        text(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        )
                    )
                if killed:
                    figures.faults += 1
                    terminated += int(killed)
            except DBAPIError:
                continue

    retries = 0

    async def retried(operation: Callable[[], Awaitable[Any]]) -> Any:
        nonlocal retries
        deadline = time.monotonic() + 120
        delay = 0.005
        while True:
            try:
                return await operation()
            except (DBAPIError, OSError, ConnectionError) as error:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"an operation never went through: {error!r:.300}"
                    ) from error
                retries += 1
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(0.5, delay * 2)

    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        nonlocal charged, credited
        async with semaphore:
            key = f"pg-turn:{run}:{i}"
            amount = random.randint(1, 1000) * 1_000_000
            await retried(lambda: ledger.hold(user.id, amount, key))
            if random.random() < 0.7:
                cost = random.randint(0, amount)
                await retried(
                    lambda: ledger.settle(key, cost, provider_id=provider.id, share_bps=8000)
                )
                charged += cost
            else:
                await retried(lambda: ledger.release(key))
            if i % 5 == 0:
                await retried(lambda: ledger.credit_deposit(user.id, TON, f"pg-dep:{run}:{i}"))
                credited += TON
            figures.succeeded += 1

    chaos = asyncio.create_task(killer())
    try:
        await asyncio.gather(*(one(i) for i in range(operations)))
    finally:
        done.set()
        await chaos
        await admin.close()
    figures.notes.append(f"{terminated} backends terminated, {retries} retries")
    balance = (await ledger.balances(user.id)).available
    if balance != start_balance - charged + credited:
        figures.report.violations.append(
            f"user balance {balance}, expected {start_balance - charged + credited}: an "
            "operation applied twice or not at all"
        )
    await figures.check(db, started)
    return figures
