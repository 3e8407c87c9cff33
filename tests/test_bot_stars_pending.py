"""A Stars payment is credited once even when crediting it fails when it arrives (the database
refuses) and Telegram never sends it again: the error handler keeps it in Redis, the retry (or
``cocoon stars credit``) credits it once, and a replay of the update changes nothing. The real
bot, Redis, SQLite and PostgreSQL; the failure injected at the ledger's boundary."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from backend import accounts
from backend.accounts import stars_pending
from backend.ledger import Ledger
from backend.models import User
from backend.settings import Settings
from tests.support.bot import ALICE, Harness, bot_settings, running_harness
from tests.support.bot_fakes import feed, payment_update


@pytest.fixture
async def harness(settings: Settings, redis_url: str, db_url: str) -> AsyncIterator[Harness]:
    async with running_harness(bot_settings(settings, database_url=db_url)) as found:
        yield found


def refuse_once(monkeypatch: pytest.MonkeyPatch, ledger: Ledger) -> None:
    """The ledger's next credit fails as a database that is down does."""
    real = ledger.credit_deposit
    failures = [OperationalError("INSERT", {}, ConnectionRefusedError("database is down"))]

    async def credit_deposit(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real(*args, **kwargs)

    monkeypatch.setattr(ledger, "credit_deposit", credit_deposit)


async def started(bot: Harness) -> tuple[User, int]:
    """Alice after /start: her user, and her balance."""
    await bot.send("/start")
    user = await bot.user()
    return user, (await bot.ledger.balances(user.id)).available


async def pay(bot: Harness, charge_id: str, stars: int = 100) -> int:
    """Alice pays an invoice of ``stars``; her balance after it."""
    user = await bot.user()
    payload = accounts.stars_invoice(user.id, stars, bot.settings).payload
    await feed(bot.app.dp, bot.app.bot, payment_update(ALICE, payload, stars, charge_id))
    return (await bot.ledger.balances(user.id)).available


async def test_a_payment_whose_credit_fails_is_kept_and_credited_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    bot, redis = harness, harness.app.services.redis
    _, before = await started(bot)
    refuse_once(monkeypatch, bot.ledger)
    assert await pay(bot, "charge-down") == before  # not credited: the database refused
    told = bot.tg.texts()[-1]
    assert "credited automatically" in told and "charge-down" in told
    [kept] = await stars_pending.pending(redis)
    assert (kept.charge_id, kept.telegram_id, kept.stars) == ("charge-down", ALICE, 100)

    assert await stars_pending.retry_once(bot.db, bot.ledger, bot.settings, redis) == (1, 0)
    credit = 100 * bot.settings.stars_nano_per_star
    user = await bot.user()
    assert (await bot.ledger.balances(user.id)).available == before + credit
    assert await stars_pending.pending(redis) == []
    assert await bot.app.outbox.drain_once() == 1  # told through the outbox, once
    assert "100 Stars credited" in bot.tg.texts()[-1]

    # Telegram's update again (a replayed webhook), and the retry again: nothing more.
    assert await pay(bot, "charge-down") == before + credit
    assert await stars_pending.retry_once(bot.db, bot.ledger, bot.settings, redis) == (0, 0)
    assert await bot.app.outbox.drain_once() == 0


async def test_the_retry_loop_waits_out_the_database_then_credits(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    bot, redis = harness, harness.app.services.redis
    user, before = await started(bot)
    refuse_once(monkeypatch, bot.ledger)
    await pay(bot, "charge-loop")
    refuse_once(monkeypatch, bot.ledger)  # still down at the loop's first try
    credited = asyncio.Event()
    real = stars_pending.credit_pending

    async def credit_pending(*args: Any) -> Any:
        receipt = await real(*args)
        credited.set()
        return receipt

    monkeypatch.setattr(stars_pending, "credit_pending", credit_pending)
    stop = asyncio.Event()
    loop = asyncio.create_task(
        stars_pending.retry_loop(stop, bot.db, bot.ledger, bot.settings, redis, interval_s=0.01)
    )
    try:  # the bound is for a broken loop, not a speed check
        await asyncio.wait_for(credited.wait(), 120)
    finally:
        stop.set()
        await loop
    credit = 100 * bot.settings.stars_nano_per_star
    assert (await bot.ledger.balances(user.id)).available == before + credit
    assert await stars_pending.pending(redis) == []


async def test_cocoon_stars_credits_a_pending_payment_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from backend.cli import main

    bot, redis = harness, harness.app.services.redis
    user, before = await started(bot)
    refuse_once(monkeypatch, bot.ledger)
    await pay(bot, "charge-cli", stars=50)
    for name, value in {
        "COCOON_DATA_DIR": str(bot.settings.data_dir),
        "COCOON_SECRETS_DIR": str(bot.settings.secrets_dir),
        "COCOON_REDIS_URL": bot.settings.redis_url,
        "COCOON_DATABASE_URL": bot.settings.db_url,
    }.items():
        monkeypatch.setenv(name, value)
    assert await asyncio.to_thread(main, ["stars", "pending"]) == 0
    assert "charge-cli  Telegram user 501  50 Stars" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["stars", "credit", "charge-cli"]) == 0
    assert "credited 50 Stars to Telegram user 501;" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # credited: not pending any more
        await asyncio.to_thread(main, ["stars", "credit", "charge-cli"])
    credit = 50 * bot.settings.stars_nano_per_star
    assert (await bot.ledger.balances(user.id)).available == before + credit
    assert await stars_pending.pending(redis) == []


async def test_with_redis_down_too_the_log_keeps_what_the_operator_credits(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bot = harness
    user, before = await started(bot)

    async def redis_down(*_args: Any) -> None:
        raise ConnectionError("Redis is down")

    monkeypatch.setattr(stars_pending, "keep", redis_down)
    refuse_once(monkeypatch, bot.ledger)
    with caplog.at_level(logging.ERROR, "cocoon.bot"):
        await pay(bot, "charge-lost")
    [line] = [r.getMessage() for r in caplog.records if "NOT credited" in r.getMessage()]
    record = line.split("--record '", 1)[1].rstrip("'")
    assert json.loads(record)["charge_id"] == "charge-lost"
    given = stars_pending.PendingStars.from_json(record)
    assert given is not None
    receipt = await stars_pending.credit_pending(
        bot.db, bot.ledger, bot.settings, bot.app.services.redis, given
    )
    again = await stars_pending.credit_pending(
        bot.db, bot.ledger, bot.settings, bot.app.services.redis, given
    )
    assert not receipt.replayed and again.replayed
    credit = 100 * bot.settings.stars_nano_per_star
    assert (await bot.ledger.balances(user.id)).available == before + credit
