"""The loop the TON services poll in (the deposit watcher, :mod:`backend.ton.watcher`, and the
payout sender, :mod:`backend.ton.payouts`): a step again at once while there is more to do,
after the poll interval when not, after a growing back-off when TON Center or the database
fails."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from sqlalchemy.exc import DBAPIError

from backend.ton.toncenter import TonCenterError
from workers.backoff import Backoff, sleep_or_stop

__all__ = ["poll_until_stopped"]


async def poll_until_stopped(
    stop: asyncio.Event | None,
    step: Callable[[], Awaitable[bool]],
    *,
    poll_interval_s: float,
    backoff_max_s: float,
    log: logging.Logger,
    name: str,
) -> None:
    """Take ``step`` until ``stop`` is set: again at once while it says there is more to do,
    else after ``poll_interval_s``. When TON Center or the database fails, back off (up to
    ``backoff_max_s``) and take it again: every step is safe to repeat."""
    stop = stop or asyncio.Event()
    backoff = Backoff(poll_interval_s, backoff_max_s)
    while not stop.is_set():
        try:
            more = await step()
        except (TonCenterError, DBAPIError) as error:
            delay = backoff.failed()
            log.warning("%s: %s; retrying in %.1f s", name, error, delay)
            await sleep_or_stop(stop, delay)
            continue
        backoff.succeeded()
        if not more:
            await sleep_or_stop(stop, poll_interval_s)
