"""Chaos: the money stays right while processes die, connections drop and services restart.

``.venv/bin/python -m bench.chaos`` (long form, by hand; ``--help`` for sizes) runs every
scenario against real Redis, real worker node processes, a real database and a local TON
Center, injects faults at random moments, then checks the invariants of
:mod:`backend.invariants` (ledger balanced, no negative user balance, every turn billed once or
fully refunded, every deposit credited once, no payout paid twice) and prints figures:
scenarios run, faults injected, invariant violations. ``tests/test_chaos.py`` is the short form.

Scenarios:

- ``worker-kills``: chat turns while worker node processes are SIGKILLed at random moments and
  replaced (instant engine);
- ``watcher-kills``: the deposit watcher killed at random moments (task cancelled at any await,
  or crashing between crediting and recording) during a backlog of deposits, and restarted;
  the first half reaches a deposit wallet never deployed (``uninit``: non-bounceable
  transfers are aborted and kept, bounceable ones bounce back), the rest the deployed wallet,
  and a few recent ones become visible only after higher ones were read;
- ``payout-kills``: the payout sender killed after signing, after sending and before confirming,
  over and over, with lost messages;
- ``redis-restart``: a private Redis killed and restarted while turns stream;
- ``postgres-drops``: PostgreSQL backends terminated (``pg_terminate_backend``) while ledger
  operations run, each retried under its idempotency key as callers do;
- ``web-restart``: ``cocoon web`` SIGKILLed while turns stream through it, restarted; the holds
  its dead turns left are released by the sweeper.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from backend.apikeys import create_key
from backend.db import Database
from backend.dispatch import Dispatcher, TurnDone, TurnError, TurnRequest
from backend.invariants import InvariantReport, check_invariants
from backend.ledger import Ledger
from backend.models import AccountKind
from backend.settings import DEFAULT_MODEL, Settings
from backend.sweeper import run_sweeper
from backend.ton.localnet import LocalTonCenter, LocalTonCenterServer
from backend.ton.payouts import PayoutSender, Step
from backend.ton.toncenter import TonCenter, TonCenterError
from backend.ton.wallet import HotWallet, new_mnemonic
from backend.ton.watcher import DepositWatcher
from backend.users import get_or_create_user
from tests.support.ops import InstantNode, admin_sql, dev_settings, free_port
from tests.support.turns import open_holds
from workers.wire import ChatMessage

TON = 1_000_000_000
ROOT = Path(__file__).resolve().parent.parent
DEPOSIT = "0:" + "DE" * 32
WORDS = "the quick brown fox jumps over the lazy dog again and again".split()


class Crash(Exception):
    """Stands for the process dying at a checkpoint."""


@dataclass
class Figures:
    """What one scenario did."""

    name: str
    operations: int = 0  # turns, deposits, payouts, ledger operations
    succeeded: int = 0
    faults: int = 0
    seconds: float = 0.0
    report: InvariantReport = field(default_factory=InvariantReport)
    notes: list[str] = field(default_factory=list)
    swept: int = 0  # holds the sweeper released (web-restart)

    @property
    def violations(self) -> int:
        return len(self.report.violations)

    def line(self) -> str:
        notes = f"; {', '.join(self.notes)}" if self.notes else ""
        return (
            f"{self.name:15} {self.operations:6} ops {self.succeeded:6} ok {self.faults:5} faults "
            f"{self.violations:3} violations {self.seconds:7.1f} s{notes}"
        )


# ----------------------------------------------------------------------------- helpers


def instant_worker(
    redis_url: str, *, token_delay: float, provider_id: int | None = None
) -> InstantNode:
    """A worker node process on the instant engine, quiet and quick to be missed when killed."""
    return InstantNode(
        redis_url,
        token_delay=token_delay,
        provider_id=provider_id,
        log_file=Path(os.devnull),
        log_level="ERROR",
        heartbeat=0.3,
        ttl=2,
        grace=1,
        wait=False,
    )


async def registered(node: InstantNode, timeout_s: float = 30) -> None:
    await asyncio.to_thread(node.wait_registered, timeout_s)


def ask(user_id: int, words: int) -> TurnRequest:
    content = " ".join(random.choice(WORDS) for _ in range(words))
    return TurnRequest(
        user_id=user_id,
        model=DEFAULT_MODEL,
        messages=[ChatMessage(role="user", content=content)],
        max_tokens=words,
    )


async def run_turn(dispatcher: Dispatcher, request: TurnRequest) -> bool:
    """One turn to its end; True if it settled. Failures are expected under chaos."""
    try:
        turn = await dispatcher.start_turn(request)
        async for event in turn.events():
            if isinstance(event, TurnDone):
                return True
    except (TurnError, redis.RedisError, OSError):
        return False
    return False


@contextlib.asynccontextmanager
async def dispatcher_on(
    settings: Settings, db: Database, redis_url: str, **timeouts: float
) -> AsyncIterator[tuple[Dispatcher, Ledger]]:
    ledger = Ledger(db)
    dispatcher = Dispatcher(
        dev_settings(settings),
        ledger,
        aioredis.Redis.from_url(redis_url),
        **timeouts,  # type: ignore[arg-type]
    )
    try:
        yield dispatcher, ledger
    finally:
        await dispatcher.close()


async def settle_down(ledger: Ledger, *, timeout_s: float = 30) -> None:
    """Wait until no hold is open (background settlements and releases finish)."""
    deadline = time.monotonic() + timeout_s
    while await open_holds(ledger) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def flush(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    await client.aclose()


# ------------------------------------------------------------------ (a) worker kills


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


# ----------------------------------------------------------------- (b) watcher kills


class WatcherProcess:
    """``cocoon watcher --no-payouts`` in a process of its own, against a local TON Center."""

    def __init__(self, db_url: str, data_dir: Path, api_url: str, *, page_size: int) -> None:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("COCOON_")},
            "COCOON_DATA_DIR": str(data_dir),
            "COCOON_DATABASE_URL": db_url,
            "COCOON_TON__API_URL": api_url,
            "COCOON_TON__DEPOSIT_ADDRESS": DEPOSIT,
            "COCOON_TON__PAGE_SIZE": str(page_size),
            "COCOON_TON__POLL_INTERVAL_S": "0.05",
            "COCOON_TON__BACKOFF_MAX_S": "0.2",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "watcher", "--no-payouts"],
            env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


async def watcher_kills(
    db: Database,
    *,
    deposits: int,
    users: int = 20,
    requests_per_life: tuple[int, int] = (1, 4),
    stall_s: float = 120.0,
) -> Figures:
    """A backlog of deposits; the watcher process (``cocoon watcher``) is SIGKILLed at random
    moments and started again until it has caught up, while TON Center answers some requests
    with errors. Each deposit must be credited exactly once.

    The kills follow the work done, not the clock: each watcher is killed as soon as it has
    made ``requests_per_life`` (a random count in that range) more requests to TON Center,
    wherever it is then (reading the answer, crediting, recording), so a slow machine (where a
    process takes seconds to start) sees the same kills as a fast one. ``stall_s`` bounds the
    wait for progress: no transaction recorded for that long is a violation, not a slow
    machine."""
    figures = Figures("watcher-kills", operations=deposits)
    started = time.monotonic()
    net = LocalTonCenter()
    people = [await get_or_create_user(db, 20_000 + i) for i in range(users)]
    expected: dict[int, int] = {person.id: 0 for person in people}
    late: list[dict[str, Any]] = []  # indexed only after higher lts were served
    for i in range(deposits):
        if i == deposits // 2:
            net.deploy(DEPOSIT)  # the first half reached a wallet never deployed (uninit)
        amount = random.randint(1, 5 * TON)
        kind = random.random()
        hidden = i >= deposits - 30 and random.random() < 0.2
        if kind < 0.85:
            person = random.choice(people)
            memo = person.deposit_memo
            if random.random() < 0.3:
                memo = f"  {memo.lower()} "  # wallets and people add case and spaces
            tx = net.add_incoming(DEPOSIT, amount, comment=memo, indexed=not hidden)
            expected[person.id] += amount
        elif kind < 0.92:
            tx = net.add_incoming(DEPOSIT, amount, comment="CCNOBODY0000", indexed=not hidden)
        elif kind < 0.96:
            # Bounceable: an uninit wallet bounces it back (not credited), a deployed one
            # keeps it (credited).
            person = random.choice(people)
            tx = net.add_incoming(
                DEPOSIT, amount, comment=person.deposit_memo, bounce=True, indexed=not hidden
            )
            if not tx["out_msgs"]:
                expected[person.id] += amount
        else:
            memo = people[0].deposit_memo
            tx = net.add_incoming(DEPOSIT, amount, comment=memo, bounced=True, indexed=not hidden)
        if hidden:
            late.append(tx)
    last_lt = max(int(tx["lt"]) for tx in net.transactions_of(DEPOSIT) if tx not in late)
    ledger = Ledger(db)
    with scratch() as data_dir:
        async with LocalTonCenterServer(net) as url, TonCenter(url) as api:
            reader = DepositWatcher(db, ledger, api, DEPOSIT)  # reads the cursor only

            async def done() -> bool:
                if await reader.cursor() < last_lt:
                    return False
                for tx in late:  # the indexer's slower batch lands once the rest was read
                    net.index(tx)
                return await recorded(db) == deposits

            seen = await recorded(db)
            last_progress = time.monotonic()
            crashes = 0
            while not await done():
                if time.monotonic() - last_progress > stall_s:
                    figures.report.violations.append(
                        f"the watcher recorded nothing for {stall_s:.0f} s"
                    )
                    break
                if random.random() < 0.3:
                    net.faults.extend(random.choice([429, 500, 502, None]) for _ in range(3))
                watcher = WatcherProcess(db.url, data_dir, url, page_size=random.randint(3, 40))
                target = net.requests + random.randint(*requests_per_life)
                polls = 0
                while net.requests < target:
                    if watcher.process.poll() is not None:  # it died by itself: restarted
                        crashes += 1
                        break
                    if time.monotonic() - last_progress > stall_s:
                        break
                    await asyncio.sleep(0.005)
                    polls += 1
                    if polls % 10 == 0:
                        if await done():
                            break
                        if (now_seen := await recorded(db)) > seen:
                            seen, last_progress = now_seen, time.monotonic()
                caught_up = await done()
                watcher.kill()  # SIGKILL, wherever it was
                figures.faults += not caught_up
                if (now_seen := await recorded(db)) > seen:  # its last commits
                    seen, last_progress = now_seen, time.monotonic()
    if crashes:
        figures.notes.append(f"the watcher exited by itself {crashes} times")
    for person_id, amount in expected.items():
        credited = (await ledger.balances(person_id)).available
        if credited != amount:
            figures.report.violations.append(
                f"user {person_id} was credited {credited}, the chain says {amount}"
            )
    report = await check_invariants(db)
    figures.report.violations.extend(report.violations)
    figures.report.deposits_credited = report.deposits_credited
    figures.succeeded = report.deposits_credited
    figures.seconds = time.monotonic() - started
    return figures


async def recorded(db: Database) -> int:
    """Transactions of the deposit wallet the watcher has recorded."""
    async with db.session() as session:
        return int(await session.scalar(text("SELECT count(*) FROM ton_deposits")) or 0)


# ------------------------------------------------------------------ (c) payout kills


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def payout_kills(db: Database, *, payouts: int, kills: int) -> Figures:
    """Payouts with the sender killed after signing, after sending and before confirming, and
    messages lost on the way. Each payout must leave the hot wallet exactly once."""
    figures = Figures("payout-kills", operations=payouts)
    started = time.monotonic()
    clock = Clock()
    hot = HotWallet.from_mnemonic(new_mnemonic())
    net = LocalTonCenter(clock=clock)
    net.add_wallet(hot.raw, hot.public_key, balance=10**6 * TON, subwallet_id=hot.subwallet_id)
    ledger = Ledger(db, min_withdrawal=TON)
    destinations: dict[int, str] = {}
    for i in range(payouts):
        provider = await get_or_create_user(db, 30_000 + i)
        destination = "0:" + f"{(i % 250) + 1:02X}" * 32
        amount = random.randint(1, 20) * TON
        await ledger.credit_deposit(provider.id, amount, f"earn:{i}", source=AccountKind.OPERATOR)
        await ledger.hold(provider.id, amount, f"earn-hold:{i}")
        await ledger.settle(f"earn-hold:{i}", amount, provider_id=provider.id, share_bps=10_000)
        receipt = await ledger.request_withdrawal(
            provider.id, amount, f"withdraw:{i}", destination=destination
        )
        assert receipt.subject_id is not None
        destinations[receipt.subject_id] = destination
    points = ["signed", "sent", "before_confirm"]
    left = kills
    lost = 0

    def checkpoint(name: str) -> None:
        nonlocal left
        if left > 0 and name in points and random.random() < 0.5:
            left -= 1
            raise Crash(name)

    async with LocalTonCenterServer(net) as url, TonCenter(url) as api:

        def make() -> PayoutSender:
            return PayoutSender(
                db, ledger, api, hot, ttl_s=60, clock=clock, resend_every_s=0,
                checkpoint=checkpoint,
            )  # fmt: skip

        sender = make()
        for _ in range(100 * payouts + 10 * kills + 100):
            if random.random() < 0.03:
                net.drop_messages += 1  # lost on its way: found never, signed again
                lost += 1
            try:
                step = await sender.step()
            except Crash:
                figures.faults += 1
                sender = make()  # the process restarts
                continue
            except TonCenterError:
                continue
            if step == Step.IDLE:
                break
            if step == Step.WAITING:
                clock.now += 20
        else:
            figures.report.violations.append("payouts did not finish")
    figures.faults += lost
    figures.notes.append(f"{lost} messages lost")
    # On chain: each confirmed payout paid exactly once, failed ones never.
    paid: dict[str, int] = {}
    for tx in net.transactions_of(hot.raw):
        for out in tx["out_msgs"]:
            comment = (out["message_content"].get("decoded") or {}).get("comment") or ""
            paid[comment] = paid.get(comment, 0) + 1
    report = await check_invariants(db)
    figures.report.violations.extend(report.violations)
    for payout_id in destinations:
        payout = await ledger.get_payout(payout_id)
        assert payout is not None
        times = paid.get(f"Cocoon payout #{payout_id}", 0)
        wanted = 1 if payout.state == "confirmed" else 0
        if times != wanted:
            figures.report.violations.append(
                f"payout #{payout_id} ({payout.state}) left the hot wallet {times} times"
            )
        figures.succeeded += payout.state == "confirmed"
    figures.seconds = time.monotonic() - started
    return figures


# ---------------------------------------------------------------- (d) Redis restarts


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
    report = await check_invariants(db)
    figures.report.violations.extend(report.violations)
    figures.seconds = time.monotonic() - started
    return figures


# ----------------------------------------------------------- (d) PostgreSQL drops


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
    report = await check_invariants(db)
    figures.report.violations.extend(report.violations)
    figures.seconds = time.monotonic() - started
    return figures


# --------------------------------------------------------------- (e) web restarts


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
    report = await check_invariants(db)
    figures.report.violations.extend(report.violations)
    figures.seconds = time.monotonic() - started
    return figures


# --------------------------------------------------------------------------- the run


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cocoon-chaos-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def own_postgres(server_url: str) -> AsyncIterator[str]:
    """A database of this run's own on the server of ``server_url``, dropped at the end."""
    from sqlalchemy.engine import make_url

    name = f"cocoon_chaos_{os.getpid()}"
    await admin_sql(server_url, f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}")
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        await admin_sql(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def fresh_db(url: str) -> Database:
    db = Database(url)
    await db.upgrade()
    return db


async def main_async(args: argparse.Namespace) -> int:
    logging_off()
    all_figures: list[Figures] = []
    with scratch() as tmp:
        settings = Settings(_env_file=None, data_dir=tmp / "data", redis_url=args.redis_url)
        scenarios: list[tuple[str, Callable[[Database], Awaitable[Figures]]]] = [
            (
                "worker-kills",
                lambda db: worker_kills(settings, db, args.redis_url, turns=args.turns),
            ),
            ("watcher-kills", lambda db: watcher_kills(db, deposits=args.deposits)),
            (
                "payout-kills",
                lambda db: payout_kills(db, payouts=args.payouts, kills=args.payout_kills),
            ),
            (
                "redis-restart",
                lambda db: redis_restarts(
                    settings, db, turns=args.turns // 2, restarts=args.restarts
                ),
            ),
            ("postgres-drops", lambda db: postgres_drops(db, operations=args.pg_operations)),
            (
                "web-restart",
                lambda db: web_restarts(
                    settings.model_copy(update={"database_url": db.url}),
                    db,
                    args.redis_url,
                    turns=args.turns // 4,
                    restarts=args.restarts,
                ),
            ),
        ]
        for name, scenario in scenarios:
            if args.only and name not in args.only:
                continue
            async with contextlib.AsyncExitStack() as stack:
                if name == "postgres-drops" or args.postgres:
                    url = await stack.enter_async_context(own_postgres(args.postgres_url))
                else:
                    url = f"sqlite+aiosqlite:///{tmp / (name + '.db')}"
                db = await fresh_db(url)
                try:
                    figures = await scenario(db)
                finally:
                    await db.close()
            all_figures.append(figures)
            print(figures.line(), flush=True)
            if not figures.report.ok:
                print(str(figures.report), flush=True)
    faults = sum(f.faults for f in all_figures)
    violations = sum(f.violations for f in all_figures)
    print(
        f"\nscenarios run: {len(all_figures)}, operations: "
        f"{sum(f.operations for f in all_figures)}, faults injected: {faults}, "
        f"invariant violations: {violations}"
    )
    return 1 if violations else 0


def logging_off() -> None:
    """Faults make the code under test log errors by design (a cancelled watcher's connection
    reset, a lost Redis): the figures are the output here."""
    import logging

    logging.disable(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--turns", type=int, default=200, help="turns of worker-kills (default 200)"
    )
    parser.add_argument("--deposits", type=int, default=1000, help="deposits in the backlog")
    parser.add_argument("--payouts", type=int, default=30, help="payouts to send")
    parser.add_argument("--payout-kills", type=int, default=50, help="sender kills")
    parser.add_argument("--restarts", type=int, default=3, help="Redis and web restarts")
    parser.add_argument("--pg-operations", type=int, default=300, help="ledger operations")
    parser.add_argument(
        "--redis-url", default=os.environ.get("COCOON_TEST_REDIS_URL", "redis://127.0.0.1:6379/13"),
        help="a Redis database this run may flush (default COCOON_TEST_REDIS_URL or DB 13)",
    )  # fmt: skip
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="run every scenario on PostgreSQL (default: SQLite; postgres-drops always on it)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("COCOON_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"),
        help="a PostgreSQL server (any database on it): the run makes a database of its own",
    )  # fmt: skip
    parser.add_argument("--only", nargs="*", help="run only these scenarios")
    parser.add_argument("--seed", type=int, help="random seed")
    args = parser.parse_args(argv)
    if args.seed is not None:
        random.seed(args.seed)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
