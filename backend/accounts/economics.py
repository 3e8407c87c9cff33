"""What a provider earns, in terms a provider can plan with: per hour of online time, per
million tokens served, the fees taken, and when the next payout arrives.

Online time is counted from the worker registry's heartbeats: every pass of
:func:`run_online_counter` (in every ``cocoon web``, so also in ``cocoon up`` without a bot,
every 5 s) and of :func:`~backend.accounts.providers.watch_workers` (the bot's outbox loop,
every 2 s) adds, for
each attested worker alive in the registry, the time since that worker was last counted, at
most ``MAX_GAP_S`` (a longer gap is time it was not seen, never counted). The previous count
is swapped atomically (``SET … GET``), so several processes running the loop count disjoint
intervals: never twice. The totals live in Redis (``cocoon:online-ms``, milliseconds per
provider), persisted with Redis's own persistence.

:func:`worked_example` is the README's example, from the real prices and the ledger's split.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError
from sqlalchemy import func, select

from backend.ledger import BPS, Ledger, provider_cut
from backend.models import AccountKind, Payout, PayoutState, TurnRecord
from backend.pricing import PER, turn_cost
from backend.settings import ModelPrice, Settings

__all__ = [
    "MAX_GAP_S",
    "Economics",
    "Example",
    "NextPayout",
    "count_online",
    "economics",
    "online_seconds",
    "run_online_counter",
    "worked_example",
]

ONLINE_TOTALS = "cocoon:online-ms"  # hash: provider id → milliseconds online
ONLINE_SEEN = "cocoon:online-seen:"  # + worker id → when it was last counted (epoch ms)
MAX_GAP_S = 30
"""The longest interval between two passes that counts as online (the loop runs every 2 s)."""


def _seen_key(worker_id: str) -> str:
    return f"{ONLINE_SEEN}{worker_id}"


async def count_online(redis: AsyncRedis, live: Iterable[tuple[str, int]], *, now: float) -> None:
    """Add the time since each live ``(worker id, provider id)`` was last counted."""
    now_ms = int(now * 1000)
    for worker_id, provider_id in live:
        previous = await redis.set(_seen_key(worker_id), now_ms, ex=MAX_GAP_S * 10, get=True)
        try:
            gap = now_ms - int(previous) if previous is not None else 0
        except ValueError:
            gap = 0
        if 0 < gap <= MAX_GAP_S * 1000:
            await redis.hincrby(ONLINE_TOTALS, str(provider_id), gap)


COUNT_EVERY_S = 5.0
"""How often :func:`run_online_counter` counts (well inside ``MAX_GAP_S``)."""

log = logging.getLogger(__name__)


async def count_serving(redis: AsyncRedis, *, now: float) -> None:
    """Count the time of every attested worker with a provider that the registry shows alive."""
    from workers import registry

    live = await registry.list_workers(redis)
    serving = [(w.worker_id, w.provider_id) for w in live if w.attested and w.provider_id]
    await count_online(redis, serving, now=now)


async def run_online_counter(
    redis: AsyncRedis,
    stop: asyncio.Event,
    *,
    interval_s: float = COUNT_EVERY_S,
    clock: Callable[[], float] = time.time,
) -> None:
    """Count online time every ``interval_s`` until ``stop`` is set; a Redis error is logged and
    the next pass tries again (the time meanwhile is a gap, never counted twice)."""
    while not stop.is_set():
        try:
            await count_serving(redis, now=clock())
        except (RedisError, OSError) as error:
            log.warning("online time not counted (%s); trying again later", type(error).__name__)
        try:
            async with asyncio.timeout(interval_s):
                await stop.wait()
        except TimeoutError:
            pass


async def online_seconds(redis: AsyncRedis, provider_id: int) -> int:
    value = await redis.hget(ONLINE_TOTALS, str(provider_id))
    try:
        return int(value or 0) // 1000
    except ValueError:
        return 0


@dataclass(frozen=True)
class NextPayout:
    """When the next payout is expected. ``on_its_way``: a payout is being sent, expected by
    ``at``; ``ready``: the available earnings can be withdrawn now; ``after_online``: at the
    rate earned so far, the minimum withdrawal is reached after ``online_s`` more seconds
    online (``at`` if the workers stay online); ``unknown``: nothing earned yet to judge."""

    kind: Literal["on_its_way", "ready", "after_online", "unknown"]
    at: dt.datetime | None = None
    online_s: int | None = None


@dataclass(frozen=True)
class Economics:
    online_s: int  # all its workers' online time, summed
    tokens: int  # prompt + completion tokens served, all time
    earned: int  # nanoTON from turns, all time
    fees: int  # what the network kept of the price of the turns it served
    fee_bps: int  # the network's part of each turn's price, 1/10000
    per_hour: int | None  # nanoTON per hour online (None: no online time yet)
    per_million_tokens: int | None  # nanoTON per 1M tokens served (None: none served)
    available: int
    min_withdrawal: int
    next_payout: NextPayout


def per_hour(earned: int, online_s: int) -> int | None:
    return earned * 3600 // online_s if online_s > 0 else None


def per_million_tokens(earned: int, tokens: int) -> int | None:
    return earned * PER // tokens if tokens > 0 else None


def next_payout(
    settings: Settings,
    *,
    available: int,
    rate_per_hour: int | None,
    sending_since: dt.datetime | None,
    now: dt.datetime,
) -> NextPayout:
    if sending_since is not None:  # a signed message is confirmed or re-signed within its TTL
        return NextPayout(
            "on_its_way", sending_since + dt.timedelta(seconds=settings.ton.payout_ttl_s)
        )
    if available >= settings.min_withdrawal_nano:
        return NextPayout("ready", now)
    if not rate_per_hour:
        return NextPayout("unknown")
    missing = settings.min_withdrawal_nano - available
    seconds = -(-missing * 3600 // rate_per_hour)
    return NextPayout("after_online", now + dt.timedelta(seconds=seconds), seconds)


async def economics(
    ledger: Ledger,
    redis: AsyncRedis,
    settings: Settings,
    provider_id: int,
    *,
    now: dt.datetime | None = None,
) -> Economics:
    now = now or dt.datetime.now(dt.UTC)
    async with ledger.db.session() as session:
        earned, tokens, cost = (
            await session.execute(
                select(
                    func.coalesce(func.sum(TurnRecord.provider_earned), 0),
                    func.coalesce(
                        func.sum(TurnRecord.prompt_tokens + TurnRecord.completion_tokens), 0
                    ),
                    func.coalesce(func.sum(TurnRecord.cost), 0),
                ).where(TurnRecord.provider_id == provider_id)
            )
        ).one()
        sending_since = await session.scalar(
            select(func.min(Payout.created_at)).where(
                Payout.provider_id == provider_id,
                Payout.state.not_in([PayoutState.CONFIRMED, PayoutState.FAILED]),
            )
        )
    online = await online_seconds(redis, provider_id)
    available = await ledger.balance(AccountKind.PROVIDER, provider_id)
    hourly = per_hour(int(earned), online)
    return Economics(
        online_s=online,
        tokens=int(tokens),
        earned=int(earned),
        fees=int(cost) - int(earned),
        fee_bps=BPS - settings.provider_share_bps,
        per_hour=hourly,
        per_million_tokens=per_million_tokens(int(earned), int(tokens)),
        available=available,
        min_withdrawal=settings.min_withdrawal_nano,
        next_payout=next_payout(
            settings,
            available=available,
            rate_per_hour=hourly,
            sending_since=sending_since,
            now=now,
        ),
    )


@dataclass(frozen=True)
class Example:
    """One GPU serving one model, busy ``turns_per_hour`` an hour with turns of the same size."""

    cost_per_turn: int  # what the user pays
    earned_per_turn: int  # the provider's share (rounded down, per turn, as settled)
    fee_per_turn: int
    per_hour: int
    fees_per_hour: int
    tokens_per_hour: int
    per_million_tokens: int
    to_min_withdrawal_s: int  # online time until the first payout can be asked for


def worked_example(
    settings: Settings,
    price: ModelPrice,
    *,
    turns_per_hour: int,
    prompt_tokens: int,
    completion_tokens: int,
) -> Example:
    cost = turn_cost(
        price,
        prompt_tokens=prompt_tokens,
        cached_prompt_tokens=0,
        completion_tokens=completion_tokens,
    )
    earned = provider_cut(cost, settings.provider_share_bps)
    hourly = earned * turns_per_hour
    tokens = (prompt_tokens + completion_tokens) * turns_per_hour
    return Example(
        cost_per_turn=cost,
        earned_per_turn=earned,
        fee_per_turn=cost - earned,
        per_hour=hourly,
        fees_per_hour=(cost - earned) * turns_per_hour,
        tokens_per_hour=tokens,
        per_million_tokens=hourly * PER // tokens,
        to_min_withdrawal_s=-(-settings.min_withdrawal_nano * 3600 // hourly),
    )
