"""The bot's admission of updates (bot/admission.py): at most so many at once do their own work,
the rest wait in order; a dispatched turn gives its slot to the next update at once; a stop lets
the updates being handled finish, then cancels the rest (those still waiting too)."""

from __future__ import annotations

import asyncio
from typing import Any

from bot.admission import InFlight, turn_started


async def test_at_most_so_many_updates_work_at_once_and_the_rest_wait_in_order() -> None:
    gate = InFlight(at_once=2)
    release = asyncio.Event()
    working: list[int] = []
    started: list[int] = []

    async def handler(event: Any, _data: dict[str, Any]) -> int:
        started.append(event)
        working.append(event)
        await release.wait()
        working.remove(event)
        return int(event)

    tasks = [asyncio.create_task(gate(handler, n, {})) for n in range(5)]  # type: ignore[arg-type]
    for _ in range(20):  # the others stay queued however long the loop runs
        await asyncio.sleep(0)
    assert started == [0, 1]
    assert len(gate.tasks) == 5  # queued updates are in flight too: a stop sees them
    release.set()
    assert await asyncio.gather(*tasks) == [0, 1, 2, 3, 4]
    assert started == [0, 1, 2, 3, 4]
    assert gate.tasks == set()


async def test_a_dispatched_turn_gives_its_slot_to_the_next_update() -> None:
    gate = InFlight(at_once=1)
    streaming = asyncio.Event()
    second_ran = asyncio.Event()

    async def turn(_event: Any, _data: dict[str, Any]) -> None:
        turn_started()
        turn_started()  # twice is once
        await streaming.wait()  # the reply streams on after the slot is given back

    async def command(_event: Any, _data: dict[str, Any]) -> None:
        second_ran.set()

    first = asyncio.create_task(gate(turn, 1, {}))  # type: ignore[arg-type]
    second = asyncio.create_task(gate(command, 2, {}))  # type: ignore[arg-type]
    await asyncio.wait_for(second_ran.wait(), 30)
    assert not first.done()
    streaming.set()
    await asyncio.gather(first, second)
    # Released twice, the slot was freed once: there is still one, not two.
    hold, ran = asyncio.Event(), asyncio.Event()

    async def holding(_event: Any, _data: dict[str, Any]) -> None:
        await hold.wait()

    async def after(_event: Any, _data: dict[str, Any]) -> None:
        ran.set()

    third = asyncio.create_task(gate(holding, 3, {}))  # type: ignore[arg-type]
    fourth = asyncio.create_task(gate(after, 4, {}))  # type: ignore[arg-type]
    for _ in range(20):
        await asyncio.sleep(0)
    assert not ran.is_set()
    hold.set()
    await asyncio.gather(third, fourth)
    assert ran.is_set()


async def test_a_stop_cancels_the_updates_still_waiting_for_a_slot() -> None:
    gate = InFlight(at_once=1)
    hold = asyncio.Event()

    async def handler(_event: Any, _data: dict[str, Any]) -> None:
        await hold.wait()

    tasks = [asyncio.create_task(gate(handler, n, {})) for n in range(3)]  # type: ignore[arg-type]
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(gate.tasks) == 3
    await gate.finish(0)
    assert all(task.cancelled() for task in tasks)
    assert gate.tasks == set()
