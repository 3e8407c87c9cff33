"""Provider economics: online time counted from the registry's heartbeats (never twice, gaps
not counted), earnings per hour online and per 1M tokens, fees, the next payout's estimate, in
/earnings; and the README's worked example is what the code computes."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from backend.accounts import become_provider
from backend.accounts.economics import (
    count_online,
    economics,
    next_payout,
    online_seconds,
    run_online_counter,
    worked_example,
)
from backend.db import Database
from backend.ledger import Ledger
from backend.money import format_gram
from backend.settings import DEFAULT_MODEL, Settings
from backend.users import get_or_create_user
from tests.support.bot import Harness, record_turn

README = Path(__file__).resolve().parent.parent / "README.md"
NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_online_time_counts_each_interval_once_and_no_gaps(redis: aioredis.Redis) -> None:
    await count_online(redis, [("w-1", 7)], now=1000.0)  # first seen: nothing yet
    await count_online(redis, [("w-1", 7)], now=1002.0)
    await count_online(redis, [("w-1", 7), ("w-2", 7)], now=1004.0)
    await count_online(redis, [("w-1", 7), ("w-2", 7)], now=1004.0)  # a twin process: 0 more
    await count_online(redis, [("w-1", 7), ("w-2", 7)], now=1006.5)
    await count_online(redis, [("w-1", 7)], now=1200.0)  # gone 193 s: not online meanwhile
    await count_online(redis, [("w-1", 7)], now=1201.0)
    assert await online_seconds(redis, 7) == 10  # w-1: 2 + 2 + 2.5 + 1, w-2: 2.5
    assert await online_seconds(redis, 8) == 0


async def test_every_web_process_counts_attested_workers_online(redis: aioredis.Redis) -> None:
    """The counter ``cocoon web`` runs (so a stack without the bot counts online time too)
    counts attested workers of a provider from the registry; not an unattested one, not a
    worker without a provider; a Redis error skips a pass, never stops the loop."""
    from workers import registry

    async def worker(worker_id: str, *, attested: bool, provider_id: int | None) -> None:
        info = registry.WorkerInfo(
            worker_id=worker_id, model=DEFAULT_MODEL, engine="instant", engine_version="1",
            box_public_key="A" * 44, verify_key="A" * 44, capacity=4,
        )  # fmt: skip
        await registry.register(redis, info, ttl_s=60)
        if attested:  # what the backend writes when it accepts a worker's evidence
            record = registry.AttestationRecord(
                worker_id=worker_id, tee="dev", box_public_key="A" * 44, verify_key="A" * 44,
                model=DEFAULT_MODEL, provider_id=provider_id, attested_at=time.time(),
                expires_at=time.time() + 3600,
            )  # fmt: skip
            await registry.write_attestation(redis, record)

    await worker("w-ok", attested=True, provider_id=7)
    await worker("w-new", attested=False, provider_id=8)
    await worker("w-dev", attested=True, provider_id=None)
    stop = asyncio.Event()
    times = iter([100.0, 103.0, 106.0, 109.0])

    def clock() -> float:
        now = next(times, None)
        if now is None:
            stop.set()
            raise OSError("no more time")  # logged, the loop goes on and sees stop
        return now

    await run_online_counter(redis, stop, interval_s=0, clock=clock)
    assert await online_seconds(redis, 7) == 9
    assert await online_seconds(redis, 8) == 0


async def test_earnings_per_hour_and_per_million_tokens_fees_and_next_payout(
    db: Database, redis: aioredis.Redis, settings: Settings
) -> None:
    ledger = Ledger(db, min_withdrawal=settings.min_withdrawal_nano)
    provider = await get_or_create_user(db, 9101)
    await become_provider(db, provider.id)
    user = await get_or_create_user(db, 9102)
    await ledger.credit_deposit(user.id, 10**9, "test:fund")
    fresh = await economics(ledger, redis, settings, provider.id, now=NOW)
    assert (fresh.per_hour, fresh.per_million_tokens, fresh.next_payout.kind) == (
        None,
        None,
        "unknown",
    )
    for _ in range(3):
        await record_turn(ledger, user.id, 1_000_001, provider.id)  # 33 tokens each
    await count_online(redis, [("w-1", provider.id)], now=0.0)
    for second in range(20, 1801, 20):  # half an hour online
        await count_online(redis, [("w-1", provider.id)], now=float(second))

    x = await economics(ledger, redis, settings, provider.id, now=NOW)
    earned = 3 * (1_000_001 * 8000 // 10_000)  # rounded down once per turn
    assert (x.earned, x.online_s, x.tokens) == (earned, 1800, 99)
    assert x.per_hour == earned * 2
    assert x.per_million_tokens == earned * 1_000_000 // 99
    assert (x.fee_bps, x.fees) == (2000, 3 * 1_000_001 - earned)
    missing = settings.min_withdrawal_nano - earned
    seconds = -(-missing * 3600 // (earned * 2))
    assert x.next_payout.kind == "after_online" and x.next_payout.online_s == seconds
    assert x.next_payout.at == NOW + dt.timedelta(seconds=seconds)


def test_the_next_payout_is_on_its_way_ready_or_after_more_online_time(
    settings: Settings,
) -> None:
    minimum = settings.min_withdrawal_nano
    sent = NOW - dt.timedelta(seconds=30)
    on_way = next_payout(settings, available=0, rate_per_hour=1, sending_since=sent, now=NOW)
    assert on_way.at == sent + dt.timedelta(seconds=settings.ton.payout_ttl_s)
    ready = next_payout(
        settings, available=minimum, rate_per_hour=None, sending_since=None, now=NOW
    )
    assert ready.kind == "ready"
    later = next_payout(
        settings, available=minimum - 3, rate_per_hour=2, sending_since=None, now=NOW
    )
    assert (later.kind, later.online_s) == ("after_online", 5400)  # 3 at 2 an hour: 1.5 h


async def test_earnings_in_the_bot_say_the_rate_fees_and_next_payout(
    bot: Harness, redis_url: str
) -> None:
    await bot.send("/start")
    provider = await bot.user()
    await become_provider(bot.db, provider.id)
    user = await get_or_create_user(bot.db, 9103)
    await bot.ledger.credit_deposit(user.id, 10**9, "test:fund-bot")
    await record_turn(bot.ledger, user.id, 40_000_000, provider.id)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await count_online(client, [("w-1", provider.id)], now=0.0)
        for second in range(30, 3601, 30):
            await count_online(client, [("w-1", provider.id)], now=float(second))
    finally:
        await client.aclose()
    await bot.send("/earnings")
    text = bot.last().text
    assert "Online: 1 h 0 min; 0.032 GRAM per hour online" in text
    assert f"Per 1M tokens served: {format_gram(32_000_000 * 10**6 // 33)}" in text
    assert "the network keeps 20% of each reply's price (0.008 GRAM of the replies" in text
    assert "Next payout: after about 30 h 15 min more online" in text  # 0.968 at 0.032 an hour


def test_the_readme_worked_example_is_what_the_code_computes() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    price = settings.models[DEFAULT_MODEL]
    x = worked_example(
        settings, price, turns_per_hour=3600, prompt_tokens=500, completion_tokens=250
    )
    readme = README.read_text()
    start = readme.index("**Worked example**")
    section = readme[start : readme.index("### For operators", start)]
    hours, rest = divmod(x.to_min_withdrawal_s, 3600)
    expected = [
        f"`{DEFAULT_MODEL}`",
        f"{format_gram(price.prompt)} per 1M prompt",
        f"{format_gram(price.completion)} per 1M completion",
        f"{x.tokens_per_hour:,} tokens an hour",
        f"| the user pays | {format_gram(x.cost_per_turn)} | "
        f"{format_gram(x.cost_per_turn * 3600)} |",
        f"({settings.provider_share_bps // 100} %, `COCOON_PROVIDER_SHARE_BPS="
        f"{settings.provider_share_bps}`) | {format_gram(x.earned_per_turn)} | "
        f"{format_gram(x.per_hour)} |",
        f"| the network's fee ({100 - settings.provider_share_bps // 100} %) | "
        f"{format_gram(x.fee_per_turn)} | {format_gram(x.fees_per_hour)} |",
        f"{format_gram(x.per_million_tokens)} per 1M tokens served",
        f"first payout ({format_gram(settings.min_withdrawal_nano)},",
        f"after {hours} h {rest // 60} min online",
    ]
    flat = re.sub(r"\s+", " ", section)
    for line in expected:
        assert line in flat, line
