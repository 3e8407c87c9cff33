"""Providers and their workers: becoming a provider, each worker's state as the database
remembers it (its provider told of every change through the outbox), the provider's workers
and earnings, and withdrawals."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis as AsyncRedis
from sqlalchemy import func, select

from backend.accounts.economics import count_online
from backend.accounts.errors import AccountError
from backend.db import Database
from backend.errors import ErrorCode
from backend.ledger import InsufficientFunds, InvalidAmount, Ledger
from backend.models import (
    AccountKind,
    Payout,
    PayoutState,
    TurnRecord,
    WorkerRecord,
    WorkerState,
)
from backend.money import AmountProblem
from backend.notifications import (
    NOTIFY_WORKER_ATTESTED,
    NOTIFY_WORKER_FAILED,
    NOTIFY_WORKER_OFFLINE,
    notify,
)
from backend.settings import Settings
from backend.users import update_user

__all__ = [
    "HEARTBEAT_GRACE_S",
    "Earnings",
    "WorkerView",
    "become_provider",
    "earnings",
    "provider_workers",
    "record_worker",
    "watch_workers",
    "withdraw",
    "withdrawal_refusal",
]


async def become_provider(db: Database, user_id: int) -> None:
    await update_user(db, user_id, is_provider=True)


async def record_worker(
    db: Database,
    worker_id: str,
    state: WorkerState,
    *,
    provider_id: int | None = None,
    model: str | None = None,
    tee: str | None = None,
    image: str | None = None,
    mrtd: str | None = None,
    attested_at: dt.datetime | None = None,
    expires_at: dt.datetime | None = None,
    note: str | None = None,
) -> bool:
    """Remember a worker's latest state; tell its provider when the state changes (attested,
    attestation refused, offline, revoked). Returns whether the state changed."""
    async with db.session() as session, session.begin():
        row = await session.get(WorkerRecord, worker_id, with_for_update=True)
        previous = row.state if row is not None else None
        if row is None:
            row = WorkerRecord(worker_id=worker_id)
            session.add(row)
        row.state = state
        row.note = note
        for name, value in (
            ("provider_id", provider_id),
            ("model", model),
            ("tee", tee),
            ("image", image),
            ("mrtd", mrtd),
            ("attested_at", attested_at),
            ("expires_at", expires_at),
        ):
            if value is not None:
                setattr(row, name, value)
        provider = row.provider_id
    changed = previous != state
    if provider is not None and changed:
        kind = {
            WorkerState.ATTESTED: NOTIFY_WORKER_ATTESTED,
            WorkerState.FAILED: NOTIFY_WORKER_FAILED,
            WorkerState.OFFLINE: NOTIFY_WORKER_OFFLINE,
            WorkerState.REVOKED: NOTIFY_WORKER_OFFLINE,
        }[state]
        stamp = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
        await notify(
            db,
            provider,
            kind,
            f"worker:{worker_id}:{state}:{stamp}",
            data={"worker_id": worker_id, "model": model, "tee": tee, "note": note},
        )
    return changed


HEARTBEAT_GRACE_S = 60
"""A worker just attested has this long to send its first heartbeat."""


async def watch_workers(
    db: Database, redis: AsyncRedis, *, grace_s: float = HEARTBEAT_GRACE_S
) -> list[str]:
    """Workers going offline: an attested worker whose heartbeat stopped is recorded offline
    (its provider is told through the outbox), and recorded attested again when it is back.
    Returns the workers whose state changed; safe to run from several processes."""
    from workers import registry

    live = {w.worker_id: w for w in await registry.list_workers(redis)}
    serving = [(w.worker_id, w.provider_id) for w in live.values() if w.attested and w.provider_id]
    await count_online(redis, serving, now=time.time())  # online time, for the economics
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=grace_s)
    async with db.session() as session:
        rows = list(
            await session.execute(
                select(WorkerRecord.worker_id, WorkerRecord.state, WorkerRecord.attested_at).where(
                    WorkerRecord.state.in_([WorkerState.ATTESTED, WorkerState.OFFLINE])
                )
            )
        )
    changed = []
    for worker_id, state, attested_at in rows:
        info = live.get(worker_id)
        if state == WorkerState.ATTESTED and info is None:
            if attested_at is not None and attested_at > since:
                continue
            if await record_worker(db, worker_id, WorkerState.OFFLINE, note="no heartbeat"):
                changed.append(worker_id)
        elif state == WorkerState.OFFLINE and info is not None and info.attested:
            if await record_worker(
                db, worker_id, WorkerState.ATTESTED, model=info.model, tee=info.tee
            ):
                changed.append(worker_id)
    return changed


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    model: str | None
    tee: str | None
    image: str | None
    mrtd: str | None
    state: str
    online: bool
    expires_at: dt.datetime | None
    jobs: int
    earned: int


async def provider_workers(db: Database, redis: AsyncRedis, provider_id: int) -> list[WorkerView]:
    """The provider's workers: what the database remembers, whether each is online now (a live
    heartbeat in the registry), jobs served and nanoTON earned."""
    from workers import registry

    live = {w.worker_id: w for w in await registry.list_workers(redis)}
    async with db.session() as session:
        rows = list(
            await session.scalars(
                select(WorkerRecord)
                .where(WorkerRecord.provider_id == provider_id)
                .order_by(WorkerRecord.worker_id)
            )
        )
        totals = await session.execute(
            select(
                TurnRecord.worker_id,
                func.count(TurnRecord.id),
                func.coalesce(func.sum(TurnRecord.provider_earned), 0),
            )
            .where(TurnRecord.provider_id == provider_id)
            .group_by(TurnRecord.worker_id)
        )
        stats = {worker_id: (int(jobs), int(earned)) for worker_id, jobs, earned in totals}
    views = []
    for row in rows:
        jobs, earned = stats.get(row.worker_id, (0, 0))
        info = live.get(row.worker_id)
        views.append(
            WorkerView(
                worker_id=row.worker_id,
                model=row.model,
                tee=row.tee,
                image=row.image,
                mrtd=row.mrtd,
                state=row.state,
                online=info is not None and info.provider_id == provider_id,
                expires_at=row.expires_at,
                jobs=jobs,
                earned=earned,
            )
        )
    return views


@dataclass(frozen=True)
class Earnings:
    available: int  # withdrawable now
    pending: int  # in payouts on their way
    paid: int  # confirmed payouts, all time
    earned: int  # all time, from turns
    jobs: int


async def earnings(ledger: Ledger, provider_id: int) -> Earnings:
    async with ledger.db.session() as session:
        paid = await session.scalar(
            select(func.coalesce(func.sum(Payout.amount), 0)).where(
                Payout.provider_id == provider_id, Payout.state == PayoutState.CONFIRMED
            )
        )
        earned, jobs = (
            await session.execute(
                select(
                    func.coalesce(func.sum(TurnRecord.provider_earned), 0),
                    func.count(TurnRecord.id),
                ).where(TurnRecord.provider_id == provider_id)
            )
        ).one()
    return Earnings(
        available=await ledger.balance(AccountKind.PROVIDER, provider_id),
        pending=await ledger.balance(AccountKind.PROVIDER_PENDING, provider_id),
        paid=int(paid or 0),
        earned=int(earned),
        jobs=int(jobs),
    )


def withdrawal_refusal(settings: Settings, amount: int, available: int) -> AccountError | None:
    """Why ``amount`` nanoTON cannot be withdrawn from ``available`` earnings (None: it can):
    below the smallest withdrawal, or more than is available. The bot asks before it shows its
    confirmation button; :func:`withdraw` asks again when the payout is made."""
    if amount < settings.min_withdrawal_nano:
        return AccountError(
            ErrorCode.BELOW_MINIMUM,
            "below the smallest withdrawal",
            minimum=settings.min_withdrawal_nano,
            available=available,
        )
    if amount > available:
        return AccountError(
            ErrorCode.INSUFFICIENT_FUNDS, "more than your available earnings", available=available
        )
    return None


async def withdraw(
    ledger: Ledger,
    settings: Settings,
    provider_id: int,
    amount: int | Literal["all"],
    key: str,
) -> Payout:
    """Ask for a payout of ``amount`` nanoTON (or everything available) to the provider's
    linked payout wallet. ``key`` makes the request happen once (a confirmation button's id).
    The payout sender (``cocoon ton payouts``) then signs, sends and confirms it."""
    from backend.ton.proof import linked_wallet

    async with ledger.db.session() as session:
        done = await session.scalar(select(Payout).where(Payout.key == key))
    if done is not None and done.provider_id == provider_id:
        return done  # the same confirmation pressed twice
    wallet = await linked_wallet(ledger.db, provider_id, "payout")
    if wallet is None:
        raise AccountError(ErrorCode.NO_PAYOUT_WALLET, "link a payout wallet first (/provider)")
    available = await ledger.balance(AccountKind.PROVIDER, provider_id)
    if amount == "all":
        amount = available
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise AccountError(
            ErrorCode.INVALID_AMOUNT,
            "the amount must be a positive number of GRAM",
            problem=AmountProblem.NOT_POSITIVE.value,  # each surface says it in its words
        )
    refusal = withdrawal_refusal(settings, amount, available)
    if refusal is not None:
        raise refusal
    try:
        receipt = await ledger.request_withdrawal(
            provider_id, amount, key, destination=wallet.address
        )
    except InsufficientFunds as error:
        raise AccountError(ErrorCode.INSUFFICIENT_FUNDS, str(error), available=available) from error
    except InvalidAmount as error:
        raise AccountError(
            ErrorCode.BELOW_MINIMUM,
            str(error),
            minimum=settings.min_withdrawal_nano,
            available=available,
        ) from error
    assert receipt.subject_id is not None  # a withdrawal's receipt names its payout
    payout = await ledger.get_payout(receipt.subject_id)
    assert payout is not None
    return payout
