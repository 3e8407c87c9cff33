"""Chaos scenario ``worker-kills``: chat turns while worker node processes are SIGKILLed at
random moments and replaced (instant engine).
"""

from __future__ import annotations

import asyncio
import os
import random
import time

from backend.db import Database
from backend.invariants import check_invariants
from backend.ledger import Ledger
from backend.settings import Settings
from backend.users import get_or_create_user
from bench.chaos.common import (
    TON,
    Figures,
    ask,
    dispatcher_on,
    flush,
    instant_worker,
    registered,
    run_turn,
    settle_down,
)


async def worker_kills(
    settings: Settings, db: Database, redis_url: str, *, turns: int, workers: int = 2,
    concurrency: int = 6, kill_after: tuple[int, int] = (1, 3),
) -> Figures:  # fmt: skip
    """Turns while worker processes are SIGKILLed at random moments and replaced. The kills
    follow the work done, not the clock: after each kill (and once the replacement has
    registered), the next comes once ``kill_after`` (a random count in that range) more turns
    have succeeded, so a slow machine sees as many kills per turn as a fast one."""
    figures = Figures("worker-kills", operations=turns)
    started = time.monotonic()
    await flush(redis_url)
    provider = await get_or_create_user(db, 9000)
    user = await get_or_create_user(db, 9001)
    await Ledger(db).credit_deposit(user.id, 100 * TON, f"seed:{user.id}:{os.urandom(4).hex()}")
    pool = [
        instant_worker(redis_url, token_delay=0.01, provider_id=provider.id) for _ in range(workers)
    ]
    for worker in pool:
        await registered(worker)
    done = asyncio.Event()
    progress = asyncio.Condition()
    succeeded = 0

    async def killer() -> None:
        while not done.is_set():
            target = succeeded + random.randint(*kill_after)
            async with progress:
                await progress.wait_for(lambda t=target: done.is_set() or succeeded >= t)
            if done.is_set():
                return
            victim = random.randrange(len(pool))
            pool[victim].kill()
            figures.faults += 1
            pool[victim] = instant_worker(redis_url, token_delay=0.01, provider_id=provider.id)
            await registered(pool[victim])  # one worker down at a time

    try:
        async with dispatcher_on(
            settings, db, redis_url, first_token_timeout_s=3, idle_timeout_s=1, queue_ttl_s=10
        ) as (dispatcher, ledger):
            chaos = asyncio.create_task(killer())
            semaphore = asyncio.Semaphore(concurrency)

            async def one() -> bool:
                nonlocal succeeded
                async with semaphore:
                    ok = await run_turn(dispatcher, ask(user.id, random.randint(3, 30)))
                async with progress:
                    succeeded += ok
                    progress.notify_all()
                return ok

            results = await asyncio.gather(*(one() for _ in range(turns)))
            done.set()
            async with progress:
                progress.notify_all()
            await chaos
            figures.succeeded = sum(results)
            # The turns that were cut off settle or release in the background.
        await settle_down(ledger)
    finally:
        done.set()
        for worker in pool:
            worker.stop()
    figures.report = await check_invariants(db)
    figures.seconds = time.monotonic() - started
    return figures
