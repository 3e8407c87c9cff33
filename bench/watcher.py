"""The deposit watcher on a backlog (issue 19): how long until 10,000 deposits are credited.

    .venv/bin/python -m bench.watcher            # 10,000 deposits, SQLite and PostgreSQL
    .venv/bin/python -m bench.watcher --deposits 2000 --db sqlite

A local TON Center as strict as the real one (pages of 1,000 transactions at most, the free
plan's 10 requests per second, 429 past it) holds ``--deposits`` deposits, each to another
user's memo, and about 5% more of junk (bounced, external, zero-value, unknown memo, no
comment). A fresh watcher (``DepositWatcher.run``, as ``cocoon watcher`` runs it) is timed
from its start until its cursor has passed the last transaction, then every balance, the
deposit rows, the outbox and the ledger's audit are checked. In the same run, as baselines:

- ``fetch``: the same client paging through the same backlog, writing nothing (the floor
  the rate limit and the HTTP leave);
- ``one by one``: the watcher handling one transaction at a time (``handle``, what it did
  before the page batch) on ``--baseline-deposits`` of them, scaled to the backlog.

The goal (issue 19): ≤ 10 s for 10,000 on PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from backend.db import Database
from backend.ledger import USER_SIDE_KINDS, Ledger
from backend.models import Account, TonDeposit, User
from backend.ton.localnet import LocalTonCenter, LocalTonCenterServer
from backend.ton.toncenter import TonCenter, TonCenterError
from backend.ton.watcher import DepositWatcher
from backend.users import new_deposit_memo

DEPOSIT = "0:" + "D1" * 32
OTHER = "0:" + "D2" * 32  # the one-by-one baseline's deposit wallet (a cursor of its own)
TON = 1_000_000_000
RPS = 10  # TON Center's free plan (an API key); 1 without one
GOAL_S = 10.0
POSTGRES_URL = os.environ.get(
    "COCOON_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


class Timed(DepositWatcher):
    """A watcher that says when it has handled the transaction at ``last_lt`` (so the bench
    need not poll the database meanwhile, which would compete for SQLite's write lock)."""

    last_lt = 0
    done: asyncio.Event

    async def handle_many(self, txs: list[dict[str, Any]]) -> None:
        await super().handle_many(txs)
        if any(int(tx["lt"]) >= self.last_lt for tx in txs):
            self.done.set()


class OneByOne(Timed):
    """The watcher as it was before the page batch: each transaction on its own."""

    async def handle_many(self, txs: list[dict[str, Any]]) -> None:
        for tx in txs:
            await self.handle(tx)
        if any(int(tx["lt"]) >= self.last_lt for tx in txs):
            self.done.set()


async def make_users(db: Database, count: int, first_id: int) -> list[User]:
    """``count`` users with their accounts, in one transaction (the set-up is not timed)."""
    async with db.session() as session, session.begin():
        users = [
            User(telegram_id=first_id + i, deposit_memo=new_deposit_memo()) for i in range(count)
        ]
        session.add_all(users)
        await session.flush()
        session.add_all(Account(kind=k, owner_id=u.id) for u in users for k in USER_SIDE_KINDS)
    return users


def fill(net: LocalTonCenter, users: list[User], account: str) -> dict[int, int]:
    """A deposit to each user's memo, with junk in between; what each user is owed."""
    owed: dict[int, int] = {}
    for i, user in enumerate(users):
        amount = TON + i
        net.add_incoming(account, amount, comment=user.deposit_memo)
        owed[user.id] = amount
        if i % 20 == 0:  # about 5% junk, of every kind the watcher must not credit
            kind = (i // 20) % 5
            if kind == 0:
                net.add_incoming(account, 3 * TON, comment=user.deposit_memo, bounced=True)
            elif kind == 1:
                net.add_incoming(account, 0, comment=user.deposit_memo, source=None)
            elif kind == 2:
                net.add_incoming(account, 0, comment=user.deposit_memo)
            elif kind == 3:
                net.add_incoming(account, 2 * TON, comment=f"CCNOBODY{i:04d}")
            else:
                net.add_incoming(account, TON)
    return owed


async def fetch_all(api: TonCenter, page: int) -> tuple[int, float]:
    """Page through the backlog as the watcher does, writing nothing; (transactions, s)."""
    started = time.perf_counter()
    start, count = 1, 0
    while True:
        try:
            txs = await api.transactions(DEPOSIT, start_lt=start, limit=page)
        except TonCenterError:
            await asyncio.sleep(0.1)  # 429: the limit's second passes
            continue
        if not txs:
            return count, time.perf_counter() - started
        count += len(txs)
        start = max(int(tx["lt"]) for tx in txs) + 1


async def drain(watcher: Timed, last_lt: int) -> float:
    """Run the watcher until it has handled ``last_lt``; seconds from its start."""
    watcher.last_lt, watcher.done = last_lt, asyncio.Event()
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(watcher.run(stop))
    finished = asyncio.create_task(watcher.done.wait())
    await asyncio.wait([task, finished], return_when=asyncio.FIRST_COMPLETED)
    elapsed = time.perf_counter() - started
    stop.set()
    await task  # its error, if it stopped
    finished.cancel()
    if await watcher.cursor() < last_lt:
        raise RuntimeError("the watcher stopped before catching up")
    return elapsed


async def check(db: Database, owed: dict[int, int], rows: int) -> None:
    """Every user credited exactly what was sent, every transaction recorded once."""
    async with db.session() as session:
        found = dict(
            (
                await session.execute(
                    select(Account.owner_id, Account.balance).where(
                        Account.kind == "user", Account.owner_id.in_(list(owed))
                    )
                )
            ).all()
        )
        recorded = await session.scalar(select(func.count(TonDeposit.id)))
    assert found == owed, "a balance is not what was sent"
    assert recorded == rows, f"{recorded} deposit rows for {rows} transactions"
    assert (await Ledger(db).audit()).ok


async def one_database(name: str, url: str, deposits: int, baseline: int, page: int) -> None:
    db = Database(url)
    await db.upgrade()
    try:
        net = LocalTonCenter(rps=RPS)
        users = await make_users(db, deposits, 10**9)
        owed = fill(net, users, DEPOSIT)
        txs = net.transactions_of(DEPOSIT)
        async with LocalTonCenterServer(net) as api_url, TonCenter(api_url, "bench-key") as api:
            fetched, fetch_s = await fetch_all(api, page)
            watcher = Timed(
                db, Ledger(db), api, DEPOSIT, page_size=page, poll_interval_s=0.05,
                backoff_max_s=1.0,
            )  # fmt: skip
            requests = net.requests
            batch_s = await drain(watcher, int(txs[-1]["lt"]))
            requests = net.requests - requests
            await check(db, owed, len(txs))

            slow_net = LocalTonCenter(rps=RPS)
            slow_users = await make_users(db, baseline, 2 * 10**9)
            slow_owed = fill(slow_net, slow_users, OTHER)
            slow_txs = slow_net.transactions_of(OTHER)
        async with LocalTonCenterServer(slow_net) as slow_url, TonCenter(slow_url, "k") as slow:
            old = OneByOne(
                db, Ledger(db), slow, OTHER, page_size=100, poll_interval_s=0.05,
                backoff_max_s=1.0,
            )  # fmt: skip
            slow_s = await drain(old, int(slow_txs[-1]["lt"]))
            await check(db, {**owed, **slow_owed}, len(txs) + len(slow_txs))
    finally:
        await db.close()
    n = len(txs)
    scaled = slow_s * n / len(slow_txs)  # its pace, over the whole backlog
    verdict = "met" if batch_s <= GOAL_S else "NOT met"
    print(f"\n{name}: {deposits} deposits + {n - deposits} junk = {n} transactions")
    print(f"  watcher, pages of {page}     {batch_s:7.2f} s  {n / batch_s:8.0f} tx/s  "
          f"({requests} requests; goal ≤ {GOAL_S:.0f} s: {verdict})")  # fmt: skip
    print(f"  baseline fetch only         {fetch_s:7.2f} s  {fetched / fetch_s:8.0f} tx/s")
    print(f"  baseline one by one, scaled {scaled:7.2f} s  {n / scaled:8.0f} tx/s  "
          f"(measured on {len(slow_txs)}: {slow_s:.2f} s)")  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deposits", type=int, default=10_000)
    parser.add_argument("--baseline-deposits", type=int, default=1_000)
    parser.add_argument("--page", type=int, default=1000, help="watcher page size (≤ 1000)")
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--postgres-url", default=POSTGRES_URL)
    args = parser.parse_args()
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"load average {load}, {os.cpu_count()} CPUs; TON Center limit {RPS} requests/s")
    databases = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    for database in databases:
        if database == "sqlite":
            with tempfile.TemporaryDirectory() as workdir:
                url = f"sqlite+aiosqlite:///{Path(workdir) / 'bench.db'}"
                await one_database("SQLite", url, args.deposits, args.baseline_deposits, args.page)
            continue
        from bench.inference_stack import drop_postgres, fresh_postgres

        url = await fresh_postgres(args.postgres_url)
        try:
            await one_database("PostgreSQL", url, args.deposits, args.baseline_deposits, args.page)
        finally:
            await drop_postgres(args.postgres_url, url)


if __name__ == "__main__":
    asyncio.run(main())
