"""Deposits through the chain watcher, on SQLite and PostgreSQL, against a local TON Center
on loopback: every deposit is credited once, whatever crashes and API errors happen.

Real recorded TON Center v3 replies (``tests/fixtures/toncenter/``, README there) are served
verbatim by the local TON Center, which applies the real server's query rules."""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pytoniq_core import Address, begin_cell
from sqlalchemy import func, select, update

from backend.db import Database
from backend.ledger import Ledger
from backend.models import AccountKind, TonDeposit, TonDepositStatus, User
from backend.money import parse_amount
from backend.notifications import mark_delivered, pending_notifications
from backend.ton.comment import comment_cell, decode_comment, deposit_transaction
from backend.ton.localnet import BOUNCE_FEE, LocalTonCenter, LocalTonCenterServer
from backend.ton.toncenter import TonCenter
from backend.ton.transactions import classify
from backend.ton.unclaimed import jetton_notifications, resolve_unclaimed, unclaimed_deposits
from backend.ton.watcher import DepositEvent, DepositWatcher
from backend.users import get_or_create_user
from tests.support.payouts import Clock

TON = 1_000_000_000
DEPOSIT = "0:" + "D1" * 32
RECORDED = Path(__file__).parent / "fixtures" / "toncenter"


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
    net.add_incoming(
        DEPOSIT, parse_amount("1.5", comma=False), comment=user.deposit_memo.lower() + " "
    )
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


async def test_bounced_external_zero_and_unknown_memos_are_not_credited(
    db: Database, net: LocalTonCenter, api: TonCenter, caplog: pytest.LogCaptureFixture
) -> None:
    user = await get_or_create_user(db, 502)
    memo = user.deposit_memo
    net.add_incoming(DEPOSIT, 3 * TON, comment=memo, bounced=True)
    net.add_incoming(DEPOSIT, 0, comment=memo, source=None)  # external
    net.add_incoming(DEPOSIT, 0, comment=memo)  # zero value
    net.add_incoming(DEPOSIT, 4 * TON, comment=memo, bounce=True)  # uninit: bounces back
    stranger = net.add_incoming(DEPOSIT, 7 * TON, comment="CCNOBODY0000")
    odd = begin_cell().store_uint(0, 32).store_bytes(b"\xff\xfe\x00bad").end_cell()
    net.add_incoming(DEPOSIT, 8 * TON, body=odd)  # not UTF-8
    other = begin_cell().store_uint(0x0F8A7EA5, 32).store_uint(1, 64).end_cell()
    net.add_incoming(DEPOSIT, 9 * TON, body=other)  # not a text comment
    net.add_incoming(DEPOSIT, 1 * TON)  # no comment at all
    net.add_incoming(DEPOSIT, 2 * TON, comment=memo)  # the only good one, after the odd ones

    w = watcher(db, api)
    with caplog.at_level(logging.INFO, logger="backend.ton.watcher"):
        await drain(w)

    ledger = Ledger(db)
    assert (await ledger.balances(user.id)).available == 2 * TON
    async with db.session() as session:
        rows = list(await session.scalars(select(TonDeposit).order_by(TonDeposit.lt)))
    assert [(r.status, r.amount, r.note) for r in rows[:4]] == [
        (TonDepositStatus.IGNORED, 3 * TON, "bounced message"),
        (TonDepositStatus.IGNORED, 0, "external message"),
        (TonDepositStatus.IGNORED, 0, "zero value"),
        (
            TonDepositStatus.IGNORED,
            4 * TON,  # the row keeps what was sent, and says where it went
            "aborted (compute skipped: no_state), bounced back to the sender",
        ),
    ]
    assert [r.status for r in rows[4:]] == [
        TonDepositStatus.UNCLAIMED,
        TonDepositStatus.UNCLAIMED,
        TonDepositStatus.UNCLAIMED,
        TonDepositStatus.UNCLAIMED,
        TonDepositStatus.CREDITED,
    ]
    assert await w.cursor() == int(net.transactions_of(DEPOSIT)[-1]["lt"])
    # Every row that was not credited left a line with its amount and reason.
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"ignored TON transaction #{rows[3].id}: {4 * TON} nanoTON" in x for x in lines)
    assert sum("ignored TON transaction" in line for line in lines) == 4
    assert sum("unclaimed TON deposit" in line for line in lines) == 4

    unclaimed = await unclaimed_deposits(db)
    assert [d.amount for d in unclaimed] == [7 * TON, 8 * TON, 9 * TON, 1 * TON]
    assert unclaimed[0].memo == "CCNOBODY0000"
    assert unclaimed[1].note.startswith("comment is not UTF-8")

    # An admin resolves the first one: credited once, under the chain transaction's key.
    first = unclaimed[0]
    assert first.tx_hash in first.ledger_key and stranger["lt"] in first.ledger_key
    await resolve_unclaimed(db, ledger, first.id, user.id, by="admin 1")
    await resolve_unclaimed(db, ledger, first.id, user.id, by="admin 1")
    assert (await ledger.balances(user.id)).available == 9 * TON
    assert [d.amount for d in await unclaimed_deposits(db)] == [8 * TON, 9 * TON, 1 * TON]
    with pytest.raises(LookupError, match="ignored"):  # the bounced-back one cannot be
        await resolve_unclaimed(db, ledger, rows[3].id, user.id, by="admin 1")
    assert (await ledger.audit()).ok


# ------------------------------------------------ the chain's rules for undeployed wallets


async def with_memo(db: Database, telegram_id: int, memo: str) -> int:
    """A user whose deposit memo is ``memo`` (as if the memo had been handed out before)."""
    user = await get_or_create_user(db, telegram_id)
    async with db.session() as session, session.begin():
        await session.execute(update(User).where(User.id == user.id).values(deposit_memo=memo))
    return user.id


def recorded(name: str) -> Any:
    return json.loads((RECORDED / name).read_text())


async def rows_of(db: Database, account: str) -> list[TonDeposit]:
    async with db.session() as session:
        return list(
            await session.scalars(
                select(TonDeposit).where(TonDeposit.account == account).order_by(TonDeposit.lt)
            )
        )


async def test_the_recorded_deposit_to_an_uninit_wallet_is_credited_and_the_jetton_recorded(
    db: Database, net: LocalTonCenter, api: TonCenter
) -> None:
    reply = recorded("testnet_transactions_uninit_deposit.json")
    account = reply["transactions"][0]["account"]
    net.transactions_of(account).extend(reply["transactions"])  # served verbatim
    user_id = await with_memo(db, 701, "1985597651")  # the recorded comment

    w = DepositWatcher(db, Ledger(db), api, reply["address_book"][account]["user_friendly"])
    await drain(w)
    await drain(DepositWatcher(db, Ledger(db), api, account))  # again: nothing changes

    ledger = Ledger(db)
    # The 1 TON transfer was aborted (compute skipped: no_state) and kept: credited, once.
    assert (await ledger.balances(user_id)).available == 1_000_000_000
    deposit, jetton = await rows_of(db, account)
    assert (deposit.status, deposit.amount, deposit.user_id, deposit.memo) == (
        TonDepositStatus.CREDITED,
        1_000_000_000,
        user_id,
        "1985597651",
    )
    assert deposit.note == "aborted (compute skipped: no_state), value kept"
    assert deposit.lt == 22161219000001
    assert [(n.user_id, n.amount) for n in await pending_notifications(db)] == [
        (user_id, 1_000_000_000)
    ]
    # The jetton transfer_notification is a jetton notification, never a nanoTON deposit.
    assert jetton.status == TonDepositStatus.JETTON
    assert (jetton.amount, jetton.memo) == (1, "1985597651")  # its 1 nanoTON, its payload
    # 111 jettons (9 decimals) from the same wallet that sent the TON, through its jetton wallet
    assert (jetton.jetton_amount, jetton.jetton_sender) == ("111000000000", deposit.source)
    assert jetton.source == reply["transactions"][0]["in_msg"]["source"]
    assert await unclaimed_deposits(db) == []
    assert [j.id for j in await jetton_notifications(db)] == [jetton.id]
    with pytest.raises(LookupError, match="jetton"):
        await resolve_unclaimed(db, ledger, jetton.id, user_id, by="admin")
    assert (await ledger.balances(user_id)).available == 1_000_000_000
    assert await w.cursor() == 22164816000001
    assert (await ledger.audit()).ok


async def test_a_recorded_2026_deposit_without_comment_to_a_new_account_is_unclaimed(
    db: Database, net: LocalTonCenter, api: TonCenter
) -> None:
    tx = recorded("transaction_2026_nonexist_no_comment.json")
    net.transactions_of(tx["account"]).append(tx)
    user = await get_or_create_user(db, 702)
    await drain(DepositWatcher(db, Ledger(db), api, tx["account"]))

    (row,) = await unclaimed_deposits(db)
    assert (row.amount, row.lt) == (1_000_000_000, 93307000000009)
    assert row.note == "no comment; aborted (compute skipped: no_state), value kept"
    ledger = Ledger(db)
    await resolve_unclaimed(db, ledger, row.id, user.id, by="admin")
    assert (await ledger.balances(user.id)).available == 1_000_000_000
    assert await unclaimed_deposits(db) == []


def test_an_aborted_bounceable_message_without_a_bounce_phase_is_left_to_an_admin() -> None:
    tx = copy.deepcopy(recorded("testnet_transactions_uninit_deposit.json")["transactions"][1])
    assert classify(tx, tx["account"]).status == TonDepositStatus.CREDITED
    tx["in_msg"]["bounce"] = True  # the reply shows no bounce: never guess where it went
    found = classify(tx, tx["account"])
    assert (found.status, found.amount) == (TonDepositStatus.UNCLAIMED, 1_000_000_000)
    assert "check on chain" in (found.note or "")
    tx["description"]["bounce"] = {"type": "ok", "msg_fees": "0", "fwd_fees": "266669"}
    found = classify(tx, tx["account"])
    assert (found.status, found.amount) == (TonDepositStatus.IGNORED, 1_000_000_000)
    tx["description"]["bounce"] = {"type": "nofunds", "req_fwd_fees": "266669"}
    assert classify(tx, tx["account"]).status == TonDepositStatus.CREDITED  # nothing went back


async def test_the_local_chain_keeps_or_bounces_like_the_real_one(
    db: Database, net: LocalTonCenter, api: TonCenter
) -> None:
    user = await get_or_create_user(db, 703)
    memo = user.deposit_memo
    kept = net.add_incoming(DEPOSIT, 2 * TON, comment=memo)  # nonexist -> uninit, kept
    back = net.add_incoming(DEPOSIT, 3 * TON, comment=memo, bounce=True)  # bounces
    small = net.add_incoming(DEPOSIT, BOUNCE_FEE, comment=memo, bounce=True)  # cannot bounce
    assert (kept["orig_status"], kept["end_status"]) == ("nonexist", "uninit")
    assert kept["description"]["aborted"] and back["description"]["aborted"]
    assert [o["value"] for o in back["out_msgs"]] == [str(3 * TON - BOUNCE_FEE)]
    assert back["out_msgs"][0]["bounced"] is True
    assert small["description"]["bounce"]["type"] == "nofunds" and not small["out_msgs"]
    assert net.balance_of(DEPOSIT) == 2 * TON + BOUNCE_FEE
    net.deploy(DEPOSIT)  # deployed: transfers run the wallet's code and are not aborted
    deployed = net.add_incoming(DEPOSIT, 4 * TON, comment=memo, bounce=True)
    failing = net.add_incoming(DEPOSIT, 5 * TON, comment=memo, aborted=True)  # code failed
    assert not deployed["description"]["aborted"] and failing["description"]["aborted"]

    await drain(watcher(db, api))
    credited = (2 + 4 + 5) * TON + BOUNCE_FEE
    assert (await Ledger(db).balances(user.id)).available == credited
    statuses = [(r.status, r.amount) for r in await rows_of(db, raw(DEPOSIT))]
    assert statuses == [
        (TonDepositStatus.CREDITED, 2 * TON),
        (TonDepositStatus.IGNORED, 3 * TON),
        (TonDepositStatus.CREDITED, BOUNCE_FEE),
        (TonDepositStatus.CREDITED, 4 * TON),
        (TonDepositStatus.CREDITED, 5 * TON),
    ]


def raw(address: str) -> str:
    workchain, part = Address(address).to_str(is_user_friendly=False).split(":")
    return f"{workchain}:{part.upper()}"


async def test_jetton_notifications_are_recorded_as_such_and_never_credited_as_ton(
    db: Database, net: LocalTonCenter, api: TonCenter
) -> None:
    user = await get_or_create_user(db, 704)
    net.deploy(DEPOSIT)  # a deployed deposit wallet: the notification is not aborted
    sender = "0:" + "5E" * 32
    jetton_wallet = "0:" + "1E" * 32
    payload = comment_cell(user.deposit_memo)
    inline = (
        begin_cell()
        .store_uint(0x7362D09C, 32)
        .store_uint(7, 64)
        .store_coins(25_000_000)  # 25 USDT (6 decimals)
        .store_address(Address(sender))
        .store_bit(1)
        .store_ref(payload)
        .end_cell()
    )
    net.add_incoming(DEPOSIT, 50_000_000, body=inline, source=jetton_wallet)
    huge = (
        begin_cell()
        .store_uint(0x7362D09C, 32)
        .store_uint(8, 64)
        .store_coins(2**120 - 1)
        .store_address(None)
        .store_bit(0)  # no forward payload
        .end_cell()
    )
    net.add_incoming(DEPOSIT, 1, body=huge, source=jetton_wallet)
    broken = begin_cell().store_uint(0x7362D09C, 32).store_uint(9, 16).end_cell()
    net.add_incoming(DEPOSIT, 3 * TON, body=broken, source=jetton_wallet)

    await drain(watcher(db, api))
    rows = await jetton_notifications(db)
    assert [(r.jetton_amount, r.jetton_sender, r.memo, r.amount) for r in rows] == [
        ("25000000", raw(sender), user.deposit_memo, 50_000_000),
        (str(2**120 - 1), None, None, 1),
        (None, None, None, 3 * TON),
    ]
    assert all(r.source == raw(jetton_wallet) for r in rows)
    assert "unreadable jetton notification" in (rows[2].note or "")
    assert (await Ledger(db).balances(user.id)).available == 0  # the memo credits no TON
    assert await unclaimed_deposits(db) == []
    assert await pending_notifications(db) == []


async def test_a_jetton_notification_naming_an_external_address_stops_no_deposit(
    db: Database, net: LocalTonCenter, api: TonCenter
) -> None:
    """Anyone can send the deposit wallet a transfer_notification body; one whose sender is an
    ``addr_extern`` (no wallet has one) is recorded as unreadable, and the deposit after it is
    credited: the watcher does not stop on it."""
    user = await get_or_create_user(db, 705)
    net.deploy(DEPOSIT)
    extern = (
        begin_cell()
        .store_uint(0x7362D09C, 32)
        .store_uint(10, 64)
        .store_coins(1_000)
        .store_uint(0b01, 2)  # addr_extern$01 len:(## 9) external_address:(bits len)
        .store_uint(8, 9)
        .store_uint(0xAB, 8)
        .store_bit(0)
        .end_cell()
    )
    net.add_incoming(DEPOSIT, 2 * TON, body=extern, source="0:" + "1E" * 32)
    net.add_incoming(DEPOSIT, TON, comment=user.deposit_memo)

    await drain(watcher(db, api))
    [row] = await jetton_notifications(db)
    assert (row.jetton_amount, row.jetton_sender, row.amount) == (None, None, 2 * TON)
    assert "external address" in (row.note or "")
    assert (await Ledger(db).balances(user.id)).available == TON


# ------------------------------------------------------- late-indexed transactions


async def test_a_lower_lt_indexed_after_a_higher_one_is_still_credited_once(db: Database) -> None:
    clock = Clock()
    net = LocalTonCenter(clock=clock)
    user = await get_or_create_user(db, 705)
    memo = user.deposit_memo
    early = net.add_incoming(DEPOSIT, 2 * TON, comment=memo, indexed=False)  # not visible yet
    clock.now += 3
    later = net.add_incoming(DEPOSIT, 3 * TON, comment=memo)
    ledger = Ledger(db)
    async with LocalTonCenterServer(net) as url, TonCenter(url) as api:
        await drain(watcher(db, api))
        assert (await ledger.balances(user.id)).available == 3 * TON
        assert await watcher(db, api).cursor() == int(later["lt"])

        net.index(early)  # the indexer's other batch lands: a lower lt, now visible
        await drain(watcher(db, api, overlap_max=0))  # a watcher that never looks back...
        assert (await ledger.balances(user.id)).available == 3 * TON  # ...loses it

        await drain(watcher(db, api))
        assert (await ledger.balances(user.id)).available == 5 * TON
        for _ in range(3):  # every later poll re-reads the window: still credited once
            await watcher(db, api).poll_once()
        clock.now += 10
        net.add_incoming(DEPOSIT, 1 * TON, comment=memo)
        await drain(watcher(db, api))
    assert (await ledger.balances(user.id)).available == 6 * TON
    assert len(await pending_notifications(db)) == 3
    assert [r.lt for r in await rows_of(db, raw(DEPOSIT))] == sorted(
        int(tx["lt"]) for tx in net.transactions_of(DEPOSIT)
    )
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


@pytest.mark.slow
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

        w = watcher(db, api, checkpoint=checkpoint, page_size=100)  # ten pages
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
    message = deposit_transaction(
        DEPOSIT, "CCABCDEF0123", parse_amount("1.5", comma=False), now=1_000
    )
    assert message["validUntil"] == 1_300
    (item,) = message["messages"]  # type: ignore[misc]
    assert item["amount"] == "1500000000"
    assert decode_comment(item["payload"]).memo == "CCABCDEF0123"
    assert item["address"].startswith("UQ")  # non-bounceable: a deposit never bounces back
    long = "é" * 200  # longer than one cell: a snake string over refs
    assert decode_comment(_b64(comment_cell(long))).memo == long
    assert parse_amount("0.000000001", comma=False) == 1
    assert parse_amount("1,5", comma=True) == 1_500_000_000


def _b64(cell: object) -> str:
    import base64

    return base64.b64encode(cell.to_boc()).decode()  # type: ignore[attr-defined]
