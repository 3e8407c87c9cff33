"""The notification outbox: what the bot tells a user once, in one table (``notifications``).

- **Kinds** (``NOTIFY_*``): a deposit or a Stars payment credited, a payout confirmed or failed,
  a worker attested, refused, offline or flagged for crossing a bound.
- **Write**: :func:`notify` puts a row in the outbox once per ``key``; :func:`add` puts one in a
  transaction the caller holds (the deposit watcher credits and notifies in one).
- **Read**: :func:`pending_notifications`, :func:`find`, :func:`notification_data`.
- **Deliver**: the bot (``bot/outbox.py``) *claims* a row (:func:`mark_delivered`) before it
  sends it, so two bot replicas never tell one twice, and gives it back
  (:func:`mark_undelivered`) when Telegram could not take it.

Rows carry amounts and ids, never prompt or reply text.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from backend.db import Database, rowcount
from backend.models import Notification

__all__ = [
    "KINDS",
    "NOTIFY_DEPOSIT",
    "NOTIFY_PAYOUT_CONFIRMED",
    "NOTIFY_PAYOUT_FAILED",
    "NOTIFY_STARS",
    "NOTIFY_WORKER_ATTESTED",
    "NOTIFY_WORKER_FAILED",
    "NOTIFY_WORKER_FLAGGED",
    "NOTIFY_WORKER_OFFLINE",
    "add",
    "find",
    "mark_delivered",
    "mark_undelivered",
    "notification_data",
    "notify",
    "pending_notifications",
]

NOTIFY_DEPOSIT = "deposit_credited"  # the watcher, in the crediting transaction
NOTIFY_STARS = "stars_credited"
NOTIFY_PAYOUT_CONFIRMED = "payout_confirmed"  # the payout sender
NOTIFY_PAYOUT_FAILED = "payout_failed"
NOTIFY_WORKER_ATTESTED = "worker_attested"  # attestation and the offline watcher
NOTIFY_WORKER_FAILED = "worker_failed"
NOTIFY_WORKER_OFFLINE = "worker_offline"
NOTIFY_WORKER_FLAGGED = "worker_flagged"  # backend.flags: a worker crossed a bound (once)

KINDS = (
    NOTIFY_DEPOSIT,
    NOTIFY_STARS,
    NOTIFY_PAYOUT_CONFIRMED,
    NOTIFY_PAYOUT_FAILED,
    NOTIFY_WORKER_ATTESTED,
    NOTIFY_WORKER_FAILED,
    NOTIFY_WORKER_OFFLINE,
    NOTIFY_WORKER_FLAGGED,
)
"""Every kind the outbox holds; the bot has words for each."""


def add(
    session: AsyncSession,
    user_id: int,
    kind: str,
    key: str,
    *,
    amount: int = 0,
    data: dict[str, Any] | None = None,
) -> None:
    """Put a message for the user in the outbox, in the caller's transaction (a second row
    with the same ``key`` fails that transaction)."""
    session.add(
        Notification(
            key=key,
            user_id=user_id,
            kind=kind,
            amount=amount,
            data=json.dumps(data, sort_keys=True) if data else None,
        )
    )


async def notify(
    db: Database,
    user_id: int,
    kind: str,
    key: str,
    *,
    amount: int = 0,
    data: dict[str, Any] | None = None,
) -> bool:
    """Put a message for the user in the outbox, once per ``key``. False if already there."""
    try:
        async with db.session() as session, session.begin():
            add(session, user_id, kind, key, amount=amount, data=data)
    except IntegrityError:
        return False
    return True


def notification_data(notification: Notification) -> dict[str, Any]:
    """The JSON details of an outbox entry (empty when it has none)."""
    if not notification.data:
        return {}
    value = json.loads(notification.data)
    return value if isinstance(value, dict) else {}


async def pending_notifications(db: Database, limit: int = 100) -> list[Notification]:
    """What the bot still has to tell users, oldest first."""
    async with db.session() as session:
        rows = await session.scalars(
            select(Notification)
            .where(Notification.delivered_at.is_(None))
            .order_by(Notification.id)
            .limit(limit)
        )
        return list(rows)


async def find(db: Database, key: str) -> Notification | None:
    """The outbox entry written under ``key``, told or not."""
    async with db.session() as session:
        return await session.scalar(select(Notification).where(Notification.key == key))


async def mark_delivered(db: Database, notification_id: int) -> bool:
    """Claim one notification (mark it told) before telling it; False if it already was
    (another bot replica told it)."""
    async with db.session() as session, session.begin():
        result = await session.execute(
            update(Notification)
            .where(Notification.id == notification_id, Notification.delivered_at.is_(None))
            .values(delivered_at=dt.datetime.now(dt.UTC))
            .execution_options(synchronize_session=False)
        )
        return rowcount(result) == 1


async def mark_undelivered(db: Database, notification_id: int) -> None:
    """Give a claimed notification back to the outbox: telling it failed for a reason that may
    pass (Telegram down or slow), so a later round tells it."""
    async with db.session() as session, session.begin():
        await session.execute(
            update(Notification)
            .where(Notification.id == notification_id)
            .values(delivered_at=None)
            .execution_options(synchronize_session=False)
        )
