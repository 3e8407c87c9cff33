"""Workers caught crossing a bound (:mod:`backend.bounds`): a durable record per turn and kind
(``worker_flags``, shown in the admin's ``/stats``), and the provider told once per worker
through the notification outbox (:mod:`backend.notifications`, ``NOTIFY_WORKER_FLAGGED``).
The dispatcher counts them in its metrics too."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import select

from backend.bounds import Flag
from backend.db import Database
from backend.models import WorkerFlag
from backend.notifications import NOTIFY_WORKER_FLAGGED, notify

__all__ = ["record_flags"]

log = logging.getLogger("cocoon.flags")


async def record_flags(
    db: Database,
    flags: Sequence[Flag],
    *,
    worker_id: str,
    provider_id: int | None,
    turn_id: str,
    model: str,
) -> int:
    """Record the bounds ``worker_id`` crossed in ``turn_id`` (once per turn and kind) and tell
    its provider, the first time the worker is flagged. Returns the rows added."""
    if not flags:
        return 0
    async with db.session() as session, session.begin():
        known = set(
            await session.scalars(select(WorkerFlag.kind).where(WorkerFlag.turn_id == turn_id))
        )
        added = [flag for flag in {f.kind: f for f in flags}.values() if flag.kind not in known]
        for flag in added:
            session.add(
                WorkerFlag(
                    worker_id=worker_id,
                    provider_id=provider_id,
                    turn_id=turn_id,
                    model=model,
                    kind=flag.kind.value,
                    claimed=flag.claimed,
                    bound=flag.bound,
                )
            )
    for flag in added:
        log.warning(
            "worker %s crossed its %s bound in turn %s: %d > %d",
            worker_id,
            flag.kind.value,
            turn_id,
            flag.claimed,
            flag.bound,
        )
    if added and provider_id is not None:
        first = added[0]
        data = {
            "worker_id": worker_id,
            "kind": first.kind.value,
            "claimed": first.claimed,
            "bound": first.bound,
        }
        # Once per worker, whatever comes next: a second flag finds the key told already.
        await notify(
            db, provider_id, NOTIFY_WORKER_FLAGGED, f"worker-flagged:{worker_id}", data=data
        )
    return len(added)
