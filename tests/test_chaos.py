"""Chaos, short form (the long form is ``python -m bench.chaos``): a few rounds of each scenario,
with real worker processes, Redis, SQLite and PostgreSQL, a local TON Center, and faults at
random moments. After each, the invariants of :mod:`backend.invariants` must hold."""

from __future__ import annotations

import random
import shutil

import pytest

from backend.db import Database
from backend.invariants import check_invariants
from backend.ledger import Ledger
from backend.models import Hold, HoldState
from backend.settings import Settings
from backend.users import get_or_create_user
from bench import chaos


@pytest.fixture(autouse=True)
def seeded() -> None:
    random.seed(20261125)


def assert_held(figures: chaos.Figures) -> None:
    assert figures.report.ok, f"{figures.line()}\n{figures.report}"
    assert figures.faults > 0, "no fault was injected: the scenario proved nothing"


async def test_invariants_catch_a_hold_closed_twice_and_a_deposit_without_its_row(
    db: Database,
) -> None:
    """The checker itself: it finds the faults it is there to find."""
    ledger = Ledger(db)
    user = await get_or_create_user(db, 5)
    await ledger.credit_deposit(user.id, 1000, "seed")
    await ledger.hold(user.id, 300, "turn-1")
    assert (await check_invariants(db, settled=False)).ok
    report = await check_invariants(db)
    assert report.violations == [f"hold turn-1 of user {user.id} is still open"]

    await ledger.settle("turn-1", 100, provider_id=None, share_bps=0)
    await ledger.credit_deposit(user.id, 7, "ton:0:ab:1:cd")  # no ton_deposits row
    async with db.session() as session, session.begin():
        hold = await session.get(Hold, (await ledger.get_hold("turn-1")).id)  # type: ignore[union-attr]
        assert hold is not None
        hold.state = HoldState.RELEASED  # as if a release had run after the settlement
    report = await check_invariants(db)
    assert not report.ok
    assert any(
        "hold turn-1 is released but was closed by ['settle']" in v for v in report.violations
    )
    assert any("deposit credit ton:0:ab:1:cd has 0 deposit rows" in v for v in report.violations)


@pytest.mark.slow
async def test_turns_survive_workers_killed_at_random(
    settings: Settings, redis_url: str, tmp_path
) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'chaos.db'}")
    await db.upgrade()
    try:
        figures = await chaos.worker_kills(
            settings, db, redis_url, turns=14, concurrency=4, kill_after=(1, 3)
        )
    finally:
        await db.close()
    assert_held(figures)
    assert figures.succeeded > 0


@pytest.mark.slow
async def test_each_deposit_is_credited_once_through_watcher_kills(db: Database) -> None:
    figures = await chaos.watcher_kills(db, deposits=60, users=6, requests_per_life=(1, 3))
    assert_held(figures)
    assert figures.report.deposits_credited > 40


@pytest.mark.slow
async def test_each_payout_leaves_once_through_sender_kills(db: Database) -> None:
    figures = await chaos.payout_kills(db, payouts=4, kills=8)
    assert_held(figures)
    assert figures.succeeded == 4


@pytest.mark.slow
async def test_each_payout_leaves_once_through_highload_sender_kills(db: Database) -> None:
    figures = await chaos.payout_kills(db, payouts=8, kills=10, highload=True)
    assert_held(figures)
    assert figures.succeeded == 8


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server binary")
async def test_turns_through_a_redis_restart(settings: Settings, tmp_path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'chaos.db'}")
    await db.upgrade()
    try:
        figures = await chaos.redis_restarts(settings, db, turns=6, restarts=1)
    finally:
        await db.close()
    assert_held(figures)


@pytest.mark.slow
async def test_ledger_operations_through_dropped_postgres_connections(postgres_url: str) -> None:
    db = Database(postgres_url)
    await db.upgrade()
    try:
        figures = await chaos.postgres_drops(db, operations=12, kill_every_s=(0.05, 0.2))
    finally:
        await db.close()
    assert_held(figures)
    assert figures.succeeded == 12


@pytest.mark.slow
async def test_holds_of_a_killed_web_server_are_swept(settings: Settings, redis_url: str) -> None:
    db = Database.from_settings(settings)
    await db.upgrade()
    try:
        figures = await chaos.web_restarts(settings, db, redis_url, turns=4, restarts=1)
    finally:
        await db.close()
    assert_held(figures)
    assert figures.swept > 0, "no turn was cut off by the kill: nothing was left to sweep"
