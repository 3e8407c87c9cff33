"""The bot under load (issue 19): many chats at once through the webhook, run by hand.

    .venv/bin/python -m bench.bot_load                       # 1,000 chats, SQLite
    .venv/bin/python -m bench.bot_load --chats 200 --db postgresql

The real web app (``backend.web.create_app``) with the bot in webhook mode, its turn dispatcher,
a worker node process on the instant engine (no model: the stack's own cost), Redis, and SQLite
or PostgreSQL. Telegram is a second process: the rule-enforcing stand-in Bot API server
(tests/support/fake_telegram.py: message length, HTML, flood control with ``retry_after``) that
also delivers the updates, each a user's message with the secret-token header, all at once over
up to 100 connections (Telegram's most for a webhook). Every user has a balance and the model
is priced.

Per update, measured inside the bot's process: the **handler time excluding inference** (from
the webhook request's arrival to the end of its handling, less the time spent waiting for the
turn's events from the worker, for a send moment that Telegram's flood limits set, and for the
bot's admission of the update, each printed too), its own work on the event loop (in wall and in
CPU time), and the part up to the turn's dispatch (user, rate limit, context, hold,
worker pick). Baseline in the same run: a bare aiohttp handler on the same server, under the
same burst of webhook requests. Checked: every chat got its full answer, the 429s from the
stand-in (and that the bot waited each one's ``retry_after`` before sending there again), and
every balance exact (deposit less the turn's cost from its footer's tokens, nothing held, the
ledger's audit clean).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import multiprocessing
import os
import pstats
import re
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis
import redis.asyncio as aioredis
from aiohttp import web
from pydantic import SecretStr

from backend import appkeys
from backend.pricing import turn_cost
from backend.settings import DEFAULT_MODEL, AttestationSettings, ModelPrice, Settings
from backend.users import get_or_create_user
from bench.bot_load_probe import HOOK, Timings, instrument, telegram_process
from bench.inference_rows import p50_p99
from bench.inference_stack import POSTGRES_URL, drop_postgres, fresh_postgres
from workers import registry

REDIS_URL = os.environ.get("COCOON_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
TOKEN = "42:BENCH-bot-load"
SECRET = "bench-webhook-secret"
DEPOSIT = 10**9
PRICE = ModelPrice(prompt=1_000_000, completion=2_000_000, context_length=2048)
FIRST_USER = 7_000_000


async def bare(request: web.Request) -> web.Response:
    """The baseline: a handler that reads the update and answers 200."""
    await request.json()
    return web.json_response({})


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def settings_for(
    workdir: Path, redis_url: str, tg_url: str, database_url: str | None, capacity: int
) -> Settings:
    return Settings(
        _env_file=None,
        data_dir=workdir,
        secrets_dir=workdir / "secrets",
        database_url=database_url,
        redis_url=redis_url,
        models={DEFAULT_MODEL: PRICE},
        # One development node takes every chat's turn at once: the bench measures the bot, not
        # the network's capacity.
        attestation=AttestationSettings(allow_dev=True, default_capacity=capacity),
        bot_token=SecretStr(TOKEN),
        bot_mode="webhook",
        webhook_secret=SecretStr(SECRET),
        telegram_api_url=tg_url,
        public_url="https://cocoon.example",
        max_tokens_default=64,
    )


def update_for(index: int) -> dict[str, Any]:
    user = FIRST_USER + index
    person = {"first_name": f"U{index}", "language_code": "en"}
    return {
        "update_id": index + 1,
        "message": {
            "message_id": 1,
            "date": int(time.time()),
            "chat": {"id": user, "type": "private", **person},
            "from": {"id": user, "is_bot": False, **person},
            "text": f"hello number {index} from the load bench",
        },
    }


FOOTER = re.compile(r"(\d+) \+ (\d+) tokens")


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.2)
    return False


@dataclass
class Result:
    """What one load run saw (in seconds; counts of chats)."""

    chats: int
    busy: list[float]  # per update: the event loop's time running its own code
    cpu: list[float]  # the same in the thread's CPU time (without the machine's other loads)
    handler: list[float]  # per update: wall time excluding inference and flood pacing
    dispatch: list[float]  # per update: the webhook's arrival to the turn's dispatch
    paced: list[float]  # per update: waits for Telegram's flood limits
    queued: list[float]  # per update: waits for the bot's admission (bot.admission)
    bare: list[float]  # per request: the bare handler's time (the baseline)
    statuses: list[int]  # the webhook's answers
    finished: bool  # every update handled within the timeout
    elapsed: float  # the first update sent to the last one handled
    floods: int  # 429s from the stand-in
    early: int  # of those, chats sent to again before retry_after was over
    refused: list[list[str]]  # the stand-in's other refusals: (method, description)
    unanswered: int  # chats without their full answer
    instead: list[str]  # what a few of those got instead (their last message)
    inexact: int  # balances that are not the deposit less the turn's cost, or still held
    audit_ok: bool


@contextlib.contextmanager
def profiling(path: Path | None) -> Iterator[None]:
    """cProfile over the burst (``--profile``): the functions with the most time of their own,
    and the bot's and backend's with the most time in all, written to ``path``."""
    if path is None:
        yield
        return
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(r"(bot|backend|workers)/", 60)
        path.write_text(out.getvalue())


async def load(
    redis_url: str,
    chats: int,
    database_url: str | None,
    workdir: Path,
    timeout_s: float,
    profile: Path | None = None,
) -> Result:
    """``chats`` users at once through the webhook of the real stack (see the module's text)."""
    from backend.db import Database
    from backend.ledger import Ledger
    from backend.web import create_app

    redis.Redis.from_url(redis_url).flushdb()
    spawn = multiprocessing.get_context("spawn")
    ready: Any = spawn.Queue()
    telegram = spawn.Process(target=telegram_process, args=(ready,), daemon=True)
    telegram.start()
    node: asyncio.subprocess.Process | None = None
    db: Database | None = None
    try:
        tg_url = ready.get(timeout=60)
        capacity = max(64, chats)
        settings = settings_for(workdir, redis_url, tg_url, database_url, capacity)
        db = Database.from_settings(settings)
        await db.upgrade()
        ledger = Ledger(db)
        users = {}
        for index in range(chats):
            user = await get_or_create_user(db, FIRST_USER + index, "en")
            await ledger.credit_deposit(user.id, DEPOSIT, f"bench-deposit-{index}")
            users[FIRST_USER + index] = user.id
        worker_id = f"bench-{os.getpid()}"
        node = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "workers.node", "--model", DEFAULT_MODEL, "--engine", "instant"),
            *("--redis-url", redis_url, "--worker-id", worker_id, "--capacity", str(capacity)),
            *("--log-level", "WARNING"),
            stdin=asyncio.subprocess.DEVNULL,
        )
        probe = aioredis.Redis.from_url(redis_url)
        try:
            if not await until(lambda: probe.exists(registry.worker_key(worker_id)), 120):
                raise RuntimeError("the worker node did not start")
        finally:
            await probe.aclose()

        timings = Timings()
        app = create_app(settings)
        instrument(app, timings)
        app.router.add_post("/bare", bare)
        runner, web_url = await serve(app)
        try:
            await app[appkeys.DISPATCHER].workers.refresh()  # it sees the node at once
            updates = [update_for(i) for i in range(chats)]
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:

                async def deliver(path: str, batch: list[dict[str, Any]]) -> dict[str, Any]:
                    body = {"url": web_url + path, "secret": SECRET, "updates": batch}
                    async with http.post(f"{tg_url}/_deliver", json=body) as reply:
                        return dict(await reply.json())

                # Baseline: the same burst at a bare handler.
                await deliver(
                    "/bare", [{**u, "update_id": 10**6 + i} for i, u in enumerate(updates)]
                )
                started = time.perf_counter()

                async def all_ended() -> bool:
                    return len(timings.ended) >= chats

                with timings.counting_busy_time(), profiling(profile):
                    delivered = await deliver(HOOK, updates)
                    finished = await until(all_ended, timeout_s)
                    elapsed = time.perf_counter() - started

                async def settled() -> bool:
                    return all([(await ledger.balances(u)).held == 0 for u in users.values()])

                await until(settled, 60)
                async with http.get(f"{tg_url}/_report") as reply:
                    seen = await reply.json()
        finally:
            await runner.cleanup()
        log = seen["log"]
        floods = [e for e in log if e["status"] == 429]
        unanswered, inexact, instead = await _check_answers(log, ledger, users)
        return Result(
            chats=chats,
            busy=[timings.busy[u] for u in timings.ended],
            cpu=[timings.cpu[u] for u in timings.ended],
            handler=timings.handler_s(),
            dispatch=timings.dispatch_s(),
            paced=[timings.paced[u] for u in timings.ended],
            queued=[timings.queued[u] for u in timings.ended],
            bare=timings.bare,
            statuses=delivered["statuses"],
            finished=finished,
            elapsed=elapsed,
            floods=len(floods),
            early=_early(log, floods),
            refused=[r for r in seen["refused"] if "Too Many Requests" not in r[1]],
            unanswered=unanswered,
            instead=instead,
            inexact=inexact,
            audit_ok=(await ledger.audit()).ok,
        )
    finally:
        if db is not None:
            await db.close()
        if node is not None and node.returncode is None:
            node.terminate()
            await node.wait()
        telegram.terminate()
        telegram.join()


def _early(log: list[dict[str, Any]], floods: list[dict[str, Any]]) -> int:
    """429s after which the bot sent the same method to the same chat before retry_after."""
    early = 0
    for flood in floods:
        again = [
            e["at"] for e in log
            if e["chat"] == flood["chat"] and e["method"] == flood["method"]
            and e["at"] > flood["at"]
        ]  # fmt: skip
        if again and min(again) < flood["at"] + flood.get("retry_after", 0) - 0.05:
            early += 1
    return early


async def _check_answers(
    log: list[dict[str, Any]], ledger: Any, users: dict[int, int]
) -> tuple[int, int, list[str]]:
    """Chats whose last message is not their full answer with its footer; balances that are
    not the deposit less that turn's cost (or still hold something)."""
    answers: dict[int, str] = {}
    for entry in log:
        if entry["method"] == "sendMessage" and entry["status"] == 200 and entry["text"]:
            answers[int(entry["chat"])] = entry["text"]
    unanswered = inexact = 0
    instead: list[str] = []
    for index, (chat, user_id) in enumerate(users.items()):
        text = answers.get(chat, "")
        found = FOOTER.search(text)
        if f"hello number {index} from the load bench" not in text or found is None:
            unanswered += 1
            if len(instead) < 3:
                instead.append(text[:200] or "(nothing)")
            continue
        cost = turn_cost(
            PRICE,
            prompt_tokens=int(found.group(1)),
            cached_prompt_tokens=0,
            completion_tokens=int(found.group(2)),
        )
        balances = await ledger.balances(user_id)
        if balances.available != DEPOSIT - cost or balances.held != 0:
            inexact += 1
    return unanswered, inexact, instead


def report(result: Result, db: str) -> None:
    r = result
    print(f"\n== {r.chats} chats at once through the webhook ({db})")
    print(f"webhook answers {sorted(set(r.statuses))}; every update handled: {r.finished}; "
          f"the last {r.elapsed:.1f} s after the first was sent")  # fmt: skip
    if r.handler:
        print(f"handler time, the update's own work on the event loop: {p50_p99(r.busy)} "
              f"(max {max(r.busy) * 1000:.1f} ms); in CPU time {p50_p99(r.cpu)}")  # fmt: skip
        print(f"wall time excl. inference, flood pacing and admission: {p50_p99(r.handler)} "
              f"(max {max(r.handler) * 1000:.1f} ms)")  # fmt: skip
        print(f"arrival to the turn's dispatch: {p50_p99(r.dispatch)}")
        print(f"waits for Telegram's flood limits: {p50_p99(r.paced)}, max {max(r.paced):.1f} s")
        print(f"waits for the bot's admission: {p50_p99(r.queued)}, max {max(r.queued):.1f} s")
    print(f"baseline, a bare aiohttp handler under the same burst: {p50_p99(r.bare)}")
    print(f"429s from the stand-in: {r.floods} (sent again before retry_after: {r.early}); "
          f"other refusals: {len(r.refused)} {r.refused[:3]}")  # fmt: skip
    print(f"chats without their full answer: {r.unanswered} {r.instead}; "
          f"balances not exact: {r.inexact}; "
          f"ledger audit ok: {r.audit_ok}")  # fmt: skip
    print(f"load average now: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if r.handler:
        print(f"\n| {r.chats} bot chats at once, webhook, {db} | own work {p50_p99(r.busy)} "
              f"(CPU {p50_p99(r.cpu)}); wall excl. inference, pacing, admission "
              f"{p50_p99(r.handler)}; {r.unanswered} unanswered; "
              f"{r.floods} 429s | bare handler {p50_p99(r.bare)} | p99 <= 50 ms, "
              "no flood-limit breach |")  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=1000)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--postgres-url", default=POSTGRES_URL)
    parser.add_argument("--timeout", type=float, default=300, help="seconds for every answer")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the burst")
    args = parser.parse_args()
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as workdir:
        url = await fresh_postgres(args.postgres_url) if args.db == "postgresql" else None
        try:
            result = await load(
                args.redis_url, args.chats, url, Path(workdir), args.timeout, args.profile
            )
        finally:
            if url is not None:
                await drop_postgres(args.postgres_url, url)
    report(result, args.db)


if __name__ == "__main__":
    asyncio.run(main())
