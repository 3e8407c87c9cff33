"""Picking a worker and reserving its slot is one server-side step (issue 19): the conversation's
route read and each candidate tried, in one script, one round trip; and it chooses what the
step-by-step pick chose: the sticky worker when it has room, else the least loaded, never a
full, dead, excluded or unattested one, one slot reserved, never more."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis.asyncio

from tests.support.node import fill, worker_info
from workers import registry


def job(worker_id: str) -> str:
    return f"{worker_id}_{uuid.uuid4().hex}-1"


async def slots(aredis: redis.asyncio.Redis, worker_id: str) -> int:
    return int(await aredis.zcard(registry.slots_key(worker_id)))


class Counting:
    """The commands a client sends, counted."""

    def __init__(self, client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[str] = []
        real = redis.asyncio.Redis.execute_command

        async def execute_command(redis_client: Any, *args: Any, **options: Any) -> Any:
            if redis_client is client:
                self.sent.append(str(args[0]))
            return await real(redis_client, *args, **options)

        monkeypatch.setattr(redis.asyncio.Redis, "execute_command", execute_command)


async def test_the_pick_is_one_round_trip_and_chooses_as_before(
    aredis: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    for worker_id in ("busy", "idle", "full"):
        await registry.register(aredis, worker_info(worker_id), ttl_s=10)
    await registry.register(aredis, worker_info("dead"), ttl_s=1)
    await fill(aredis, "busy", 3)
    await fill(aredis, "idle", 1)
    await fill(aredis, "full", 4)
    await registry.remember_route(aredis, "conv-busy", "busy", ttl_s=60)
    await registry.remember_route(aredis, "conv-full", "full", ttl_s=60)
    await registry.remember_route(aredis, "conv-dead", "dead", ttl_s=60)
    await registry.remember_route(aredis, "conv-bad", "../../x", ttl_s=60)
    snapshot = registry.WorkerSnapshot(aredis, refresh_s=3600, default_capacity=4, limit=100)
    assert {w.worker_id for w in await snapshot.workers("m")} == {"busy", "idle", "full", "dead"}
    await asyncio.sleep(1.2)  # "dead" misses its heartbeat: its entry expires
    counting = Counting(aredis, monkeypatch)

    async def pick(**options: Any) -> str | None:
        counting.sent.clear()
        worker = await registry.pick_worker(aredis, "m", job_id=job, snapshot=snapshot, **options)
        # The route, the candidates, the slot: one step (none when no candidate has room).
        assert counting.sent in ([], ["EVAL"])
        return worker.worker_id if worker is not None else None

    assert await pick(conversation_id="conv-busy") == "busy"  # sticky: it has room
    assert await slots(aredis, "busy") == 4
    assert await pick(conversation_id="conv-full") == "idle"  # sticky but full
    assert await pick(conversation_id="conv-dead") == "idle"  # sticky but gone
    assert "dead" not in {w.worker_id for w in await snapshot.workers("m")}  # forgotten
    assert await pick(conversation_id="conv-bad") == "idle"  # a route naming no worker
    assert await slots(aredis, "idle") == 4
    assert await pick(exclude=["busy"]) is None  # every other one is full
    assert [await slots(aredis, w) for w in ("busy", "idle", "full")] == [4, 4, 4]


async def test_two_dispatchers_racing_never_overfill_a_worker(aredis: redis.asyncio.Redis) -> None:
    await registry.register(aredis, worker_info("only", capacity=3), ttl_s=10)
    picked = await asyncio.gather(
        *(registry.pick_worker(aredis, "m", job_id=job) for _ in range(20))
    )
    assert sum(worker is not None for worker in picked) == 3
    assert await slots(aredis, "only") == 3


async def test_unattested_workers_are_passed_over_when_only_attested_may_serve(
    aredis: redis.asyncio.Redis,
) -> None:
    await registry.register(aredis, worker_info("dev"), ttl_s=10)
    assert await registry.pick_worker(aredis, "m", job_id=job, attested_only=True) is None
    assert await slots(aredis, "dev") == 0
    assert (await registry.pick_worker(aredis, "m", job_id=job)) is not None


async def test_a_broken_slot_set_falls_back_to_one_by_one(aredis: redis.asyncio.Redis) -> None:
    """A slot key that is not a sorted set (a fault) fails the one-step script: the pick goes on
    worker by worker, passing over the broken one."""
    await registry.register(aredis, worker_info("broken"), ttl_s=10)
    await registry.register(aredis, worker_info("fine"), ttl_s=10)
    await fill(aredis, "fine", 1)  # "broken" looks idler and is tried first
    await aredis.set(registry.slots_key("broken"), "not a set")
    worker = await registry.pick_worker(aredis, "m", job_id=job)
    assert worker is not None and worker.worker_id == "fine"
    assert await slots(aredis, "fine") == 2
