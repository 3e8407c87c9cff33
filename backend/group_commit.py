"""Group commit: writes asked while one is in flight go together, in one commit.

A write asked while none is in flight goes at once, alone; writes asked while one is in flight
wait for it and then go together as one batch (one statement or one transaction: one commit,
one fsync, instead of one each). A load of one write at a time waits for nothing; a busy one
commits many at once. Two writes with a common key (a twin) never go in one batch: the later
waits for the next one. The ledger's holds' closes (:class:`backend.ledger_pg.CloseBatcher`)
and the receipts no settlement writes (:meth:`backend.ledger.Ledger.keep_receipt`) go this way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

Item = TypeVar("Item")
Result = TypeVar("Result")


class GroupCommit(Generic[Item, Result]):
    """Batches of ``Item`` written by ``apply`` (one commit a batch; each item's result, in
    order), at most ``max_batch`` at a time; ``keys`` names an item's twins. Serves the event
    loop it was made on (``loop``)."""

    def __init__(
        self,
        apply: Callable[[list[Item]], Awaitable[Sequence[Result]]],
        *,
        max_batch: int = 64,
        keys: Callable[[Item], Iterable[Hashable]] = lambda _item: (),
    ) -> None:
        self.apply = apply
        self.max_batch = max(1, max_batch)
        self.keys = keys
        self.loop = asyncio.get_running_loop()  # its waiters' loop: a batcher serves one
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._drain: asyncio.Task[None] | None = None

    async def write(self, item: Item) -> Result:
        """Write ``item`` with the others asked meanwhile; its result, or what its batch raised."""
        future: asyncio.Future[Result] = self.loop.create_future()
        self._waiting.append((item, future))
        if self._drain is None or self._drain.done():
            self._drain = asyncio.create_task(self._run())
        return await asyncio.shield(future)

    async def _run(self) -> None:
        while self._waiting:
            batch: list[tuple[Item, asyncio.Future[Result]]] = []
            later: list[tuple[Item, asyncio.Future[Result]]] = []
            taken: set[Hashable] = set()
            for waiting in self._waiting:
                keys = set(self.keys(waiting[0]))
                if len(batch) == self.max_batch or not keys.isdisjoint(taken):
                    later.append(waiting)  # a twin waits for the next batch
                    continue
                batch.append(waiting)
                taken |= keys
            self._waiting = later
            try:
                results = await self.apply([item for item, _ in batch])
            except BaseException as error:  # tell every waiter, then stop as asked
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                if not isinstance(error, Exception):
                    raise
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
