"""A backlog of deposits through the chain watcher's page batch (:mod:`backend.ton.crediting`),
on SQLite and PostgreSQL: each deposit credited once through crashes in the middle of a page,
restarts and a replay from the start; and a local TON Center no kinder than the real one."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import pytest
from sqlalchemy import delete, func, select

from backend.db import Database
from backend.ledger import Ledger
from backend.models import AccountKind, TonCursor, TonDeposit, TonDepositStatus
from backend.notifications import pending_notifications
from backend.ton.localnet import LocalTonCenter, LocalTonCenterServer
from backend.ton.toncenter import TonCenter, TonCenterError
from backend.ton.watcher import DepositWatcher
from backend.users import get_or_create_user

TON = 1_000_000_000
DEPOSIT = "0:" + "D1" * 32


class Crash(Exception):
    """Stands for the process dying at a checkpoint."""


def dies_at(point: str, after: int) -> Callable[[str], None]:
    """A checkpoint that raises Crash the ``after``-th time the watcher passes ``point``."""
    left = after

    def checkpoint(name: str) -> None:
        nonlocal left
        if name == point:
            left -= 1
            if left == 0:
                raise Crash(name)

    return checkpoint


async def counts(db: Database) -> tuple[int, int]:
    async with db.session() as session:
        rows = await session.scalar(select(func.count(TonDeposit.id)))
        cursor = await session.scalar(select(TonCursor.last_lt))
    return int(rows or 0), int(cursor or 0)


async def test_a_backlog_of_500_is_credited_once_through_crashes_mid_page_and_a_replay(
    db: Database,
) -> None:
    rng = random.Random(19)
    net = LocalTonCenter()
    users = [await get_or_create_user(db, 9000 + i) for i in range(500)]
    owed = {}
    for i, user in enumerate(users):
        owed[user.id] = TON + i
        net.add_incoming(DEPOSIT, TON + i, comment=user.deposit_memo)
        if i % 25 == 0:  # junk between them: never credited, still recorded
            net.add_incoming(DEPOSIT, 2 * TON, comment=f"CCNOBODY{i:04d}")
            net.add_incoming(DEPOSIT, 3 * TON, comment=user.deposit_memo, bounced=True)
    txs = net.transactions_of(DEPOSIT)
    ledger = Ledger(db)

    async with LocalTonCenterServer(net) as url, TonCenter(url) as api:

        def watcher(checkpoint: Callable[[str], None] | None = None) -> DepositWatcher:
            return DepositWatcher(db, ledger, api, DEPOSIT, page_size=200, checkpoint=checkpoint)

        async def drain(w: DepositWatcher) -> None:
            while await w.poll_once():
                pass

        # Dies while crediting the first page: nothing of it is written, the cursor stays.
        with pytest.raises(Crash):
            await drain(watcher(dies_at("credited", 150)))
        assert await counts(db) == (0, 0)
        assert (await ledger.balances(users[0].id)).available == 0

        # Dies after the first page's commit: exactly that page is recorded.
        with pytest.raises(Crash):
            await drain(watcher(dies_at("fetched", 2)))
        rows, cursor = await counts(db)
        assert (rows, cursor) == (200, int(txs[199]["lt"]))

        crashes = 2
        while True:  # then anywhere, until one run gets through
            point = rng.choice(["fetched", "credited", "recorded"])
            try:
                await drain(watcher(dies_at(point, rng.randint(1, 300))))
                break
            except Crash:
                crashes += 1

        # A replay from the start (the cursor lost): everything is read again, nothing doubles.
        async with db.session() as session, session.begin():
            await session.execute(delete(TonCursor))
        await drain(watcher())

    async with db.session() as session:
        balances = dict(
            (
                await session.execute(
                    select(TonDeposit.user_id, func.sum(TonDeposit.amount))
                    .where(TonDeposit.status == TonDepositStatus.CREDITED)
                    .group_by(TonDeposit.user_id)
                )
            ).all()
        )
    assert balances == owed
    for user in rng.sample(users, 20):
        assert (await ledger.balances(user.id)).available == owed[user.id]
    assert await counts(db) == (len(txs), int(txs[-1]["lt"]))
    assert len(await pending_notifications(db, limit=1000)) == 500
    assert await ledger.balance(AccountKind.TON_IN) == -sum(owed.values())
    assert (await ledger.audit()).ok


async def test_a_page_the_batch_refuses_goes_one_by_one(db: Database) -> None:
    """A ledger key used before (a crash of the one-by-one path between crediting and
    recording): the page goes one transaction at a time, and that one is not credited twice."""
    net = LocalTonCenter()
    users = [await get_or_create_user(db, 9600 + i) for i in range(5)]
    for user in users:
        net.add_incoming(DEPOSIT, 2 * TON, comment=user.deposit_memo)
    ledger = Ledger(db)
    async with LocalTonCenterServer(net) as url, TonCenter(url) as api:
        first = DepositWatcher(db, ledger, api, DEPOSIT, checkpoint=dies_at("credited", 1))
        with pytest.raises(Crash):
            await first.handle(net.transactions_of(DEPOSIT)[2])  # credited, never recorded
        w = DepositWatcher(db, ledger, api, DEPOSIT)
        while await w.poll_once():
            pass
    for user in users:
        assert (await ledger.balances(user.id)).available == 2 * TON
    assert await counts(db) == (5, int(net.transactions_of(DEPOSIT)[-1]["lt"]))
    assert (await ledger.audit()).ok


async def test_the_local_ton_center_pages_and_limits_like_the_real_one(db: Database) -> None:
    now = [100.0]
    net = LocalTonCenter(rps=1, rate_clock=lambda: now[0])
    user = await get_or_create_user(db, 9700)
    for i in range(3):
        net.add_incoming(DEPOSIT, TON + i, comment=user.deposit_memo)
    async with LocalTonCenterServer(net) as url, TonCenter(url) as api:
        with pytest.raises(TonCenterError) as refused:
            await api.transactions(DEPOSIT, start_lt=1, limit=1001)
        assert (refused.value.status, refused.value.transient) == (422, False)
        with pytest.raises(TonCenterError) as limited:  # the second request in one second
            await api.transactions(DEPOSIT, start_lt=1, limit=1000)
        assert (limited.value.status, limited.value.transient) == (429, True)
        now[0] += 1.0
        assert len(await api.transactions(DEPOSIT, start_lt=1, limit=1000)) == 3

        # The watcher lives with it: it backs off and credits everything, once.
        w = DepositWatcher(db, Ledger(db), api, DEPOSIT, poll_interval_s=0.01, backoff_max_s=0.05)
        stop = asyncio.Event()
        task = asyncio.create_task(w.run(stop))
        deadline = time.monotonic() + 30
        while await w.cursor() < int(net.transactions_of(DEPOSIT)[-1]["lt"]):
            assert time.monotonic() < deadline, "the watcher did not catch up"
            now[0] += 1.0  # a second passes between polls
            await asyncio.sleep(0.02)
        stop.set()
        await task
    assert (await Ledger(db).balances(user.id)).available == 3 * TON + 3


async def test_a_balance_that_would_overflow_stops_the_page_at_that_deposit(db: Database) -> None:
    """The batch's balance update is guarded like the ledger's: a credit that would take a
    balance past 64 bits writes nothing of the page; one by one, the deposits before it are
    credited and the watcher stops at it, its cursor just before it."""
    from sqlalchemy import update

    from backend.ledger import InvalidAmount
    from backend.models import Account
    from backend.settings import MAX_NANO

    net = LocalTonCenter()
    ok, full = await get_or_create_user(db, 9800), await get_or_create_user(db, 9801)
    async with db.session() as session, session.begin():
        await session.execute(
            update(Account)
            .where(Account.kind == AccountKind.USER, Account.owner_id == full.id)
            .values(balance=MAX_NANO - 5)
        )
    first = net.add_incoming(DEPOSIT, TON, comment=ok.deposit_memo)
    net.add_incoming(DEPOSIT, 10, comment=full.deposit_memo)
    ledger = Ledger(db)
    async with LocalTonCenterServer(net) as url, TonCenter(url) as api:
        w = DepositWatcher(db, ledger, api, DEPOSIT)
        with pytest.raises(InvalidAmount):
            await w.poll_once()
        with pytest.raises(InvalidAmount):  # again next time: never skipped, never doubled
            await w.poll_once()
    assert (await ledger.balances(ok.id)).available == TON
    assert (await ledger.balances(full.id)).available == MAX_NANO - 5
    assert await counts(db) == (1, int(first["lt"]))


async def test_run_reads_the_next_page_while_crediting_one_and_a_crash_loses_nothing(
    db: Database,
) -> None:
    """``run()`` reads a backlog's next page while it credits one (the page the next poll asks
    for); a crash mid-page drops the page read ahead with the uncommitted one, and the next
    run credits every deposit once."""
    net = LocalTonCenter()
    users = [await get_or_create_user(db, 9900 + i) for i in range(250)]
    for i, user in enumerate(users):
        net.add_incoming(DEPOSIT, TON + i, comment=user.deposit_memo)
    txs = net.transactions_of(DEPOSIT)
    ledger = Ledger(db)
    async with LocalTonCenterServer(net) as url, TonCenter(url) as api:
        ahead: list[int | None] = []
        crash = dies_at("credited", 150)  # in the second page, its read ahead in flight

        def checkpoint(name: str) -> None:
            if name == "credited" and not ahead:  # the first page's first credit
                ahead.append(None if w._ahead is None else w._ahead[0])
            crash(name)

        w = DepositWatcher(
            db, ledger, api, DEPOSIT, page_size=100, poll_interval_s=0.01, checkpoint=checkpoint
        )
        with pytest.raises(Crash):
            await w.run(asyncio.Event())
        assert ahead == [int(txs[99]["lt"]) + 1]  # the second page, read while the first went
        assert w._ahead is None  # the third page's read, dropped with the crash
        assert await counts(db) == (100, int(txs[99]["lt"]))

        again = DepositWatcher(db, ledger, api, DEPOSIT, page_size=100)
        while await again.poll_once():  # what run() does, a poll at a time
            pass
    for i, user in enumerate(users):
        assert (await ledger.balances(user.id)).available == TON + i
    assert await counts(db) == (250, int(txs[-1]["lt"]))
    assert (await ledger.audit()).ok
