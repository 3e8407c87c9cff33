"""The admin's figures (``/stats``): users, turns, revenue, workers, queue depth and the
workers flagged for crossing a bound."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from redis.asyncio import Redis as AsyncRedis
from sqlalchemy import func, select

from backend.db import Database
from backend.models import Account, AccountKind, TurnRecord, User, WorkerFlag

__all__ = ["Stats", "stats"]


@dataclass(frozen=True)
class Stats:
    users: int
    providers: int
    turns: int
    turns_24h: int
    revenue: int  # the platform's fees, all time (nanoTON)
    volume: int  # what users paid for turns, all time
    workers_online: int
    queue_depth: dict[str, int]
    flags: int = 0  # bounds crossed by workers (backend.flags), all time
    flagged_workers: tuple[str, ...] = ()  # the last few workers flagged, newest first


async def stats(db: Database, redis: AsyncRedis) -> Stats:
    """Figures for the admin's ``/stats``: users, turns, revenue, workers, queue depth and the
    workers flagged for crossing a bound."""
    from workers import registry

    since = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    async with db.session() as session:
        users = await session.scalar(select(func.count(User.id)))
        providers = await session.scalar(select(func.count(User.id)).where(User.is_provider))
        turns, volume = (
            await session.execute(
                select(func.count(TurnRecord.id), func.coalesce(func.sum(TurnRecord.cost), 0))
            )
        ).one()
        turns_24h = await session.scalar(
            select(func.count(TurnRecord.id)).where(TurnRecord.created_at >= since)
        )
        revenue = await session.scalar(
            select(func.coalesce(func.sum(Account.balance), 0)).where(
                Account.kind == AccountKind.PLATFORM
            )
        )
        flags = await session.scalar(select(func.count(WorkerFlag.id)))
        recent = await session.scalars(
            select(WorkerFlag.worker_id)
            .group_by(WorkerFlag.worker_id)
            .order_by(func.max(WorkerFlag.id).desc())
            .limit(5)
        )
        flagged = tuple(recent)
    workers = await registry.list_workers(redis)
    depth: dict[str, int] = {}
    for worker, waiting in zip(workers, await registry.queued_jobs(redis, workers), strict=True):
        depth[worker.model] = depth.get(worker.model, 0) + waiting + worker.effective_load
    return Stats(
        users=int(users or 0),
        providers=int(providers or 0),
        turns=int(turns),
        turns_24h=int(turns_24h or 0),
        revenue=int(revenue or 0),
        volume=int(volume),
        workers_online=len(workers),
        queue_depth=depth,
        flags=int(flags or 0),
        flagged_workers=flagged,
    )
