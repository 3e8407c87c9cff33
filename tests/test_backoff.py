"""One backoff for every loop that retries (``workers.backoff``): the delays a run of failures
earns, their cap, the start over after a success, and a wait that a stop cuts short."""

from __future__ import annotations

import asyncio

from workers.backoff import Backoff, sleep_or_stop


def upper(low: float, high: float) -> float:
    """The jitter at the top of its range: the delay itself."""
    return high


def test_each_failure_doubles_the_delay_up_to_the_cap_and_a_success_starts_over() -> None:
    backoff = Backoff(3.0, 60.0, jitter=upper)
    assert [backoff.failed() for _ in range(6)] == [6.0, 12.0, 24.0, 48.0, 60.0, 60.0]
    backoff.succeeded()
    assert backoff.failed() == 6.0


def test_the_jitter_picks_in_the_upper_half_of_the_delay() -> None:
    seen: list[tuple[float, float]] = []

    def record(low: float, high: float) -> float:
        seen.append((low, high))
        return low

    backoff = Backoff(1.0, 10.0, jitter=record)
    assert backoff.failed() == 1.0
    assert seen == [(1.0, 2.0)]
    for _ in range(1000):  # the real jitter stays within that half
        delay = Backoff(1.0, 10.0).failed()
        assert 1.0 <= delay <= 2.0


def test_a_long_outage_never_overflows_and_stays_at_the_cap() -> None:
    backoff = Backoff(0.5, 3600.0, jitter=upper)
    delays = [backoff.failed() for _ in range(10_000)]
    assert max(delays) == 3600.0 and delays[-1] == 3600.0


async def test_a_stop_ends_the_wait() -> None:
    stop = asyncio.Event()
    waiting = asyncio.create_task(sleep_or_stop(stop, 3600))
    await asyncio.sleep(0)
    assert not waiting.done()
    stop.set()
    await asyncio.wait_for(waiting, 60)  # an upper bound on the event, not a speed test


async def test_without_a_stop_the_wait_ends_by_itself() -> None:
    await asyncio.wait_for(sleep_or_stop(asyncio.Event(), 0.01), 60)
