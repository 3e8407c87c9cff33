"""Workers going offline: an attested worker whose heartbeat stopped is recorded offline (its
provider is told through the outbox), and recorded attested again when it is back."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select

from backend import account
from backend.db import Database
from backend.models import WorkerRecord, WorkerState
from workers import registry

GRACE_S = 60
"""A worker just attested has this long to send its first heartbeat."""


async def watch_workers(db: Database, redis: Any, *, grace_s: float = GRACE_S) -> list[str]:
    """Record state changes; returns the workers whose state changed."""
    live = {w.worker_id: w for w in await registry.list_workers(redis)}
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
            if attested_at is not None and _aware(attested_at) > since:
                continue
            if await account.record_worker(db, worker_id, WorkerState.OFFLINE, note="no heartbeat"):
                changed.append(worker_id)
        elif state == WorkerState.OFFLINE and info is not None and info.attested:
            if await account.record_worker(
                db, worker_id, WorkerState.ATTESTED, model=info.model, tee=info.tee
            ):
                changed.append(worker_id)
    return changed


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
