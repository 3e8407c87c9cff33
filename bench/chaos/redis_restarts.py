"""Chaos scenario ``redis-restart``: a private Redis killed and restarted while turns stream."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from backend.db import Database
from backend.ledger import Ledger
from backend.settings import Settings
from backend.users import get_or_create_user
from bench.chaos.common import (
    TON,
    Figures,
    ask,
    dispatcher_on,
    instant_worker,
    registered,
    run_turn,
    settle_down,
)
from tests.support.ops import free_port


class PrivateRedis:
    """A redis-server of this run's own, on a spare port, to kill and restart."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cocoon-chaos-redis-"))
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


async def redis_restarts(settings: Settings, db: Database, *, turns: int, restarts: int) -> Figures:
    """Turns while a private Redis is killed and restarted under them (its data lost)."""
    figures = Figures("redis-restart", operations=turns)
    started = time.monotonic()
    server = PrivateRedis()
    server.start()
    user = await get_or_create_user(db, 9101)
    await Ledger(db).credit_deposit(user.id, 100 * TON, f"seed:{user.id}:{os.urandom(4).hex()}")
    workers = [instant_worker(server.url, token_delay=0.01) for _ in range(2)]
    try:
        for worker in workers:
            await registered(worker)
        async with dispatcher_on(
            settings, db, server.url, first_token_timeout_s=3, idle_timeout_s=1, queue_ttl_s=10
        ) as (dispatcher, ledger):
            batches = max(1, restarts)
            per_batch = max(1, turns // batches)
            for batch in range(batches):
                tasks = [
                    asyncio.create_task(run_turn(dispatcher, ask(user.id, random.randint(5, 40))))
                    for _ in range(per_batch)
                ]
                await asyncio.sleep(random.uniform(0.05, 0.3))
                if batch < restarts:
                    server.kill()
                    await asyncio.sleep(random.uniform(0.05, 0.5))
                    server.start()
                    figures.faults += 1
                results = await asyncio.gather(*tasks)
                figures.succeeded += sum(results)
                # The nodes notice they fell out of the registry and register again.
                for worker in workers:
                    await registered(worker, timeout_s=15)
            # After the last restart the system serves again.
            after = await asyncio.gather(*(run_turn(dispatcher, ask(user.id, 5)) for _ in range(3)))
            if not any(after):
                figures.report.violations.append("no turn succeeded after Redis came back")
            figures.succeeded += sum(after)
            figures.operations += len(after)
        await settle_down(ledger)
    finally:
        for worker in workers:
            worker.stop()
        server.close()
    await figures.check(db, started)
    return figures
