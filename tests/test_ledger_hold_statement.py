"""The hold in one statement on PostgreSQL (issue 19: a priced turn's hold is one round trip):
it writes exactly the rows the general path writes, or nothing at all, and every promise of the
ledger holds through it: a short balance is refused, a key applies once, racing holds never
overdraw, and a debit never stays without its credit. A hold and its settlement are counted:
one statement each on one connection."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable

import pytest
from sqlalchemy import delete, event

from backend.db import Database
from backend.ledger import (
    IdempotencyConflict,
    InsufficientFunds,
    Ledger,
    Leg,
    NotFound,
    Receipt,
)
from backend.models import Account, AccountKind
from tests.support.turns import funded_user, hold_rows

TON = 1_000_000_000


def fingerprint(user: int, amount: int) -> str:
    request = {"kind": "hold", "user": user, "amount": amount}
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


async def written(db: Database, key: str, user: int) -> tuple[object, ...]:
    """What a hold left in the database, without its ids and times (its request's fingerprint
    checked against the user's own request)."""
    async with db.session() as session:
        hold, tx, entries = await hold_rows(session, key, key)
        return (
            (hold.amount, hold.state, hold.charged, hold.closed_at is None),
            (tx.kind, tx.request_hash == fingerprint(user, hold.amount), tx.reason),
            (tx.subject_id == hold.id, hold.user_id == user),
            entries,
        )


async def test_a_hold_in_one_statement_writes_what_the_general_path_writes(pg: Database) -> None:
    fast, general = Ledger(pg), Ledger(pg, one_statement=False)
    one = await funded_user(fast, 9001, 5 * TON)
    two = await funded_user(general, 9002, 5 * TON)

    statement = await fast._hold_in_one_statement(one, 2 * TON, "turn-fast")
    assert statement is not None  # it applied: one statement, no fallback
    assert statement == Receipt(
        statement.transaction_id,
        "turn-fast",
        "hold",
        (Leg(AccountKind.USER, one, -2 * TON), Leg(AccountKind.HOLD, one, 2 * TON)),
        statement.subject_id,
    )
    await general.hold(two, 2 * TON, "turn-general")
    assert await written(pg, "turn-fast", one) == await written(pg, "turn-general", two)
    assert await fast.balances(one) == await general.balances(two)

    # Both settle and replay alike, and the ledger adds up.
    replay = await fast.hold(one, 2 * TON, "turn-fast")
    assert replay.replayed and replay.transaction_id == statement.transaction_id
    assert replay.legs == statement.legs
    for ledger, key in ((fast, "turn-fast"), (general, "turn-general")):
        await ledger.settle(key, TON // 3, provider_id=None, share_bps=7000)
    assert await fast.balances(one) == await general.balances(two)
    assert (await fast.audit()).ok


async def test_a_short_balance_writes_nothing_and_is_refused(pg: Database) -> None:
    ledger = Ledger(pg)
    user = await funded_user(ledger, 9003, TON)
    assert await ledger._hold_in_one_statement(user, TON + 1, "too-much") is None
    with pytest.raises(InsufficientFunds):
        await ledger.hold(user, TON + 1, "too-much")
    assert (await ledger.balances(user)).available == TON
    assert await ledger.get_hold("too-much") is None
    assert (await ledger.audit()).ok


async def test_a_key_applies_once_through_the_statement(pg: Database) -> None:
    ledger = Ledger(pg)
    user = await funded_user(ledger, 9004, 5 * TON)
    first = await ledger.hold(user, TON, "turn-once")
    assert await ledger._hold_in_one_statement(user, TON, "turn-once") is None  # no twin rows
    again = await ledger.hold(user, TON, "turn-once")
    assert again.replayed and again.transaction_id == first.transaction_id
    assert again.legs == first.legs
    with pytest.raises(IdempotencyConflict):
        await ledger.hold(user, 2 * TON, "turn-once")
    assert (await ledger.balances(user)).held == TON
    assert (await ledger.audit()).ok


async def test_racing_holds_never_overdraw(pg: Database) -> None:
    ledger = Ledger(pg)
    user = await funded_user(ledger, 9005, 10 * TON)

    async def one(i: int) -> bool:
        try:
            await ledger.hold(user, TON, f"race-{i}")
        except InsufficientFunds:
            return False
        return True

    won = await asyncio.gather(*(one(i) for i in range(25)))
    assert sum(won) == 10
    balances = await ledger.balances(user)
    assert (balances.available, balances.held) == (0, 10 * TON)
    assert (await ledger.audit()).ok


async def test_a_debit_never_stays_without_its_credit(pg: Database) -> None:
    """A user without a hold account (never made by the code, but a database is what it is):
    the statement writes nothing, not even the debit, and the general path says why."""
    ledger = Ledger(pg)
    user = await funded_user(ledger, 9006, TON)
    async with pg.session() as session, session.begin():
        await session.execute(
            delete(Account).where(Account.kind == AccountKind.HOLD, Account.owner_id == user)
        )
    assert await ledger._hold_in_one_statement(user, TON // 2, "orphan") is None
    assert (await ledger.balances(user)).available == TON
    with pytest.raises(NotFound):
        await ledger.hold(user, TON // 2, "orphan")
    assert (await ledger.balances(user)).available == TON
    assert (await ledger.audit()).ok


async def counted(db: Database, operation: Awaitable[object]) -> tuple[int, list[str]]:
    """The connections ``operation`` checked out and the statements it sent."""
    checkouts: list[object] = []
    statements: list[str] = []

    def checkout(*_: object) -> None:
        checkouts.append(1)

    def statement(_conn: object, _cursor: object, sql: str, *_: object) -> None:
        statements.append(sql)

    engine = db.engine.sync_engine
    event.listen(engine, "checkout", checkout)
    event.listen(engine, "before_cursor_execute", statement)
    try:
        await operation
    finally:
        event.remove(engine, "checkout", checkout)
        event.remove(engine, "before_cursor_execute", statement)
    return len(checkouts), statements


async def test_a_hold_and_its_settlement_are_one_statement_each(db: Database) -> None:
    """Counted as the database sees them: on PostgreSQL a priced turn's hold and its
    settlement each send one statement on one connection, unpinged (one round trip each on the
    wire: test_ledger_round_trips); on SQLite each is one transaction on one connection."""
    ledger = Ledger(db)
    user = await funded_user(ledger, 9007, 5 * TON)
    await ledger.hold(user, TON, "turn-warm")  # the connection's first use
    hold = await counted(db, ledger.hold(user, TON, "turn-counted"))
    settle = await counted(
        db, ledger.settle("turn-counted", TON // 3, provider_id=None, share_bps=0)
    )
    assert hold[0] == settle[0] == 1
    if db.dialect == "postgresql":
        assert len(hold[1]) == len(settle[1]) == 1
    else:  # the general path: BEGIN IMMEDIATE, the key, the hold, two balances, two entries...
        assert hold[1][0] == "BEGIN IMMEDIATE" and len(hold[1]) > 1
    assert (await ledger.balances(user)).held == TON
    assert (await ledger.audit()).ok
