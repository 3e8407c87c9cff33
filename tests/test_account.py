"""What users and providers see of their accounts: usage, history, Stars, withdrawals, worker
records and their notifications, /forget — on SQLite and on PostgreSQL."""

from __future__ import annotations

import base64

import nacl.signing
import pytest
import redis.asyncio as aioredis

from backend import accounts, notifications
from backend.accounts import AccountError
from backend.db import Database
from backend.ledger import Ledger, TurnUsage
from backend.models import AccountKind, WorkerState
from backend.notifications import pending_notifications
from backend.receipts import BilledUsage, ReceiptRecord, load_receipt, store_receipt
from backend.settings import Settings
from backend.users import get_or_create_user
from tests.support.turns import add_wallet
from workers.receipts import Receipt, sign_receipt

TON = 1_000_000_000


@pytest.fixture
def ledger(db: Database) -> Ledger:
    return Ledger(db, min_withdrawal=TON)


async def _turn(ledger: Ledger, user: int, provider: int | None, key: str, cost: int) -> None:
    await ledger.hold(user, cost + 1000, key)
    await ledger.settle(
        key,
        cost,
        provider_id=provider,
        share_bps=8000,
        usage=TurnUsage("smollm2-135m", 30, 0, 12, "stop", worker_id="w-1", tee="dev"),
    )


async def test_usage_lists_settled_turns_with_totals(db: Database, ledger: Ledger) -> None:
    user = (await get_or_create_user(db, 501)).id
    await ledger.credit_deposit(user, 5 * TON, "ton:u1")
    for n in range(3):
        await _turn(ledger, user, None, f"turn-{n}", 1000 + n)
    await ledger.hold(user, 500, "released-turn")
    await ledger.release("released-turn")

    summary = await accounts.usage(db, user, limit=2)
    assert summary.turns == 3
    assert summary.cost == 1000 + 1001 + 1002
    assert summary.prompt_tokens == 90 and summary.completion_tokens == 36
    assert [row.turn_id for row in summary.recent] == ["turn-2", "turn-1"]
    assert summary.recent[0].tee == "dev"


async def test_history_pages_deposits_turns_and_payouts(
    db: Database, ledger: Ledger, settings: Settings
) -> None:
    user = (await get_or_create_user(db, 502)).id
    await ledger.credit_deposit(user, 3 * TON, "ton:h1")
    await accounts.credit_stars(ledger, settings, user, 50, "charge-h1")
    for n in range(4):
        await _turn(ledger, user, None, f"h-turn-{n}", 2000)

    first = await accounts.history(db, user, per_page=4)
    second = await accounts.history(db, user, page=2, per_page=4)
    assert first.has_more and not second.has_more
    kinds = [item.kind for item in first.items + second.items]
    assert kinds.count("turn") == 4 and kinds.count("deposit") == 2
    deposits = await accounts.history(db, user, kind="deposit")
    assert {item.details["source"] for item in deposits.items} == {"ton", "stars"}
    assert sorted(item.amount for item in deposits.items) == sorted(
        [3 * TON, 50 * settings.stars_nano_per_star]
    )
    with pytest.raises(AccountError, match="page"):
        await accounts.history(db, user, page=0)


async def test_stars_payment_is_credited_once(
    db: Database, ledger: Ledger, settings: Settings
) -> None:
    user = (await get_or_create_user(db, 503)).id
    first = await accounts.credit_stars(ledger, settings, user, 100, "tg-charge-1")
    again = await accounts.credit_stars(ledger, settings, user, 100, "tg-charge-1")
    assert again.replayed and not first.replayed
    assert (await ledger.balances(user)).available == 100 * settings.stars_nano_per_star
    assert await ledger.balance(AccountKind.STARS_IN) == -100 * settings.stars_nano_per_star
    told = [n for n in await pending_notifications(db) if n.user_id == user]
    assert [n.kind for n in told] == [notifications.NOTIFY_STARS]
    with pytest.raises(AccountError):
        await accounts.credit_stars(ledger, settings, user, 0, "tg-charge-2")


async def test_withdraw_needs_a_wallet_the_minimum_and_the_funds(
    db: Database, ledger: Ledger, settings: Settings
) -> None:
    user = (await get_or_create_user(db, 504)).id
    provider = (await get_or_create_user(db, 505)).id
    await ledger.credit_deposit(user, 10 * TON, "ton:w1")
    await _turn(ledger, user, provider, "w-turn", 5 * TON // 2)  # provider earns 2 TON

    with pytest.raises(AccountError) as refused:
        await accounts.withdraw(ledger, settings, provider, "all", "wd-0")
    assert refused.value.code == "no_payout_wallet"
    await add_wallet(db, provider, "payout", "0:" + "ab" * 32, "cd" * 32)
    with pytest.raises(AccountError) as small:
        await accounts.withdraw(ledger, settings, provider, TON // 2, "wd-1")
    assert small.value.code == "below_minimum"
    with pytest.raises(AccountError) as much:
        await accounts.withdraw(ledger, settings, provider, 3 * TON, "wd-2")
    assert much.value.code == "insufficient_funds"

    payout = await accounts.withdraw(ledger, settings, provider, "all", "wd-3")
    again = await accounts.withdraw(ledger, settings, provider, 2 * TON, "wd-3")
    assert payout.id == again.id and payout.amount == 2 * TON
    assert payout.destination == "0:" + "ab" * 32
    earned = await accounts.earnings(ledger, provider)
    assert (earned.available, earned.pending, earned.earned, earned.jobs) == (
        0,
        2 * TON,
        2 * TON,
        1,
    )
    assert (await ledger.audit()).ok


async def test_worker_records_tell_the_provider_of_changes(
    db: Database, ledger: Ledger, redis_url: str
) -> None:
    provider = (await get_or_create_user(db, 506)).id
    user = (await get_or_create_user(db, 507)).id
    assert await accounts.record_worker(
        db, "w-1", WorkerState.ATTESTED, provider_id=provider, model="smollm2-135m", tee="dev"
    )
    assert not await accounts.record_worker(db, "w-1", WorkerState.ATTESTED)
    assert await accounts.record_worker(db, "w-1", WorkerState.OFFLINE)
    await ledger.credit_deposit(user, TON, "ton:r1")
    await _turn(ledger, user, provider, "r-turn", 10_000)

    told = [n.kind for n in await pending_notifications(db) if n.user_id == provider]
    assert told == [notifications.NOTIFY_WORKER_ATTESTED, notifications.NOTIFY_WORKER_OFFLINE]
    redis = aioredis.from_url(redis_url)
    try:
        (view,) = await accounts.provider_workers(db, redis, provider)
    finally:
        await redis.aclose()
    assert (view.worker_id, view.state, view.online, view.jobs, view.earned) == (
        "w-1",
        "offline",
        False,
        1,
        8000,
    )


def _receipt(turn_id: str) -> ReceiptRecord:
    """A turn's receipt as the settlement keeps it (signed by a worker's key)."""
    key = nacl.signing.SigningKey.generate()
    receipt = Receipt(
        job_id=f"w-0123456789abcdef_{turn_id}-1",
        model="m",
        request_sha256="a" * 64,
        reply_sha256="b" * 64,
        prompt_tokens=1,
        cached_prompt_tokens=0,
        completion_tokens=2,
        finish_reason="stop",
    )
    return ReceiptRecord(
        id=turn_id,
        signed=sign_receipt(receipt, key),
        worker_id="w-0123456789abcdef",
        tee="dev",
        verify_key=base64.b64encode(bytes(key.verify_key)).decode(),
        box_public_key="",
        billed=BilledUsage(prompt_tokens=1, cached_prompt_tokens=0, completion_tokens=2),
        cost_nanoton="1234",
    )


async def test_forget_deletes_personal_data_and_keeps_the_money(
    db: Database, ledger: Ledger
) -> None:
    from backend import apikeys

    user = (await get_or_create_user(db, 508, "fr")).id
    await accounts.set_referrer(db, user, "friend42")
    await ledger.credit_deposit(user, TON, "ton:f1")
    await _turn(ledger, user, None, "f-turn", 1234)
    await apikeys.create_key(db, user, "laptop")
    await store_receipt(db, user, _receipt("f-turn"))
    assert await load_receipt(db, user, "f-turn") is not None

    await accounts.forget_user(db, user)
    assert await load_receipt(db, user, "f-turn") is None

    assert (await accounts.usage(db, user)).turns == 0
    assert await apikeys.list_keys(db, user) == []
    assert (await ledger.balances(user)).available == TON - 1234
    assert (await ledger.audit()).ok


async def test_stats_count_users_turns_and_revenue(
    db: Database, ledger: Ledger, redis_url: str
) -> None:
    user = (await get_or_create_user(db, 509)).id
    provider = (await get_or_create_user(db, 510)).id
    await accounts.become_provider(db, provider)
    await ledger.credit_deposit(user, TON, "ton:s1")
    await _turn(ledger, user, provider, "s-turn", 10_000)
    redis = aioredis.from_url(redis_url)
    try:
        figures = await accounts.stats(db, redis)
    finally:
        await redis.aclose()
    assert (figures.users, figures.providers, figures.turns, figures.turns_24h) == (2, 1, 1, 1)
    assert (figures.volume, figures.revenue) == (10_000, 2_000)


def test_stars_payloads_round_trip_and_foreign_ones_are_refused(settings: Settings) -> None:
    invoice = accounts.stars_invoice(42, 100, settings)
    assert accounts.parse_stars_payload(invoice.payload) == invoice
    assert accounts.parse_stars_payload("stars:42:100") == accounts.StarsInvoice(42, 100, None)
    for foreign in (
        "",
        "stars:42",
        "stars:x:1:1",
        "stars:42:0:5",
        "stars:42:1:0",
        "tip:42:1",
        "stars:42:²:5",
        "stars:42:100001:5",
        "stars:-1:5:5",
        "stars:42:5:5:5",
    ):
        assert accounts.parse_stars_payload(foreign) is None, foreign
