"""The updates the bot is handling, and how many it starts on at once.

:class:`InFlight`, the outermost update middleware, keeps the task of each update being handled
(so that a stop lets them finish, then cancels the rest) and admits at most
:data:`ADMITTED_AT_ONCE` of them at a time to their database and Redis work. A burst of updates
(a thousand chats writing at once) queues here, in order and without a timeout, instead of in
the connection pools, whose waits end in errors after 30 s (SQLite's one writer at a time makes
them long). An update keeps its slot until it ends, or until its chat turn is dispatched
(:func:`turn_started`): the rest of a turn is waiting for the worker's tokens and for Telegram's
flood limits, which must not keep other chats from starting theirs.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any

from aiogram import BaseMiddleware
from aiogram.types import TelegramObject

from bot.common import NextHandler
from workers.lifecycle import cancel_and_wait

log = logging.getLogger("cocoon.bot")

ADMITTED_AT_ONCE = 64
"""Updates doing their own work at once: a few times the database's connections (SQLite's 20,
PostgreSQL's 15), so that the pools stay busy and no wait in them grows long."""


class _Slot:
    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore: asyncio.Semaphore | None = semaphore

    def release(self) -> None:
        if self._semaphore is not None:
            self._semaphore.release()
            self._semaphore = None


_SLOT: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar("bot_slot", default=None)


def turn_started() -> None:
    """The current update's turn is dispatched (or refused): its slot goes to the next one."""
    slot = _SLOT.get()
    if slot is not None:
        slot.release()


class InFlight(BaseMiddleware):
    """The updates being handled right now (each runs in its own task, while polling and in
    webhook mode alike), at most ``at_once`` of them admitted to their work at a time."""

    def __init__(self, at_once: int = ADMITTED_AT_ONCE) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self._slots = asyncio.Semaphore(at_once)

    async def admit(self) -> float:
        """Wait for a slot; the seconds waited."""
        started = time.perf_counter()
        await self._slots.acquire()
        return time.perf_counter() - started

    async def __call__(
        self, handler: NextHandler, event: TelegramObject, data: dict[str, Any]
    ) -> Any:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            await self.admit()
            slot = _Slot(self._slots)
            token = _SLOT.set(slot)
            try:
                return await handler(event, data)
            finally:
                slot.release()
                _SLOT.reset(token)
        finally:
            if task is not None:
                self.tasks.discard(task)

    async def finish(self, timeout_s: float) -> None:
        """Let the updates being handled finish for up to ``timeout_s``, then cancel the rest."""
        late = {task for task in self.tasks if task is not asyncio.current_task()}
        try:
            if late:
                _done, late = await asyncio.wait(late, timeout=timeout_s)
        finally:
            late = {task for task in late if not task.done()}
            if late:
                log.warning("%d updates still running at a stop: cancelled", len(late))
                await cancel_and_wait(late)
