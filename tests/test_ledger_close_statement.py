"""A hold's close (its settlement or its release) in one statement on PostgreSQL (issue 19: a
turn's settlement is one round trip): it writes exactly the rows the general path writes, or
nothing at all, and exactly-once holds on both databases: a replayed settlement does nothing,
twenty racing settlements of one turn charge it once, a settlement racing the sweeper's
release leaves one of them standing, and holds and settlements of one user never deadlock."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import delete, select, update

from backend.db import Database
from backend.ledger import (
    Balances,
    IdempotencyConflict,
    InvalidAmount,
    InvalidState,
    Ledger,
    Leg,
    NotFound,
    Receipt,
    TurnUsage,
)
from backend.ledger_pg import Close, close_in_one_statement
from backend.ledger_write import request_hash
from backend.models import Account, AccountKind, TurnRecord
from backend.settings import MAX_NANO
from backend.users import get_or_create_user
from tests.support.turns import funded_user, hold_rows

TON = 1_000_000_000
USAGE = TurnUsage(
    model="m",
    prompt_tokens=7,
    cached_prompt_tokens=2,
    completion_tokens=11,
    finish_reason="stop",
    worker_id="w-1",
    tee="tdx",
)


async def written(db: Database, hold_key: str, key: str) -> tuple[object, ...]:
    """What a hold's close left in the database, without ids, times and owners."""
    async with db.session() as session:
        hold, tx, entries = await hold_rows(session, hold_key, key)
        turn = await session.scalar(select(TurnRecord).where(TurnRecord.turn_id == hold_key))
        record = None
        if turn is not None:
            record = (
                turn.user_id == hold.user_id,
                turn.model,
                turn.prompt_tokens,
                turn.cached_prompt_tokens,
                turn.completion_tokens,
                turn.cost,
                turn.provider_earned,
                turn.worker_id,
                turn.tee,
                turn.finish_reason,
                turn.created_at is not None,
            )
        return (
            (hold.amount, hold.state, hold.charged, hold.closed_at is not None),
            (tx.kind, tx.request_hash, tx.reason, tx.subject_id == hold.id),
            entries,
            record,
        )


@pytest.mark.parametrize("cost", [0, TON // 3, 2 * TON, 5 * TON])
async def test_a_settlement_in_one_statement_writes_what_the_general_path_writes(
    pg: Database, cost: int
) -> None:
    fast, general = Ledger(pg), Ledger(pg, one_statement=False)
    provider = (await get_or_create_user(pg, 9100, "en")).id
    one = await funded_user(fast, 9101, 5 * TON)
    two = await funded_user(general, 9102, 5 * TON)
    await fast.hold(one, 2 * TON, "turn-fast")
    await general.hold(two, 2 * TON, "turn-general")

    request = {"hold": "turn-fast", "cost": cost, "provider": provider, "share": 7000}
    closed = await fast._close_in_one_statement(
        "turn-fast", "settle:turn-fast", "settle", request, cost, provider, 7000, USAGE
    )
    assert closed is not None  # it applied: one statement, no fallback
    charged = min(cost, 2 * TON)
    earned = charged * 7000 // 10_000
    legs = (
        Leg(AccountKind.HOLD, one, -2 * TON),
        Leg(AccountKind.USER, one, 2 * TON - charged),
        Leg(AccountKind.PROVIDER, provider, earned),
        Leg(AccountKind.PLATFORM, 0, charged - earned),
    )
    assert closed.legs == tuple(leg for leg in legs if leg.amount)
    assert (closed.key, closed.kind, closed.replayed) == ("settle:turn-fast", "settle", False)
    await general.settle("turn-general", cost, provider_id=provider, share_bps=7000, usage=USAGE)

    fast_rows = await written(pg, "turn-fast", "settle:turn-fast")
    general_rows = await written(pg, "turn-general", "settle:turn-general")
    assert fast_rows[1][1] == request_hash("settle", request)  # the request's own fingerprint
    assert fast_rows[1][1] != general_rows[1][1]  # it names the hold: the rest must be equal
    assert (fast_rows[0], fast_rows[2:]) == (general_rows[0], general_rows[2:])
    assert (fast_rows[1][0], fast_rows[1][2:]) == (general_rows[1][0], general_rows[1][2:])
    assert await fast.balances(one) == await general.balances(two)
    assert (await fast.audit()).ok


async def test_a_release_and_a_providerless_settlement_match_the_general_path(
    pg: Database,
) -> None:
    fast, general = Ledger(pg), Ledger(pg, one_statement=False)
    users = [await funded_user(fast, 9110 + i, 5 * TON) for i in range(4)]
    for i, user in enumerate(users):
        await fast.hold(user, TON, f"turn-{i}")
    await fast.release("turn-0")
    await general.release("turn-1")
    await fast.settle("turn-2", TON // 7, provider_id=None, share_bps=7000)
    await general.settle("turn-3", TON // 7, provider_id=None, share_bps=7000)
    for a, b in ((0, 1), (2, 3)):
        first = await written(pg, f"turn-{a}", f"{'release' if a == 0 else 'settle'}:turn-{a}")
        second = await written(pg, f"turn-{b}", f"{'release' if b == 1 else 'settle'}:turn-{b}")
        assert (first[0], first[2:], first[1][0]) == (second[0], second[2:], second[1][0])
        assert await fast.balances(users[a]) == await general.balances(users[b])
    assert (await fast.audit()).ok


async def test_a_replayed_settlement_does_nothing(db: Database) -> None:
    ledger = Ledger(db)
    user = await funded_user(ledger, 9120, 5 * TON)
    await ledger.hold(user, 2 * TON, "turn-replay")
    first = await ledger.settle("turn-replay", TON, provider_id=None, share_bps=0, usage=USAGE)
    before = await ledger.balances(user)
    again = await ledger.settle("turn-replay", TON, provider_id=None, share_bps=0, usage=USAGE)
    assert again.replayed and not first.replayed
    assert (again.transaction_id, again.legs) == (first.transaction_id, first.legs)
    assert await ledger.balances(user) == before
    with pytest.raises(IdempotencyConflict):
        await ledger.settle("turn-replay", 2 * TON, provider_id=None, share_bps=0)
    with pytest.raises(InvalidState):
        await ledger.release("turn-replay")
    with pytest.raises(NotFound):
        await ledger.settle("never-held", TON, provider_id=None, share_bps=0)
    assert (await ledger.balances(user)).available == 4 * TON
    assert (await ledger.audit()).ok


async def test_twenty_racing_settlements_of_one_turn_charge_it_once(db: Database) -> None:
    ledger = Ledger(db)
    provider = (await get_or_create_user(db, 9130, "en")).id
    user = await funded_user(ledger, 9131, 5 * TON)
    await ledger.hold(user, 2 * TON, "turn-race")
    receipts = await asyncio.gather(
        *(
            ledger.settle("turn-race", TON, provider_id=provider, share_bps=7000, usage=USAGE)
            for _ in range(20)
        )
    )
    assert len({r.transaction_id for r in receipts}) == 1
    assert sum(not r.replayed for r in receipts) == 1
    assert (await ledger.balances(user)).available == 4 * TON
    assert (await ledger.balances(provider)).earned == 7 * TON // 10
    assert await ledger.balance(AccountKind.PLATFORM) == 3 * TON // 10
    async with db.session() as session:
        turns = await session.scalars(select(TurnRecord).where(TurnRecord.turn_id == "turn-race"))
        assert len(list(turns)) == 1
    assert (await ledger.audit()).ok


async def test_a_settlement_racing_the_sweepers_release_one_wins(db: Database) -> None:
    ledger = Ledger(db)
    user = await funded_user(ledger, 9140, 100 * TON)
    charged = 0
    for round_ in range(10):
        key = f"turn-{round_}"
        await ledger.hold(user, 2 * TON, key)

        async def settle(key: str = key) -> str:
            try:
                await ledger.settle(key, TON, provider_id=None, share_bps=0)
            except InvalidState:
                return "lost"
            return "settled"

        async def release(key: str = key) -> str:
            try:
                await ledger.release(key)
            except InvalidState:
                return "lost"
            return "released"

        outcomes = await asyncio.gather(settle(), release(), settle(), release())
        assert sorted(set(outcomes) - {"lost"}) in (["settled"], ["released"])
        hold = await ledger.get_hold(key)
        assert hold is not None and hold.state in ("settled", "released")
        assert hold.charged == (TON if hold.state == "settled" else 0)
        charged += hold.charged
    balances = await ledger.balances(user)
    assert (balances.available, balances.held) == (100 * TON - charged, 0)
    assert (await ledger.audit()).ok


async def test_holds_and_settlements_of_one_user_never_deadlock(db: Database) -> None:
    """A user's next hold (balance, then holds) races the settlement of their last turn, which
    locks the same accounts: every one goes through, none waits on the other for ever."""
    ledger = Ledger(db)
    provider = (await get_or_create_user(db, 9150, "en")).id
    user = await funded_user(ledger, 9151, 100 * TON)
    for i in range(20):
        await ledger.hold(user, TON, f"old-{i}")

    async def settle(i: int) -> Receipt:
        return await ledger.settle(f"old-{i}", TON // 2, provider_id=provider, share_bps=7000)

    async def hold(i: int) -> Receipt:
        return await ledger.hold(user, TON, f"new-{i}")

    done = await asyncio.gather(*(f(i) for i in range(20) for f in (settle, hold)))
    assert not any(r.replayed for r in done)
    balances = await ledger.balances(user)
    assert (balances.available, balances.held) == (100 * TON - 20 * TON - 10 * TON, 20 * TON)
    assert (await ledger.audit()).ok


async def test_a_missing_or_overflowing_account_writes_nothing(pg: Database) -> None:
    ledger = Ledger(pg)
    provider = (await get_or_create_user(pg, 9160, "en")).id
    user = await funded_user(ledger, 9161, 5 * TON)
    await ledger.hold(user, 2 * TON, "turn-orphan")
    async with pg.session() as session, session.begin():
        await session.execute(
            delete(Account).where(
                Account.kind == AccountKind.PROVIDER, Account.owner_id == provider
            )
        )
    request = {"hold": "turn-orphan", "cost": TON, "provider": provider, "share": 7000}
    args = ("turn-orphan", "settle:turn-orphan", "settle", request, TON, provider, 7000)
    assert await ledger._close_in_one_statement(*args) is None
    with pytest.raises(NotFound):
        await ledger.settle("turn-orphan", TON, provider_id=provider, share_bps=7000)
    hold = await ledger.get_hold("turn-orphan")
    assert hold is not None and hold.state == "open"  # still open: nothing was written

    async with pg.session() as session, session.begin():
        await session.execute(
            update(Account)
            .where(Account.kind == AccountKind.PLATFORM)
            .values(balance=MAX_NANO - TON // 2)
        )
    with pytest.raises(InvalidAmount):
        await ledger.settle("turn-orphan", TON, provider_id=None, share_bps=0)
    hold = await ledger.get_hold("turn-orphan")
    assert hold is not None and hold.state == "open"
    assert (await ledger.balances(user)).held == 2 * TON


async def test_a_batch_of_closes_is_each_its_own_transaction(pg: Database) -> None:
    """Closes in one statement (group commit): each its own transaction, key and entries; a
    hold no longer open is left out; a batch one close would fail is written not at all."""
    ledger = Ledger(pg)
    provider = (await get_or_create_user(pg, 9170, "en")).id
    users = [await funded_user(ledger, 9171 + i, 5 * TON) for i in range(4)]
    for i, user in enumerate(users):
        await ledger.hold(user, TON, f"batch-{i}")
    await ledger.release("batch-3")

    def settle(i: int, cost: int) -> Close:
        request = {"hold": f"batch-{i}", "cost": cost, "provider": provider, "share": 7000}
        fingerprint = request_hash("settle", request)
        return Close(f"batch-{i}", f"settle:batch-{i}", "settle", fingerprint, cost, provider, 7000)

    release = Close(
        "batch-1", "release:batch-1", "release", request_hash("release", {"hold": "batch-1"})
    )
    clash = Close("batch-2", "release:batch-3", "release", "x")  # a key used already
    assert await close_in_one_statement(pg, [settle(0, TON // 2), release, clash]) is None
    for i in range(3):  # nothing written: all three still open
        assert getattr(await ledger.get_hold(f"batch-{i}"), "state", None) == "open"

    done = await close_in_one_statement(
        pg, [settle(0, TON // 2), release, settle(2, 3 * TON), settle(3, TON)]
    )
    assert done is not None and done[3] is None  # batch-3 was released before
    receipts = [r for r in done if r is not None]
    assert len({r.transaction_id for r in receipts}) == 3
    assert [r.kind for r in receipts] == ["settle", "release", "settle"]
    assert [await ledger.balances(user) for user in users[:3]] == [
        Balances(available=5 * TON - TON // 2),
        Balances(available=5 * TON),
        Balances(available=4 * TON),
    ]
    assert (await ledger.balances(provider)).earned == (TON // 2 + TON) * 7000 // 10_000
    again = await ledger.settle("batch-0", TON // 2, provider_id=provider, share_bps=7000)
    assert again.replayed and again.transaction_id == receipts[0].transaction_id
    assert (await ledger.audit()).ok


async def test_group_committed_settlements_one_refused_the_rest_go_through(db: Database) -> None:
    ledger = Ledger(db)
    provider = (await get_or_create_user(db, 9180, "en")).id
    user = await funded_user(ledger, 9181, 100 * TON)
    for i in range(30):
        await ledger.hold(user, TON, f"many-{i}")
    await ledger.credit_deposit(user, TON, "taken")

    async def settle(i: int) -> Receipt | str:
        key = "taken" if i == 17 else None  # a key used for another request: refused alone
        try:
            return await ledger.settle(
                f"many-{i}", TON // 4, provider_id=provider, share_bps=7000, key=key, usage=USAGE
            )
        except IdempotencyConflict:
            return "refused"

    done = await asyncio.gather(*(settle(i) for i in range(30)))
    assert done[17] == "refused"
    receipts = [r for r in done if isinstance(r, Receipt)]
    assert len({r.transaction_id for r in receipts}) == 29 and not any(r.replayed for r in receipts)
    balances = await ledger.balances(user)
    assert (balances.available, balances.held) == (101 * TON - 30 * TON + 29 * (3 * TON // 4), TON)
    assert (await ledger.audit()).ok
