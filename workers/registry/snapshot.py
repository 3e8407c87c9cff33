"""The dispatcher's copy of the healthy workers (:class:`WorkerSnapshot`), read off the request
path: no number of index entries slows a turn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

from redis.asyncio import Redis as AsyncRedis

from workers.registry.entries import DEFAULT_CAPACITY, WorkerInfo
from workers.registry.reading import MAX_INDEX_ENTRIES, list_workers

log = logging.getLogger(__name__)


class WorkerSnapshot:
    """The dispatcher's copy of the healthy workers, read off the request path.

    :meth:`start` runs a background task that re-reads the registry every ``refresh_s``
    seconds (:func:`list_workers`: bounded, batched). :meth:`workers` answers from memory; only
    the very first call, before any copy exists, waits for a read. A process that never calls
    :meth:`start` (a CLI, a test) gets a refresh kicked off in the background whenever its copy
    is older than ``refresh_s``. The copy may be a refresh old: a slot reservation checks, in
    Redis, that the worker still exists and has room.
    """

    def __init__(
        self,
        redis: AsyncRedis,
        *,
        refresh_s: float = 1.0,
        default_capacity: int = DEFAULT_CAPACITY,
        limit: int = MAX_INDEX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.refresh_s = refresh_s
        self.default_capacity = default_capacity
        self.limit = limit
        self.clock = clock
        self._workers: dict[str, WorkerInfo] | None = None
        self._taken_at = -math.inf
        self._reading: asyncio.Future[None] | None = None
        self._loop: asyncio.Task[None] | None = None

    @property
    def age_s(self) -> float:
        """Seconds since the read of the copy began (infinite before the first read): a worker
        that registered while a slow read was under way may be missing from it, so the copy is
        as old as the start of its read, not its end."""
        return self.clock() - self._taken_at

    async def refresh(self) -> None:
        """Read the registry now (concurrent callers share one read)."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read())
        await asyncio.shield(self._reading)

    async def _read(self) -> None:
        started = self.clock()
        workers = await list_workers(
            self.redis, default_capacity=self.default_capacity, limit=self.limit
        )
        self._workers = {w.worker_id: w for w in workers}
        self._taken_at = started

    async def workers(self, model: str | None = None) -> list[WorkerInfo]:
        """The healthy workers (of ``model``) as of the last read."""
        if self._workers is None:
            await self.refresh()
        elif self._loop is None and self.age_s > self.refresh_s:
            self._refresh_later()
        assert self._workers is not None
        return [w for w in self._workers.values() if model is None or w.model == model]

    def _refresh_later(self) -> None:
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read())
            self._reading.add_done_callback(_log_failure)

    def reserved(self, worker_id: str) -> None:
        """This process reserved a slot on the worker: count it until the next read."""
        if self._workers and (worker := self._workers.get(worker_id)) is not None:
            self._workers[worker_id] = worker.model_copy(update={"reserved": worker.reserved + 1})

    def released(self, worker_id: str) -> None:
        """This process freed a slot on the worker: count it free until the next read (a worker
        that looked full in the copy takes the next turn at once, not a refresh later)."""
        if self._workers and (worker := self._workers.get(worker_id)) is not None:
            if worker.reserved > 0:
                self._workers[worker_id] = worker.model_copy(
                    update={"reserved": worker.reserved - 1}
                )

    def forget(self, worker_id: str) -> None:
        """The worker is gone (found so by a reservation): drop it until the next read."""
        if self._workers:
            self._workers.pop(worker_id, None)

    def start(self) -> None:
        """Refresh in the background from now on (call from the running event loop)."""
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Redis down: keep the last copy, try again
                log.warning("worker snapshot not refreshed: %s", error)
            await asyncio.sleep(self.refresh_s)

    async def close(self) -> None:
        tasks = [t for t in (self._loop, self._reading) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
        self._loop = None


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("worker snapshot not refreshed: %s", future.exception())
