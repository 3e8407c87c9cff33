"""Waiting between tries: one exponential backoff with jitter, and a sleep that a stop ends.

Loops that retry a step until it works (the TON deposit watcher, the payout sender) count their
failures in a :class:`Backoff` and wait :func:`sleep_or_stop`. Standard library only, so the
worker node may use it as well as the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable

__all__ = ["MAX_DOUBLINGS", "Backoff", "sleep_or_stop"]

MAX_DOUBLINGS = 16
"""The delay doubles at most this many times (then ``max_s`` holds it anyway)."""


class Backoff:
    """Failures in a row, and the delay each one earns: ``base_s`` doubled per failure (the
    first one already waits twice ``base_s``), at most ``max_s``, then a random point of its
    upper half, so that processes failing together do not retry together. A success starts
    over."""

    def __init__(
        self,
        base_s: float,
        max_s: float,
        *,
        jitter: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self.jitter = jitter
        self.failures = 0

    def failed(self) -> float:
        """Count one more failure; the seconds to wait before the next try."""
        self.failures += 1
        delay = min(self.max_s, self.base_s * 2 ** min(self.failures, MAX_DOUBLINGS))
        return self.jitter(delay / 2, delay)

    def succeeded(self) -> None:
        self.failures = 0


async def sleep_or_stop(stop: asyncio.Event, delay_s: float) -> None:
    """Wait ``delay_s`` seconds, or less when ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=delay_s)
