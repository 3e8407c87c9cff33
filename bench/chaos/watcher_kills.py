"""Chaos scenario ``watcher-kills``: the deposit watcher process killed at random moments during a
backlog of deposits, and restarted.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text

from backend.db import Database
from backend.ledger import Ledger
from backend.ton.localnet import LocalTonCenter, LocalTonCenterServer
from backend.ton.toncenter import TonCenter
from backend.ton.watcher import DepositWatcher
from backend.users import get_or_create_user
from bench.chaos.common import (
    DEPOSIT,
    ROOT,
    TON,
    Figures,
    scratch,
)


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
    report = await figures.check(db, started)
    figures.report.deposits_credited = report.deposits_credited
    figures.succeeded = report.deposits_credited
    return figures


async def recorded(db: Database) -> int:
    """Transactions of the deposit wallet the watcher has recorded."""
    async with db.session() as session:
        return int(await session.scalar(text("SELECT count(*) FROM ton_deposits")) or 0)
