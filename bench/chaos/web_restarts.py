"""Chaos scenario ``web-restart``: ``cocoon web`` SIGKILLed while turns stream through it, and
restarted; the holds its dead turns left are released by the sweeper.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time

import aiohttp

from backend.apikeys import create_key
from backend.db import Database
from backend.ledger import Ledger
from backend.settings import DEFAULT_MODEL, Settings
from backend.sweeper import run_sweeper
from backend.users import get_or_create_user
from bench.chaos.common import (
    ROOT,
    TON,
    WORDS,
    Figures,
    flush,
    instant_worker,
    registered,
    settle_down,
)
from tests.support.ops import free_port
from tests.support.turns import open_holds


class WebProcess:
    """``cocoon web`` in a process of its own."""

    def __init__(self, settings: Settings, port: int) -> None:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("COCOON_")},
            "COCOON_DATA_DIR": str(settings.data_dir),
            "COCOON_DATABASE_URL": settings.db_url,
            "COCOON_REDIS_URL": settings.redis_url,
            "COCOON_ATTESTATION__ALLOW_DEV": "true",
            "COCOON_LOG_LEVEL": "WARNING",
        }
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "web", "--host", "127.0.0.1",
             "--port", str(port)],
            env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    async def ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.get(f"{self.url}/healthz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if self.process.poll() is not None:
                    raise RuntimeError(f"cocoon web exited ({self.process.returncode})")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cocoon web did not answer in {timeout_s:.0f} s")
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


async def stream_chat(url: str, key: str, words: int) -> bool:
    content = " ".join(random.choice(WORDS) for _ in range(words))
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{url}/v1/chat/completions",
                json={
                    "model": DEFAULT_MODEL,
                    "messages": [{"role": "user", "content": content}],
                    "max_tokens": words,
                    "stream": True,
                },
                headers={"Authorization": f"Bearer {key}"},
            ) as response,
        ):
            body = await response.text()
            return response.status == 200 and "[DONE]" in body
    except (TimeoutError, aiohttp.ClientError):
        return False


async def under_way(ledger: Ledger, tasks: list[asyncio.Task[bool]], timeout_s: float = 60) -> None:
    """Until a turn holds money (it is running in the server), or every request has ended."""
    deadline = time.monotonic() + timeout_s
    while not await open_holds(ledger) and not all(task.done() for task in tasks):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no turn got under way in {timeout_s:.0f} s")
        await asyncio.sleep(0.01)


async def web_restarts(
    settings: Settings, db: Database, redis_url: str, *, turns: int, restarts: int
) -> Figures:
    """Turns streaming through ``cocoon web`` when it is SIGKILLed; restarted each time. The
    holds of the turns it was running are released by the sweeper after the hold timeout.
    Each kill comes as soon as a turn is under way (its hold is open), however long the
    server took to start and take the requests."""
    figures = Figures("web-restart", operations=turns)
    started = time.monotonic()
    await flush(redis_url)
    user = await get_or_create_user(db, 9301)
    ledger = Ledger(db)
    await ledger.credit_deposit(user.id, 100 * TON, f"seed:{user.id}:{os.urandom(4).hex()}")
    key, _row = await create_key(db, user.id)
    worker = instant_worker(redis_url, token_delay=0.02)
    web = None
    try:
        await registered(worker)
        batches = max(1, restarts)
        per_batch = max(1, turns // batches)
        for _batch in range(batches):
            web = WebProcess(settings, free_port())
            await web.ready()
            tasks = [
                asyncio.create_task(stream_chat(web.url, key, random.randint(10, 40)))
                for _ in range(per_batch)
            ]
            await under_way(ledger, tasks)
            web.kill()
            figures.faults += 1
            figures.succeeded += sum(await asyncio.gather(*tasks))
        web = WebProcess(settings, free_port())
        await web.ready()
        if not await stream_chat(web.url, key, 5):
            figures.report.violations.append("no turn succeeded after the web server came back")
        # The dead processes' holds: released once they are older than the hold timeout.
        timeout_s = 1.0
        await asyncio.sleep(timeout_s)
        stop = asyncio.Event()
        swept: list[str] = []
        sweeper = asyncio.create_task(
            run_sweeper(ledger, timeout_s, interval_s=0.1, stop=stop, on_sweep=swept.extend)
        )
        await settle_down(ledger, timeout_s=30)
        stop.set()
        await sweeper
        figures.notes.append(f"{len(swept)} holds of dead turns released by the sweeper")
        figures.swept = len(swept)
    finally:
        if web is not None:
            web.kill()
        worker.stop()
    await figures.check(db, started)
    return figures
