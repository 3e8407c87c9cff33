"""The stale-hold sweeper: gives back holds whose turn's process died before settling.

A turn holds its worst case in the ledger, then settles or releases the hold itself. If the
process running the turn is killed in between (a crash, an OOM kill, a deploy), nothing else
would ever close that hold and the user's funds would stay locked. :func:`run_sweeper` runs in
every ``cocoon web`` and ``cocoon up`` process: every ``interval_s`` it releases the holds
still open after ``settings.hold_timeout_s`` (:meth:`Ledger.release_stale_holds`, safe to run
from several processes at once: each hold is released once).

The timeout must be longer than any turn can live: the dispatcher's job timeout (600 s by
default) plus its queue TTL. A settlement that arrives after its hold was swept finds it
released and charges nothing: the user is never charged twice, at worst not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from sqlalchemy.exc import DBAPIError

from backend import appkeys
from backend.ledger import Ledger, LedgerError
from backend.settings import Settings

__all__ = ["DEFAULT_HOLD_TIMEOUT_S", "run_sweeper", "sweep_once", "sweeper_ctx"]

log = logging.getLogger("cocoon.sweeper")

DEFAULT_HOLD_TIMEOUT_S = 900


def hold_timeout_s(settings: Settings) -> float:
    return float(getattr(settings, "hold_timeout_s", DEFAULT_HOLD_TIMEOUT_S))


def default_interval_s(timeout_s: float) -> float:
    """Sweep a few times per timeout, at most once a minute."""
    return max(0.05, min(60.0, timeout_s / 4))


async def sweep_once(ledger: Ledger, timeout_s: float) -> list[str]:
    """Release the holds open for longer than ``timeout_s``; the keys released."""
    released = await ledger.release_stale_holds(dt.timedelta(seconds=timeout_s))
    if released:
        log.warning(
            "released %d stale holds (open for more than %.0f s): %s",
            len(released),
            timeout_s,
            ", ".join(released[:20]) + (" ..." if len(released) > 20 else ""),
        )
    return released


async def run_sweeper(
    ledger: Ledger,
    timeout_s: float,
    *,
    interval_s: float | None = None,
    stop: asyncio.Event | None = None,
    on_sweep: Callable[[list[str]], None] | None = None,
) -> None:
    """Sweep every ``interval_s`` (jittered) until ``stop`` is set or the task is cancelled.

    A database error is logged and the next sweep tries again: the loop never ends by itself.
    """
    stop = stop or asyncio.Event()
    interval = interval_s if interval_s is not None else default_interval_s(timeout_s)
    while not stop.is_set():
        try:
            released = await sweep_once(ledger, timeout_s)
        except (DBAPIError, LedgerError, OSError) as error:
            log.warning("stale-hold sweep failed (%s); trying again later", type(error).__name__)
        else:
            if on_sweep is not None:
                on_sweep(released)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), random.uniform(interval * 0.8, interval * 1.2))


def sweeper_ctx(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    """An aiohttp ``cleanup_ctx`` running the sweeper beside the web server (append it after
    the one that makes the ledger)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        timeout = hold_timeout_s(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(run_sweeper(app[appkeys.LEDGER], timeout, stop=stop))
        yield
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx
