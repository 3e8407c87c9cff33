"""A priced turn's hold and its settlement (and a free turn's receipt) each take one round trip
on PostgreSQL (issue 19), counted on the wire by a proxy (tests.support.pg_wire): one statement
in autocommit on a connection checked out without the pool's ping. Every other checkout is still
pinged, and a connection that turns out dead, or a reply lost with its connection, costs a
second try on a fresh one that applies nothing twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import func, select, text

from backend.db import Database
from backend.ledger import Ledger
from backend.models import Hold, Transaction, TurnReceipt
from tests.support.pg_wire import WireCounter, counting_proxy
from tests.support.turns import funded_user

TON = 1_000_000_000
KILL = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
)


@pytest.fixture
async def wired(pg: Database) -> AsyncIterator[tuple[Ledger, WireCounter]]:
    """A ledger whose connections go through a counting proxy (the schema made by ``pg``)."""
    async with counting_proxy(pg.url) as (url, counter):
        db = Database(url)
        try:
            yield Ledger(db), counter
        finally:
            await db.close()


async def round_trips(counter: WireCounter, operation: object) -> int:
    counter.reset()
    await operation  # type: ignore[misc]
    return counter.round_trips


async def test_a_hold_and_its_settlement_take_one_round_trip_each(
    wired: tuple[Ledger, WireCounter],
) -> None:
    ledger, counter = wired
    user = await funded_user(ledger, 9401, 5 * TON)
    await ledger.hold(user, TON, "turn-warm")  # the connection's first use prepares them
    await ledger.settle("turn-warm", 1, provider_id=None, share_bps=0)
    await ledger.hold(user, TON, "turn-warm-2")
    await ledger.release("turn-warm-2")

    assert await round_trips(counter, ledger.hold(user, TON, "turn-1")) == 1
    settle = ledger.settle("turn-1", TON // 3, provider_id=None, share_bps=0)
    assert await round_trips(counter, settle) == 1
    assert await round_trips(counter, ledger.hold(user, TON, "turn-2")) == 1
    assert await round_trips(counter, ledger.release("turn-2")) == 1
    balances = await ledger.balances(user)
    assert (balances.available, balances.held) == (5 * TON - 1 - TON // 3, 0)
    assert (await ledger.audit()).ok


async def test_a_free_turns_receipt_takes_one_round_trip(
    wired: tuple[Ledger, WireCounter],
) -> None:
    ledger, counter = wired
    user = await funded_user(ledger, 9405, 0)
    assert await ledger.keep_receipt("turn-warm", user, "{}")  # prepared on its connection
    assert await round_trips(counter, ledger.keep_receipt("turn-free", user, '{"a": 1}')) == 1
    counter.reset()
    assert not await ledger.keep_receipt("turn-free", user, '{"a": 2}')  # kept already
    assert counter.round_trips == 1
    async with ledger.db.session() as session:
        body = await session.scalar(
            select(TurnReceipt.body).where(TurnReceipt.turn_id == "turn-free")
        )
    assert body == '{"a": 1}'


async def test_every_other_checkout_is_still_pinged(wired: tuple[Ledger, WireCounter]) -> None:
    """The ping is BEGIN, the ping itself, ROLLBACK: three round trips before a statement."""
    db = wired[0].db
    counter = wired[1]

    async def select_one(ping: bool) -> None:
        async with db.autocommit(ping=ping) as connection:
            assert await connection.scalar(text("SELECT 1")) == 1

    await select_one(True)  # a new connection: not pinged, and its statement prepared
    assert await round_trips(counter, select_one(True)) == 4
    assert await round_trips(counter, select_one(False)) == 1
    async with db.session() as session:
        await session.scalar(text("SELECT 1"))
    counter.reset()
    async with db.session() as session:  # the ping, then BEGIN, the statement, ROLLBACK
        assert await session.scalar(text("SELECT 1")) == 1
    assert counter.round_trips == 6


async def test_a_dead_connection_fails_the_statement_and_it_goes_through_on_a_fresh_one(
    wired: tuple[Ledger, WireCounter], pg: Database
) -> None:
    ledger = wired[0]
    user = await funded_user(ledger, 9402, 5 * TON)
    await ledger.hold(user, TON, "turn-warm")
    for operation in (
        lambda: ledger.hold(user, TON, "turn-d"),
        lambda: ledger.settle("turn-d", TON // 4, provider_id=None, share_bps=0),
        lambda: ledger.hold(user, TON, "turn-e"),
        lambda: ledger.release("turn-e"),
    ):
        async with pg.autocommit() as admin:
            assert await admin.scalar(text(KILL)) >= 1
        receipt = await operation()
        assert not receipt.replayed
    balances = await ledger.balances(user)
    assert (balances.available, balances.held) == (4 * TON - TON // 4, TON)
    assert (await ledger.audit()).ok


async def test_a_reply_lost_with_its_connection_applies_once(pg: Database) -> None:
    """The statement committed but its answer never came: the second try finds the key used
    (the hold) or the hold closed (the settlement), and the general path replays it. One
    connection, its statements prepared before each loss: the reply lost is the statement's."""
    async with counting_proxy(pg.url) as (url, counter):
        ledger = Ledger(Database(url, pool_size=1, max_overflow=0))
        try:
            user = await funded_user(ledger, 9403, 6 * TON)
            for warm in ("turn-warm", "turn-warm-2"):
                await ledger.hold(user, TON, warm)
                await ledger.settle(warm, 0, provider_id=None, share_bps=0)
                counter.lose_next_reply = True
                if warm == "turn-warm":
                    lost = await ledger.hold(user, TON, "turn-lost")
                else:
                    lost = await ledger.settle("turn-lost", TON // 2, provider_id=None, share_bps=0)
                assert lost.replayed and not counter.lose_next_reply
            balances = await ledger.balances(user)
            assert (balances.available, balances.held) == (6 * TON - TON // 2, 0)
            async with ledger.db.session() as session:
                holds = await session.scalar(select(func.count()).where(Hold.key == "turn-lost"))
                keys = await session.scalar(
                    select(func.count()).where(
                        Transaction.idempotency_key.in_(["turn-lost", "settle:turn-lost"])
                    )
                )
            assert (holds, keys) == (1, 2)
            assert (await ledger.audit()).ok
        finally:
            await ledger.db.close()


async def test_a_statement_cancelled_mid_flight_leaves_no_connection_unusable(
    pg: Database,
) -> None:
    """A caller gone while its statement runs (a client that left during its hold): the one
    connection it had is not handed to the next unpinged statement in a state asyncpg refuses
    ("another operation is in progress")."""
    db = Database(pg.url, pool_size=1, max_overflow=0)
    try:
        ledger = Ledger(db)
        user = await funded_user(ledger, 9404, 2 * TON)
        started = asyncio.Event()

        async def slow() -> None:
            async with db.autocommit(ping=False) as connection:
                started.set()
                await connection.execute(text("SELECT pg_sleep(30)"))

        task = asyncio.create_task(slow())
        await started.wait()
        await asyncio.sleep(0.05)  # the statement is sent (a cancel before it cancels nothing)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await ledger._hold_in_one_statement(user, TON, "turn-after") is not None
        assert not (await ledger.settle("turn-after", 7, provider_id=None, share_bps=0)).replayed
        assert (await ledger.balances(user)).available == 2 * TON - 7
        assert (await ledger.audit()).ok
    finally:
        await db.close()
