"""Deposits through the chain watcher, on SQLite and PostgreSQL, against a local TON Center
on loopback: every deposit is credited once, whatever crashes and API errors happen."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator

import pytest
from pytoniq_core import begin_cell
from sqlalchemy import func, select

from backend.db import Database
from backend.ledger import Ledger
from backend.models import AccountKind, TonDeposit, TonDepositStatus
from backend.money import parse_ton
from backend.ton.comment import comment_cell, decode_comment, deposit_transaction
from backend.ton.localnet import LocalTonCenter, LocalTonCenterServer
from backend.ton.toncenter import TonCenter
from backend.ton.watcher import (
    DepositEvent,
    DepositWatcher,
    mark_delivered,
    pending_notifications,
    resolve_unclaimed,
    unclaimed_deposits,
)
from backend.users import get_or_create_user

TON = 1_000_000_000
DEPOSIT = "0:" + "D1" * 32


class Crash(Exception):
    """Stands for the process dying at a checkpoint."""


@pytest.fixture
def net() -> LocalTonCenter:
    return LocalTonCenter()


@pytest.fixture
async def api(net: LocalTonCenter) -> AsyncIterator[TonCenter]:
    async with LocalTonCenterServer(net) as url, TonCenter(url, "test-key") as client:
        yield client


def watcher(db: Database, api: TonCenter, **kwargs: object) -> DepositWatcher:
    return DepositWatcher(db, Ledger(db), api, DEPOSIT, poll_interval_s=0.01, **kwargs)  # type: ignore[arg-type]


async def drain(w: DepositWatcher) -> None:
    while await w.poll_once():
        pass


async def test_a_deposit_with_the_users_memo_is_credited_once_and_told(
    db: Database, net: LocalTonCenter, api: TonCenter
) -> None:
    user = await get_or_create_user(db, 501)
    net.add_incoming(DEPOSIT, parse_ton("1.5"), comment=user.deposit_memo.lower() + " ")
    told: list[DepositEvent] = []

    async def notify(event: DepositEvent) -> None:
        told.append(event)

    w = watcher(db, api, notify=notify)
    await drain(w)
    await drain(watcher(db, api, notify=notify))  # a second watcher over the same chain

    ledger = Ledger(db)
    assert (await ledger.balances(user.id)).available == 1_500_000_000
    assert await ledger.balance(AccountKind.TON_IN) == -1_500_000_000
    assert [(e.user_id, e.amount) for e in told] == [(user.id, 1_500_000_000)]
    outbox = await pending_notifications(db)
    assert [(n.user_id, n.amount, n.kind) for n in outbox] == [
        (user.id, 1_500_000_000, "deposit_credited")
    ]
    assert await mark_delivered(db, outbox[0].id)
    assert not await mark_delivered(db, outbox[0].id)
    assert await pending_notifications(db) == []
    assert (await ledger.audit()).ok


async def test_bounced_external_zero_aborted_and_unknown_memos_are_not_credited(
    db: Database, net: LocalTonCenter, api: TonCenter
) -> None:
    user = await get_or_create_user(db, 502)
    memo = user.deposit_memo
    net.add_incoming(DEPOSIT, 3 * TON, comment=memo, bounced=True)
    net.add_incoming(DEPOSIT, 0, comment=memo, source=None)  # external
    net.add_incoming(DEPOSIT, 0, comment=memo)  # zero value
    net.add_incoming(DEPOSIT, 4 * TON, comment=memo, aborted=True)
    stranger = net.add_incoming(DEPOSIT, 7 * TON, comment="CCNOBODY0000")
    odd = begin_cell().store_uint(0, 32).store_bytes(b"\xff\xfe\x00bad").end_cell()
    net.add_incoming(DEPOSIT, 8 * TON, body=odd)  # not UTF-8
    jetton = begin_cell().store_uint(0x7362D09C, 32).store_uint(1, 64).end_cell()
    net.add_incoming(DEPOSIT, 9 * TON, body=jetton)  # not a text comment
    net.add_incoming(DEPOSIT, 1 * TON)  # no comment at all
    net.add_incoming(DEPOSIT, 2 * TON, comment=memo)  # the only good one, after the odd ones

    w = watcher(db, api)
    await drain(w)

    ledger = Ledger(db)
    assert (await ledger.balances(user.id)).available == 2 * TON
    async with db.session() as session:
        rows = list(await session.scalars(select(TonDeposit).order_by(TonDeposit.lt)))
    assert [r.status for r in rows] == [
        TonDepositStatus.IGNORED,
        TonDepositStatus.IGNORED,
        TonDepositStatus.IGNORED,
        TonDepositStatus.IGNORED,
        TonDepositStatus.UNCLAIMED,
        TonDepositStatus.UNCLAIMED,
        TonDepositStatus.UNCLAIMED,
        TonDepositStatus.UNCLAIMED,
        TonDepositStatus.CREDITED,
    ]
    assert await w.cursor() == int(net.transactions_of(DEPOSIT)[-1]["lt"])

    unclaimed = await unclaimed_deposits(db)
    assert [d.amount for d in unclaimed] == [7 * TON, 8 * TON, 9 * TON, 1 * TON]
    assert unclaimed[0].memo == "CCNOBODY0000"
    assert unclaimed[1].note == "comment is not UTF-8"

    # An admin resolves the first one: credited once, under the chain transaction's key.
    first = unclaimed[0]
    assert first.tx_hash in first.ledger_key and stranger["lt"] in first.ledger_key
    await resolve_unclaimed(db, ledger, first.id, user.id, by="admin 1")
    await resolve_unclaimed(db, ledger, first.id, user.id, by="admin 1")
    assert (await ledger.balances(user.id)).available == 9 * TON
    assert [d.amount for d in await unclaimed_deposits(db)] == [8 * TON, 9 * TON, 1 * TON]
    assert (await ledger.audit()).ok


async def test_rate_limits_and_server_errors_back_off_and_skip_nothing(
    db: Database, net: LocalTonCenter, api: TonCenter
) -> None:
    import asyncio

    user = await get_or_create_user(db, 503)
    for i in range(30):
        net.add_incoming(DEPOSIT, TON + i, comment=user.deposit_memo)
    net.faults.extend([429, 429, 502, 500, 429])
    w = DepositWatcher(
        db, Ledger(db), api, DEPOSIT, page_size=7, poll_interval_s=0.01, backoff_max_s=0.05
    )
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    deadline = time.monotonic() + 30
    while await w.cursor() < int(net.transactions_of(DEPOSIT)[-1]["lt"]):
        assert time.monotonic() < deadline, "the watcher did not catch up"
        await asyncio.sleep(0.02)
    stop.set()
    await task
    assert not net.faults
    assert (await Ledger(db).balances(user.id)).available == 30 * TON + sum(range(30))


async def test_restarts_anywhere_in_a_backlog_of_1000_credit_each_deposit_once(
    db: Database, net: LocalTonCenter, api: TonCenter
) -> None:
    rng = random.Random(6)
    users = [await get_or_create_user(db, 600 + i) for i in range(10)]
    expected = {u.id: 0 for u in users}
    for _ in range(1000):
        user = rng.choice(users)
        amount = rng.randint(1, 5 * TON)
        net.add_incoming(DEPOSIT, amount, comment=user.deposit_memo)
        expected[user.id] += amount

    crashes = 0
    points = ["fetched", "credited", "recorded"]
    started = time.monotonic()
    while True:
        # Each run dies at a random checkpoint a random number of transactions in.
        point = rng.choice(points)
        countdown = rng.randint(1, 3) if point == "fetched" else rng.randint(1, 150)

        def checkpoint(name: str, point: str = point) -> None:
            nonlocal countdown
            if name == point:
                countdown -= 1
                if countdown == 0:
                    raise Crash(name)

        w = watcher(db, api, checkpoint=checkpoint)
        try:
            await drain(w)
            break
        except Crash:
            crashes += 1
    elapsed = time.monotonic() - started

    ledger = Ledger(db)
    for user in users:
        assert (await ledger.balances(user.id)).available == expected[user.id]
    async with db.session() as session:
        assert await session.scalar(select(func.count(TonDeposit.id))) == 1000
    assert len(await pending_notifications(db, limit=2000)) == 1000
    assert await ledger.balance(AccountKind.TON_IN) == -sum(expected.values())
    assert crashes >= 5
    assert (await ledger.audit()).ok
    print(f"1000-tx backlog with {crashes} crashes on {db.dialect}: {elapsed:.1f} s")


def test_comments_and_topup_messages_are_exact() -> None:
    message = deposit_transaction(DEPOSIT, "CCABCDEF0123", parse_ton("1.5"), now=1_000)
    assert message["validUntil"] == 1_600
    (item,) = message["messages"]  # type: ignore[misc]
    assert item["amount"] == "1500000000"
    assert decode_comment(item["payload"]).memo == "CCABCDEF0123"
    assert item["address"].startswith("UQ")  # non-bounceable: a deposit never bounces back
    long = "é" * 200  # longer than one cell: a snake string over refs
    assert decode_comment(_b64(comment_cell(long))).memo == long
    assert parse_ton("0.000000001") == 1
    assert parse_ton("1,5") == 1_500_000_000


def _b64(cell: object) -> str:
    import base64

    return base64.b64encode(cell.to_boc()).decode()  # type: ignore[attr-defined]
