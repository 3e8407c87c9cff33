"""USDT deposits through the chain watcher, on SQLite and PostgreSQL, against the local TON
Center on loopback (its jetton masters answer ``get_wallet_address``, its jetton wallets
``get_wallet_data``, and a transfer sends the receiver a ``transfer_notification`` as the
contracts do): only the deposit wallet's own USDT jetton wallet credits, once per chain
transaction, at the operator's rate; forged notifications and other jettons are refused and
listed for the operator with their jetton and amount."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import pytest
from alembic import command
from sqlalchemy import select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from ton_core import Address, Cell

from backend.accounts.activity import history
from backend.db import Database
from backend.ledger import Ledger
from backend.migrate import alembic_config
from backend.models import AccountKind, TonDeposit, TonDepositStatus
from backend.notifications import pending_notifications
from backend.ton.comment import decode_comment, raw_address
from backend.ton.jettons import (
    JETTON_TRANSFER,
    TOPUP_FORWARD_NANO,
    jetton_topup_transaction,
    usdt_credit,
)
from backend.ton.localnet import LocalTonCenter, LocalTonCenterServer, jetton_notification
from backend.ton.toncenter import TonCenter, TonCenterError
from backend.ton.unclaimed import jetton_notifications, resolve_unclaimed, unclaimed_deposits
from backend.ton.watcher import DepositEvent, DepositWatcher
from backend.users import get_or_create_user

DEPOSIT = "0:" + "D1" * 32
USDT = "0:" + "7E" * 32  # the configured USDT master
GRAM = "0:" + "6A" * 32  # a jetton named GRAM: not the native coin
ALICE_WALLET = "0:" + "A1" * 32
RATE = 400  # nanoTON per USDT micro-unit: 1 USDT = 0.4 of the coin


class Crash(Exception):
    """Stands for the process dying at a checkpoint."""


class CountingTonCenter(TonCenter):
    """The real client, counting the USDT wallet look-ups it makes."""

    lookups = 0

    async def jetton_wallet_address(self, master: str, owner: str) -> str | None:
        self.lookups += 1
        return await super().jetton_wallet_address(master, owner)


@pytest.fixture
def net() -> LocalTonCenter:
    net = LocalTonCenter()
    net.deploy(DEPOSIT)
    net.add_jetton(USDT)
    net.add_jetton(GRAM)
    net.mint_jetton(USDT, ALICE_WALLET, 1_000 * 10**6)
    net.mint_jetton(GRAM, ALICE_WALLET, 1_000 * 10**9)
    return net


@pytest.fixture
async def api(net: LocalTonCenter) -> AsyncIterator[CountingTonCenter]:
    async with LocalTonCenterServer(net) as url, CountingTonCenter(url) as client:
        yield client


def watcher(db: Database, api: TonCenter, **kwargs: object) -> DepositWatcher:
    return DepositWatcher(
        db,
        Ledger(db),
        api,
        DEPOSIT,
        usdt_master=USDT,
        usdt_nano_per_micro=RATE,
        **kwargs,  # type: ignore[arg-type]
    )


async def drain(w: DepositWatcher) -> None:
    while await w.poll_once():
        pass


async def rows(db: Database) -> list[TonDeposit]:
    async with db.session() as session:
        return list(await session.scalars(select(TonDeposit).order_by(TonDeposit.lt)))


async def test_usdt_from_the_deposit_wallets_own_jetton_wallet_credits_the_memo_once(
    db: Database, net: LocalTonCenter, api: CountingTonCenter
) -> None:
    user = await get_or_create_user(db, 801)
    net.transfer_jetton(USDT, ALICE_WALLET, DEPOSIT, 25_500_001, comment=user.deposit_memo)
    told: list[DepositEvent] = []

    async def notify(event: DepositEvent) -> None:
        told.append(event)

    w = watcher(db, api, notify=notify)
    await drain(w)
    await drain(w)
    await drain(watcher(db, api, notify=notify))  # a second watcher over the same chain

    credited = 25_500_001 * RATE  # exact: no rounding, no remainder
    ledger = Ledger(db)
    assert (await ledger.balances(user.id)).available == credited == 10_200_000_400
    assert await ledger.balance(AccountKind.USDT_IN) == -credited
    assert await ledger.balance(AccountKind.TON_IN) == 0  # the notification's 1 nanoTON: not TON
    assert [(e.user_id, e.amount) for e in told] == [(user.id, credited)]
    assert [n.amount for n in await pending_notifications(db)] == [credited]
    (row,) = await rows(db)
    assert (row.status, row.jetton_amount, row.jetton_master) == ("credited", "25500001", USDT)
    assert (row.nano_per_unit, row.credited, row.amount) == (RATE, credited, 1)
    assert row.jetton_sender == raw_address(ALICE_WALLET)
    net.transfer_jetton(USDT, ALICE_WALLET, DEPOSIT, 1, comment=user.deposit_memo)
    await drain(w)
    assert api.lookups == 1  # asked once, remembered; a recorded transaction is not re-read
    assert (await ledger.balances(user.id)).available == credited + RATE
    credited += RATE
    page = await history(db, user.id)
    assert [(i.amount, i.details["source"], i.details["usdt_micro"]) for i in page.items] == [
        (RATE, "usdt", 1),
        (credited - RATE, "usdt", 25_500_001),
    ]
    assert page.items[0].details["nano_per_micro"] == RATE
    assert (await ledger.audit()).ok


async def test_forged_notifications_and_other_jettons_are_refused_and_listed(
    db: Database, net: LocalTonCenter, api: TonCenter
) -> None:
    user = await get_or_create_user(db, 802)
    memo = user.deposit_memo
    forged = jetton_notification(5_000 * 10**6, ALICE_WALLET, memo)
    fake_wallet = "0:" + "FA" * 32
    net.add_incoming(DEPOSIT, 10_000_000, body=forged, source=fake_wallet)  # no code at all
    # GRAM's real jetton wallet of the deposit wallet: a real jetton, not USDT, not the coin
    net.transfer_jetton(GRAM, ALICE_WALLET, DEPOSIT, 7 * 10**9, comment=memo)
    # Alice's own USDT wallet writing to the deposit wallet as if it had received USDT
    alice_usdt = net.jetton_wallet(USDT, ALICE_WALLET)
    net.add_incoming(DEPOSIT, 1, body=forged, source=alice_usdt)
    # The real USDT wallet of *another* owner that looks like ours
    other = net.jetton_wallet(USDT, "0:" + "0B" * 32)
    net.add_incoming(DEPOSIT, 1, body=forged, source=other)

    await drain(watcher(db, api))

    listed = await jetton_notifications(db)
    assert [(r.jetton_amount, r.jetton_master, r.source) for r in listed] == [
        ("5000000000", None, raw_address(fake_wallet)),
        ("7000000000", GRAM, net.jetton_wallet(GRAM, DEPOSIT)),
        ("5000000000", USDT, alice_usdt),
        ("5000000000", USDT, other),
    ]
    notes = [r.note or "" for r in listed]
    assert "fake or unknown sender" in notes[0]
    assert "another master" in notes[1]
    assert "not the deposit wallet's" in notes[2] and "not the deposit wallet's" in notes[3]
    assert all(r.status == TonDepositStatus.JETTON and r.credited is None for r in listed)
    ledger = Ledger(db)
    assert (await ledger.balances(user.id)).available == 0
    assert await ledger.balance(AccountKind.USDT_IN) == 0
    assert await unclaimed_deposits(db) == []
    for row in listed:
        with pytest.raises(LookupError, match="jetton"):
            await resolve_unclaimed(db, ledger, row.id, user.id, by="admin")
    assert await pending_notifications(db) == []


async def test_usdt_without_a_users_memo_is_unclaimed_and_resolved_once_at_its_rate(
    db: Database, net: LocalTonCenter, api: TonCenter
) -> None:
    user = await get_or_create_user(db, 803)
    net.transfer_jetton(USDT, ALICE_WALLET, DEPOSIT, 3 * 10**6, comment="CCNOBODY0000")
    net.transfer_jetton(USDT, ALICE_WALLET, DEPOSIT, 2 * 10**6)  # no comment at all
    await drain(watcher(db, api))

    found = await unclaimed_deposits(db)
    assert [(r.jetton_amount, r.nano_per_unit, r.credited) for r in found] == [
        ("3000000", RATE, 3 * 10**6 * RATE),
        ("2000000", RATE, 2 * 10**6 * RATE),
    ]
    ledger = Ledger(db)
    await resolve_unclaimed(db, ledger, found[0].id, user.id, by="admin")
    await resolve_unclaimed(db, ledger, found[0].id, user.id, by="admin")  # once
    assert (await ledger.balances(user.id)).available == 3 * 10**6 * RATE
    assert await ledger.balance(AccountKind.USDT_IN) == -(3 * 10**6 * RATE)
    assert [r.id for r in await unclaimed_deposits(db)] == [found[1].id]


@pytest.mark.parametrize("crash_at", ["fetched", "credited", "recorded"])
async def test_a_crash_at_any_step_and_late_indexed_transactions_credit_exactly_once(
    db: Database, net: LocalTonCenter, api: TonCenter, crash_at: str
) -> None:
    user = await get_or_create_user(db, 804)
    net.transfer_jetton(USDT, ALICE_WALLET, DEPOSIT, 1_000_000, comment=user.deposit_memo)
    late = net.transfer_jetton(USDT, ALICE_WALLET, DEPOSIT, 2_000_000, comment=user.deposit_memo)
    assert late is not None
    net.unindexed.add(late["hash"])  # the indexer shows it only after a later one
    net.transfer_jetton(USDT, ALICE_WALLET, DEPOSIT, 4_000_000, comment=user.deposit_memo)

    def crash(name: str) -> None:
        if name == crash_at:
            raise Crash(name)

    with pytest.raises(Crash):
        await drain(watcher(db, api, checkpoint=crash))
    await drain(watcher(db, api))
    net.index(late)
    for _ in range(3):  # re-reads of the overlap window find it once, and only once
        await drain(watcher(db, api))

    assert (await Ledger(db).balances(user.id)).available == 7_000_000 * RATE
    assert [r.status for r in await rows(db)] == ["credited"] * 3
    assert len(await pending_notifications(db)) == 3
    assert (await Ledger(db).audit()).ok


async def test_the_usdt_wallet_look_up_failing_retries_the_page_and_skips_nothing(
    db: Database, net: LocalTonCenter, api: TonCenter
) -> None:
    user = await get_or_create_user(db, 805)
    net.transfer_jetton(USDT, ALICE_WALLET, DEPOSIT, 1_000_000, comment=user.deposit_memo)
    w = watcher(db, api)
    net.faults = [None, 502]  # the transactions page, then the runGetMethod
    with pytest.raises(TonCenterError):
        await w.poll_once()
    assert await rows(db) == []  # nothing recorded, the cursor did not move
    await drain(w)
    assert (await Ledger(db).balances(user.id)).available == 1_000_000 * RATE


async def test_a_rate_that_would_overflow_the_ledger_credits_nothing(
    db: Database, net: LocalTonCenter, api: TonCenter
) -> None:
    user = await get_or_create_user(db, 806)
    net.mint_jetton(USDT, ALICE_WALLET, 2**100)
    net.transfer_jetton(USDT, ALICE_WALLET, DEPOSIT, 2**100, comment=user.deposit_memo)
    await drain(watcher(db, api))
    (row,) = await jetton_notifications(db)
    assert "out of range" in (row.note or "") and row.credited is None
    assert (await Ledger(db).balances(user.id)).available == 0
    assert usdt_credit(2**100, RATE) is None and usdt_credit(0, RATE) is None


async def test_the_top_up_the_mini_app_asks_a_wallet_to_sign_credits_its_user(
    db: Database, net: LocalTonCenter, api: TonCenter
) -> None:
    """The jetton transfer built for TON Connect, executed as the jetton wallets do."""
    user = await get_or_create_user(db, 807)
    alice_usdt = await api.jetton_wallet_address(USDT, ALICE_WALLET)
    assert alice_usdt == net.jetton_wallet(USDT, ALICE_WALLET)
    request = jetton_topup_transaction(
        alice_usdt, ALICE_WALLET, DEPOSIT, user.deposit_memo, 12_340_000, now=1_000
    )
    assert request["validUntil"] == 1_300
    (message,) = request["messages"]  # type: ignore[attr-defined]
    assert raw_address(message["address"]) == alice_usdt
    body = Cell.one_from_boc(base64.b64decode(message["payload"])).begin_parse()
    assert body.load_uint(32) == JETTON_TRANSFER
    body.load_uint(64)
    units = body.load_coins()
    destination, response = body.load_address(), body.load_address()
    assert body.load_bit() == 0  # no custom payload
    assert body.load_coins() == TOPUP_FORWARD_NANO
    assert body.load_bit() == 1
    memo = decode_comment(base64.b64encode(body.load_ref().to_boc()).decode()).memo
    assert isinstance(destination, Address) and isinstance(response, Address)
    assert (units, raw_address(destination), raw_address(response), memo) == (
        12_340_000,
        DEPOSIT,
        raw_address(ALICE_WALLET),
        user.deposit_memo,
    )
    net.transfer_jetton(USDT, raw_address(response), raw_address(destination), units, comment=memo)
    await drain(watcher(db, api))
    assert (await Ledger(db).balances(user.id)).available == 12_340_000 * RATE


def _migrate(connection: Connection, step: str, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    getattr(command, step)(config, revision)


async def test_the_migration_lets_only_world_accounts_go_negative_and_comes_back(
    db_url: str,
) -> None:
    db = Database(db_url)
    insert = text("INSERT INTO accounts (kind, owner_id, balance) VALUES (:kind, 7, -5)")
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(_migrate, "upgrade", "0010")
            with pytest.raises(IntegrityError):
                async with conn.begin_nested():
                    await conn.execute(insert, {"kind": "usdt_in"})
            await conn.run_sync(_migrate, "upgrade", "head")
            await conn.run_sync(_migrate, "downgrade", "0010")  # nothing credited yet: it may
            await conn.run_sync(_migrate, "upgrade", "head")
            await conn.execute(insert, {"kind": "usdt_in"})
            with pytest.raises(IntegrityError):
                async with conn.begin_nested():
                    await conn.execute(insert, {"kind": "user"})
            with pytest.raises(RuntimeError, match="USDT has been credited"):
                async with conn.begin_nested():
                    await conn.run_sync(_migrate, "downgrade", "0010")
    finally:
        await db.close()
