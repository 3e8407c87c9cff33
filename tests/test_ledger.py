"""The ledger's promises, on SQLite and on PostgreSQL: money is never lost, duplicated or
rounded away, a balance never goes below zero, and a key applies once."""

from __future__ import annotations

import asyncio
import datetime as dt
import random

import pytest
from sqlalchemy import update

from backend.db import Database
from backend.ledger import (
    Balances,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    InvalidState,
    Ledger,
    NotFound,
)
from backend.models import AccountKind, Hold, HoldState
from backend.settings import MAX_NANO
from backend.users import get_or_create_user

TON = 1_000_000_000


@pytest.fixture
def ledger(db: Database) -> Ledger:
    return Ledger(db, min_withdrawal=TON)


async def new_user(db: Database, telegram_id: int) -> int:
    return (await get_or_create_user(db, telegram_id, "en")).id


async def assert_healthy(ledger: Ledger) -> None:
    audit = await ledger.audit()
    assert audit.ok, audit


async def test_deposit_is_credited_once_per_key(db: Database, ledger: Ledger) -> None:
    user = await new_user(db, 1001)
    first = await ledger.credit_deposit(user, 5 * TON, "ton:tx-1")
    again = await ledger.credit_deposit(user, 5 * TON, "ton:tx-1")

    assert (await ledger.balances(user)).available == 5 * TON
    assert again.replayed and not first.replayed
    assert again.transaction_id == first.transaction_id
    assert again.legs == first.legs
    assert await ledger.balance(AccountKind.TON_IN) == -5 * TON
    await assert_healthy(ledger)


async def test_a_key_reused_for_another_request_is_refused(db: Database, ledger: Ledger) -> None:
    user = await new_user(db, 1002)
    await ledger.credit_deposit(user, 5 * TON, "ton:tx-2")
    with pytest.raises(IdempotencyConflict, match="already used"):
        await ledger.credit_deposit(user, 6 * TON, "ton:tx-2")
    assert (await ledger.balances(user)).available == 5 * TON


async def test_settle_pays_provider_share_platform_rest_and_returns_the_remainder(
    db: Database, ledger: Ledger
) -> None:
    user = await new_user(db, 1003)
    provider = await new_user(db, 2003)
    await ledger.credit_deposit(user, 1000, "dep")
    hold = await ledger.hold(user, 600, "job-1")
    assert await ledger.balances(user) == Balances(available=400, held=600)

    receipt = await ledger.settle("job-1", 251, provider_id=provider, share_bps=8000)

    balances = await ledger.balances(user)
    assert balances.available == 1000 - 251 and balances.held == 0
    # 80 % of 251 is 200.8: the provider gets 200, the platform the 51 left; nothing is lost.
    assert (await ledger.balances(provider)).earned == 200
    assert await ledger.balance(AccountKind.PLATFORM) == 51
    assert receipt.subject_id == hold.subject_id
    held = await ledger.get_hold("job-1")
    assert held is not None and held.state == HoldState.SETTLED and held.charged == 251
    await assert_healthy(ledger)


async def test_a_hold_closes_exactly_once(db: Database, ledger: Ledger) -> None:
    user = await new_user(db, 1004)
    await ledger.credit_deposit(user, 1000, "dep")
    await ledger.hold(user, 500, "job-2")
    first = await ledger.settle("job-2", 100, provider_id=None, share_bps=8000)

    replay = await ledger.settle("job-2", 100, provider_id=None, share_bps=8000)
    assert replay.replayed and replay.transaction_id == first.transaction_id
    with pytest.raises(InvalidState, match="already settled"):
        await ledger.settle("job-2", 100, provider_id=None, share_bps=8000, key="other")
    with pytest.raises(InvalidState, match="already settled"):
        await ledger.release("job-2")
    assert (await ledger.balances(user)).available == 900
    # Without a provider the whole cost is the platform's.
    assert await ledger.balance(AccountKind.PLATFORM) == 100
    await assert_healthy(ledger)


async def test_cost_above_the_hold_is_capped_at_the_hold(db: Database, ledger: Ledger) -> None:
    user = await new_user(db, 1005)
    await ledger.credit_deposit(user, 1000, "dep")
    await ledger.hold(user, 300, "job-3")
    await ledger.settle("job-3", 10_000, provider_id=None, share_bps=0)
    assert (await ledger.balances(user)).available == 700
    await assert_healthy(ledger)


async def test_release_returns_the_whole_hold(db: Database, ledger: Ledger) -> None:
    user = await new_user(db, 1006)
    await ledger.credit_deposit(user, 1000, "dep")
    await ledger.hold(user, 999, "job-4")
    await ledger.release("job-4")
    assert await ledger.balances(user) == Balances(available=1000)
    with pytest.raises(NotFound):
        await ledger.release("no-such-job")
    await assert_healthy(ledger)


async def test_a_hold_beyond_the_balance_is_refused_and_leaves_nothing(
    db: Database, ledger: Ledger
) -> None:
    user = await new_user(db, 1007)
    await ledger.credit_deposit(user, 1000, "dep")
    with pytest.raises(InsufficientFunds):
        await ledger.hold(user, 1001, "job-5")
    assert (await ledger.balances(user)).available == 1000
    assert await ledger.get_hold("job-5") is None
    # The refused key is not burnt: the same job can hold once funds arrive.
    await ledger.credit_deposit(user, 1, "dep-2")
    assert not (await ledger.hold(user, 1001, "job-5")).replayed
    await assert_healthy(ledger)


async def test_fifty_concurrent_holds_never_overdraw(db: Database, ledger: Ledger) -> None:
    user = await new_user(db, 1008)
    await ledger.credit_deposit(user, 10 * 7, "dep")

    results = await asyncio.gather(
        *(ledger.hold(user, 7, f"race-{n}") for n in range(50)), return_exceptions=True
    )

    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 10
    assert all(isinstance(error, InsufficientFunds) for error in lost), lost
    assert await ledger.balances(user) == Balances(available=0, held=70)
    await assert_healthy(ledger)


async def test_the_same_key_racing_applies_once(db: Database, ledger: Ledger) -> None:
    user = await new_user(db, 1009)
    receipts = await asyncio.gather(
        *(ledger.credit_deposit(user, 3 * TON, "ton:same-tx") for _ in range(20))
    )
    assert len({r.transaction_id for r in receipts}) == 1
    assert sum(not r.replayed for r in receipts) == 1
    assert (await ledger.balances(user)).available == 3 * TON
    await assert_healthy(ledger)


@pytest.mark.parametrize("amount", [0, -1, 1.5, True, "10", None, MAX_NANO + 1])
async def test_bad_amounts_are_refused_with_a_clear_error(
    db: Database, ledger: Ledger, amount: object
) -> None:
    user = await new_user(db, 1010)
    with pytest.raises(InvalidAmount) as raised:
        await ledger.credit_deposit(user, amount, f"bad-{amount!r}")  # type: ignore[arg-type]
    assert "nanoTON" in str(raised.value) or "positive" in str(raised.value)
    with pytest.raises(InvalidAmount):
        await ledger.hold(user, amount, "bad-hold")  # type: ignore[arg-type]
    assert (await ledger.balances(user)).available == 0


async def test_a_balance_cannot_overflow_64_bits(db: Database, ledger: Ledger) -> None:
    user = await new_user(db, 1011)
    await ledger.credit_deposit(user, MAX_NANO, "huge")
    with pytest.raises(InvalidAmount, match="overflow"):
        await ledger.credit_deposit(user, 1, "one-more")
    assert (await ledger.balances(user)).available == MAX_NANO
    await assert_healthy(ledger)


async def test_withdrawal_then_confirm_or_fail(db: Database, ledger: Ledger) -> None:
    user = await new_user(db, 1012)
    provider = await new_user(db, 2012)
    await ledger.credit_deposit(user, 10 * TON, "dep")
    await ledger.hold(user, 10 * TON, "job")
    await ledger.settle("job", 10 * TON, provider_id=provider, share_bps=5000)
    assert (await ledger.balances(provider)).earned == 5 * TON

    with pytest.raises(InvalidAmount, match="smallest withdrawal"):
        await ledger.request_withdrawal(provider, TON - 1, "p-small")
    with pytest.raises(InsufficientFunds):
        await ledger.request_withdrawal(provider, 6 * TON, "p-big")

    first = await ledger.request_withdrawal(provider, 2 * TON, "p-1", destination="UQ-addr")
    second = await ledger.request_withdrawal(provider, 3 * TON, "p-2", destination="UQ-addr")
    assert first.subject_id is not None and second.subject_id is not None
    assert (await ledger.balances(provider)).pending_payout == 5 * TON

    await ledger.confirm_payout(first.subject_id)
    await ledger.fail_payout(second.subject_id, reason="bounced")
    with pytest.raises(InvalidState, match="already confirmed"):
        await ledger.fail_payout(first.subject_id, key="late-fail")
    assert (await ledger.confirm_payout(first.subject_id)).replayed

    balances = await ledger.balances(provider)
    assert balances.earned == 3 * TON and balances.pending_payout == 0
    assert await ledger.balance(AccountKind.TON_OUT) == 2 * TON
    await assert_healthy(ledger)


async def test_any_sequence_keeps_the_ledger_balanced(db: Database, ledger: Ledger) -> None:
    rng = random.Random(20261124)
    users = [await new_user(db, 3000 + n) for n in range(4)]
    providers = [await new_user(db, 4000 + n) for n in range(2)]
    open_holds: list[str] = []
    payouts: list[int] = []
    for step in range(120):
        action = rng.choice(["deposit", "hold", "settle", "release", "withdraw", "payout"])
        try:
            if action == "deposit":
                await ledger.credit_deposit(
                    rng.choice(users), rng.randint(1, 5 * TON), f"d{step}", reason="seq"
                )
            elif action == "hold":
                await ledger.hold(rng.choice(users), rng.randint(1, 2 * TON), f"h{step}")
                open_holds.append(f"h{step}")
            elif action == "settle" and open_holds:
                await ledger.settle(
                    open_holds.pop(rng.randrange(len(open_holds))),
                    rng.randint(0, 3 * TON),
                    provider_id=rng.choice([*providers, None]),
                    share_bps=rng.randint(0, 10_000),
                )
            elif action == "release" and open_holds:
                await ledger.release(open_holds.pop(rng.randrange(len(open_holds))))
            elif action == "withdraw":
                receipt = await ledger.request_withdrawal(
                    rng.choice(providers), rng.randint(TON, 2 * TON), f"w{step}"
                )
                assert receipt.subject_id is not None
                payouts.append(receipt.subject_id)
            elif action == "payout" and payouts:
                payout = payouts.pop(rng.randrange(len(payouts)))
                if rng.random() < 0.5:
                    await ledger.confirm_payout(payout)
                else:
                    await ledger.fail_payout(payout)
        except InsufficientFunds:
            pass
        if step % 10 == 0:
            await assert_healthy(ledger)
    await assert_healthy(ledger)


async def test_first_contact_creates_one_user_with_a_unique_memo(db: Database) -> None:
    created = await asyncio.gather(*(get_or_create_user(db, 777, "ru") for _ in range(10)))
    assert len({user.id for user in created}) == 1
    others = [await get_or_create_user(db, 778 + n) for n in range(20)]
    memos = {user.deposit_memo for user in [created[0], *others]}
    assert len(memos) == 21
    assert created[0].language_code == "ru"


async def test_stale_holds_are_released(db: Database, ledger: Ledger) -> None:
    user = await new_user(db, 1013)
    await ledger.credit_deposit(user, 1000, "dep")
    await ledger.hold(user, 400, "old-turn")
    await ledger.hold(user, 100, "new-turn")
    async with db.session() as session, session.begin():
        await session.execute(
            update(Hold)
            .where(Hold.key == "old-turn")
            .values(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
        )

    assert await ledger.release_stale_holds(dt.timedelta(hours=1)) == ["old-turn"]
    assert await ledger.balances(user) == Balances(available=900, held=100)
    assert await ledger.release_stale_holds(dt.timedelta(hours=1)) == []
    await assert_healthy(ledger)
