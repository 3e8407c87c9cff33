"""What every chaos scenario shares: its figures, the instant-engine workers, one turn, the
dispatcher on a test Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis
import redis.asyncio as aioredis

from backend.db import Database
from backend.dispatch import Dispatcher, TurnDone, TurnError, TurnRequest
from backend.invariants import InvariantReport, check_invariants
from backend.ledger import Ledger
from backend.settings import DEFAULT_MODEL, Settings
from tests.support.ops import InstantNode, dev_settings
from tests.support.turns import open_holds
from workers.wire import ChatMessage

TON = 1_000_000_000
ROOT = Path(__file__).resolve().parents[2]
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

    async def check(self, db: Database, started: float) -> InvariantReport:
        """The scenario's last step: the ledger's invariants checked (what they find joins the
        violations) and the time since ``started`` taken. The invariants' report."""
        report = await check_invariants(db)
        self.report.violations.extend(report.violations)
        self.seconds = time.monotonic() - started
        return report

    def line(self) -> str:
        notes = f"; {', '.join(self.notes)}" if self.notes else ""
        return (
            f"{self.name:15} {self.operations:6} ops {self.succeeded:6} ok {self.faults:5} faults "
            f"{self.violations:3} violations {self.seconds:7.1f} s{notes}"
        )


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


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cocoon-chaos-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
