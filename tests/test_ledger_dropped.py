"""PostgreSQL connections that die while idle in the pool (a restart, a failover, a killed
backend): the pool pings only a connection idle past its threshold (``backend.db``), and a
ledger operation that meets a dead connection anyway is tried once more on a fresh one, safely:
it applies exactly once, never twice."""

from __future__ import annotations

from sqlalchemy import text

from backend.db import Database
from backend.ledger import Ledger, TurnUsage
from backend.users import get_or_create_user

TON = 1_000_000_000
KILL = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
)


async def kill_others(url: str) -> int:
    admin = Database(url)
    try:
        async with admin.session() as session:
            return int(await session.scalar(text(KILL)) or 0)
    finally:
        await admin.close()


async def test_ledger_operations_outlive_connections_killed_in_the_pool(postgres_url: str) -> None:
    db = Database(postgres_url, ping_after_idle_s=3600)  # never pinged: only the retry helps
    await db.upgrade()
    try:
        ledger = Ledger(db)
        user = (await get_or_create_user(db, 9301, "en")).id
        await ledger.credit_deposit(user, 5 * TON, "deposit:9301")
        assert await kill_others(postgres_url) >= 1
        # The general path (a deposit), then the one-statement hold and settlement.
        second = await ledger.credit_deposit(user, TON, "deposit:9301b")
        assert not second.replayed
        assert await kill_others(postgres_url) >= 1
        await ledger.hold(user, TON, "turn-d")
        assert await kill_others(postgres_url) >= 1
        usage = TurnUsage("m", 1, 0, 1, "stop")
        await ledger.settle("turn-d", 1000, provider_id=None, share_bps=0, usage=usage)
        balances = await ledger.balances(user)
        assert (balances.available, balances.held) == (6 * TON - 1000, 0)
        assert (await ledger.audit()).ok
    finally:
        await db.close()


async def test_an_idle_connection_is_pinged_before_use(postgres_url: str) -> None:
    db = Database(postgres_url, ping_after_idle_s=0)  # every checkout counts as idle
    await db.upgrade()
    try:
        ledger = Ledger(db)
        user = (await get_or_create_user(db, 9302, "en")).id
        await ledger.credit_deposit(user, TON, "deposit:9302")
        assert await kill_others(postgres_url) >= 1
        # A plain read, which no one retries: the ping found the dead connection first.
        assert (await ledger.balances(user)).available == TON
    finally:
        await db.close()
