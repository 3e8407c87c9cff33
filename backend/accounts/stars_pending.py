"""Stars payments that arrived while they could not be credited (the database was down): kept in
Redis until a retry credits them, so that a paid invoice is never lost.

Telegram sends a ``successful_payment`` once: when crediting it fails, the bot's error handler
keeps a :class:`PendingStars` (charge id, Telegram user id, Stars, invoice payload: nothing
secret) in the hash ``cocoon:stars-pending`` (field: the charge id); when Redis is down too, the
record is logged at ERROR for the operator. :func:`retry_loop` (in the bot process) credits
them with backoff; ``cocoon stars pending`` lists them and ``cocoon stars credit CHARGE_ID``
credits one by hand. Crediting is idempotent by charge id (:func:`credit_stars`): a retry after
a partial success replays, never doubles; the user is told through the outbox.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from backend import cliutil
from backend.accounts.errors import AccountError
from backend.accounts.stars import StarsInvoice, credit_stars, parse_stars_payload
from backend.db import Database
from backend.ledger import Ledger, Receipt
from backend.settings import Settings
from backend.users import get_or_create_user
from workers.backoff import Backoff, sleep_or_stop
from workers.redis_keys import redis_key

__all__ = [
    "PendingStars",
    "credit_paid",
    "credit_pending",
    "keep",
    "paid_rate",
    "pending",
    "retry_loop",
]

log = logging.getLogger("cocoon.stars")

STARS_PENDING = "stars-pending"
KEY = redis_key(STARS_PENDING)
"""Hash: charge id → the JSON of a :class:`PendingStars`."""
MAX_FIELD = 200  # a charge id is at most 150 characters, a payload at most 128 bytes


@dataclass(frozen=True)
class PendingStars:
    """A Stars payment Telegram told of that is not credited yet. ``refused``: why crediting it
    can never work as it is (the retry loop skips it; the operator decides)."""

    charge_id: str
    telegram_id: int
    stars: int
    payload: str
    refused: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> PendingStars | None:
        try:
            value = json.loads(raw)
            record = cls(
                charge_id=str(value["charge_id"]),
                telegram_id=int(value["telegram_id"]),
                stars=int(value["stars"]),
                payload=str(value["payload"]),
                refused=str(value.get("refused", "")),
            )
        except (ValueError, TypeError, KeyError):
            return None
        return record if record.charge_id and len(record.charge_id) <= MAX_FIELD else None


def paid_rate(invoice: StarsInvoice | None, settings: Settings) -> int:
    """The rate a paid invoice is credited at: the one it showed, when the bot issues that rate
    (pre-checkout let only those through); never more than the bot issues now."""
    issued = settings.stars_nano_per_star
    shown = invoice.nano_per_star if invoice is not None else None
    if shown is None or shown == issued:
        return issued
    log.warning("a Stars invoice at a rate the bot does not issue was paid: credited at %d", issued)
    return min(shown, issued)


async def credit_paid(
    ledger: Ledger, settings: Settings, user_id: int, stars: int, charge_id: str, payload: str
) -> Receipt:
    """Credit a paid Stars invoice (its ``payload``) to ``user_id``, once per ``charge_id``."""
    rate = paid_rate(parse_stars_payload(payload), settings)
    return await credit_stars(ledger, settings, user_id, stars, charge_id, nano_per_star=rate)


async def keep(redis: AsyncRedis, record: PendingStars) -> None:
    """Keep ``record`` until it is credited (the same charge again: the same record)."""
    if len(record.charge_id) > MAX_FIELD or len(record.payload) > MAX_FIELD:
        raise ValueError("not a Telegram Stars payment")
    await redis.hset(KEY, record.charge_id, record.to_json())


async def pending(redis: AsyncRedis) -> list[PendingStars]:
    """The payments waiting to be credited."""
    raw: dict[Any, Any] = await redis.hgetall(KEY)
    records = (PendingStars.from_json(value) for value in raw.values())
    return sorted((r for r in records if r is not None), key=lambda r: r.charge_id)


async def credit_pending(
    db: Database, ledger: Ledger, settings: Settings, redis: AsyncRedis, record: PendingStars
) -> Receipt:
    """Credit ``record`` to its payer (replayed when it already was), then forget it. An
    :class:`AccountError` (it can never be credited as it is) marks it refused and is raised."""
    user = await get_or_create_user(db, record.telegram_id)
    try:
        receipt = await credit_paid(
            ledger, settings, user.id, record.stars, record.charge_id, record.payload
        )
    except AccountError as error:
        refused = PendingStars(**{**asdict(record), "refused": error.code.value})
        await redis.hset(KEY, record.charge_id, refused.to_json())
        raise
    await redis.hdel(KEY, record.charge_id)
    return receipt


async def retry_once(
    db: Database, ledger: Ledger, settings: Settings, redis: AsyncRedis
) -> tuple[int, int]:
    """Try every pending payment not refused; ``(credited, refused)``. Raises what the
    database or Redis raise (the loop waits longer, then tries again)."""
    credited = refused = 0
    for record in await pending(redis):
        if record.refused:
            continue
        try:
            receipt = await credit_pending(db, ledger, settings, redis, record)
        except AccountError as error:
            log.error(
                "a pending Stars payment can never be credited as it is: %s %s", error, record
            )
            refused += 1
            continue
        credited += 1
        log.info("a pending Stars payment was credited (replayed: %s)", receipt.replayed)
    return credited, refused


async def retry_loop(
    stop: asyncio.Event,
    db: Database,
    ledger: Ledger,
    settings: Settings,
    redis: AsyncRedis,
    interval_s: float = 10.0,
    max_s: float = 300.0,
) -> None:
    """Credit the pending payments every ``interval_s`` until ``stop``; while the database or
    Redis fail, wait longer each time (at most ``max_s``)."""
    backoff = Backoff(interval_s / 2, max_s)
    while not stop.is_set():
        try:
            await retry_once(db, ledger, settings, redis)
        except Exception as error:  # the database or Redis is still down: later
            log.warning("pending Stars payments not credited yet: %s", type(error).__name__)
            await sleep_or_stop(stop, backoff.failed())
            continue
        backoff.succeeded()
        await sleep_or_stop(stop, interval_s)


# ------------------------------------------------------------------ cocoon stars ...


def cmd_stars_pending(settings: Settings, _args: argparse.Namespace) -> int:
    async def work(_db: Database, redis: AsyncRedis) -> int:
        records = await pending(redis)
        for r in records:
            note = f"  REFUSED: {r.refused}" if r.refused else ""
            print(f"{r.charge_id}  Telegram user {r.telegram_id}  {r.stars} Stars{note}")
        print(f"{len(records)} pending Stars payments")
        return 0

    return cliutil.with_database_and_redis(settings, work)


def cmd_stars_credit(settings: Settings, args: argparse.Namespace) -> int:
    given = PendingStars.from_json(args.record) if args.record else None
    if args.record and given is None:
        cliutil.fail("--record: not the record of a Stars payment")
    charge_id = given.charge_id if given else (args.charge_id or "").strip()
    if not charge_id:
        cliutil.fail("say which payment: CHARGE_ID, or --record")

    async def work(db: Database, redis: AsyncRedis) -> int:
        ledger = Ledger(db, min_withdrawal=settings.min_withdrawal_nano)
        raw = await redis.hget(KEY, charge_id)
        record = given or (PendingStars.from_json(raw) if raw else None)
        if record is None:
            cliutil.fail(f"no pending Stars payment {charge_id!r}: see `cocoon stars pending`", 1)
        try:
            receipt = await credit_pending(db, ledger, settings, redis, record)
        except AccountError as error:
            cliutil.fail(f"not credited: {error} (kept; credit it with `cocoon ledger credit`)", 1)
        note = " (already credited earlier: nothing changed)" if receipt.replayed else ""
        print(
            f"credited {record.stars} Stars to Telegram user {record.telegram_id}{note}; "
            f"transaction {receipt.transaction_id}; the user is told by the bot's outbox"
        )
        return 0

    return cliutil.with_database_and_redis(settings, work)


def add_commands(sub: cliutil.SubParsers, add: cliutil.Add) -> None:
    group = cliutil.add_group(
        sub, "stars", "Telegram Stars payments not credited yet", "Stars commands"
    )
    add("pending", "list the Stars payments waiting to be credited", cmd_stars_pending, group)
    credit = add(
        "credit",
        "credit a pending Stars payment now (idempotent: never twice)",
        cmd_stars_credit,
        group,
    )
    credit.add_argument(
        "charge_id", nargs="?", metavar="CHARGE_ID", help="its telegram_payment_charge_id"
    )
    credit.add_argument(
        "--record",
        metavar="JSON",
        help="the record an ERROR log line gave (Redis was down when the payment arrived)",
    )
