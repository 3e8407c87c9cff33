"""The worker registry on the real Redis: the pick prefers the least loaded worker, then the
conversation's sticky one, and skips dead and full ones; reservations, not reported loads, move
the pick; slot reservations stop racing dispatchers overfilling a worker; a heartbeat never
brings back an unregistered worker."""

import asyncio

from tests.support.node import fill, worker_info
from workers import registry


async def test_pick_worker_prefers_least_loaded_then_sticky_and_skips_dead_and_full(aredis):
    await registry.register(aredis, worker_info("busy"), ttl_s=10)
    await registry.register(aredis, worker_info("idle"), ttl_s=10)
    await registry.register(aredis, worker_info("full"), ttl_s=10)
    await registry.register(aredis, worker_info("dead", load=0), ttl_s=1)
    await registry.register(aredis, worker_info("other-model", model="x"), ttl_s=10)
    # Load is the backend's own count of the jobs it gave each worker (capacity 4).
    await fill(aredis, "busy", 3)
    await fill(aredis, "idle", 1)
    await fill(aredis, "full", 4)
    await asyncio.sleep(1.2)  # "dead" misses its heartbeat

    assert {w.worker_id for w in await registry.list_workers(aredis, "m")} == {
        "busy",
        "idle",
        "full",
    }
    assert (await registry.pick_worker(aredis, "m")).worker_id == "idle"
    assert await registry.get_worker(aredis, "dead") is None

    await registry.remember_route(aredis, "conv-1", "busy", ttl_s=60)
    picked = await registry.pick_worker(aredis, "m", conversation_id="conv-1")
    assert picked.worker_id == "busy"  # sticky: its prefix cache has the conversation
    # A sticky worker that is full, dead or excluded is passed over for the least loaded.
    await registry.remember_route(aredis, "conv-2", "full", ttl_s=60)
    assert (await registry.pick_worker(aredis, "m", conversation_id="conv-2")).worker_id == "idle"
    await registry.remember_route(aredis, "conv-3", "dead", ttl_s=60)
    assert (await registry.pick_worker(aredis, "m", conversation_id="conv-3")).worker_id == "idle"
    picked = await registry.pick_worker(aredis, "m", conversation_id="conv-1", exclude=["busy"])
    assert picked.worker_id == "idle"
    assert await registry.pick_worker(aredis, "m", exclude=["idle", "busy"]) is None
    assert await registry.pick_worker(aredis, "no-such-model") is None


async def test_reservations_move_the_pick_and_a_reported_load_does_not(aredis):
    await registry.register(aredis, worker_info("a", load=0), ttl_s=10)
    await registry.register(aredis, worker_info("b", load=0), ttl_s=10)
    await fill(aredis, "b", 2)
    assert (await registry.pick_worker(aredis, "m")).worker_id == "a"
    # What a node reports is shown, not trusted: reporting itself idle wins it nothing.
    assert await registry.heartbeat(aredis, "b", 0, 10) is True
    assert await registry.heartbeat(aredis, "a", 4, 10) is True
    assert (await registry.pick_worker(aredis, "m")).worker_id == "a"
    await fill(aredis, "a", 3)
    assert (await registry.pick_worker(aredis, "m")).worker_id == "b"


async def test_slot_reservations_stop_two_dispatchers_overfilling_a_worker(aredis):
    await registry.register(aredis, worker_info("only", capacity=3), ttl_s=10)
    # Ten dispatchers race for three slots; the reported load (0) is stale for all of them.
    picks = await asyncio.gather(
        *(registry.pick_worker(aredis, "m", job_id=f"job-{i}") for i in range(10))
    )
    assert sum(pick is not None for pick in picks) == 3
    info = await registry.get_worker(aredis, "only")
    assert info.reserved == 3 and not info.has_room

    await registry.release_slot(aredis, "only", "job-0")
    assert await registry.reserve_slot(aredis, "only", "job-new", ttl_s=60) is True
    assert await registry.reserve_slot(aredis, "only", "job-more", ttl_s=60) is False
    # Slots of jobs that never ran expire on their own.
    await registry.release_slot(aredis, "only", "job-new")
    assert await registry.reserve_slot(aredis, "only", "short", ttl_s=0.2) is True
    assert await registry.reserve_slot(aredis, "only", "job-more", ttl_s=60) is False
    await asyncio.sleep(0.3)
    assert await registry.reserve_slot(aredis, "only", "job-more", ttl_s=60) is True
    assert await registry.reserve_slot(aredis, "gone", "job-x", ttl_s=60) is False


def test_heartbeat_never_resurrects_an_unregistered_worker(sredis):
    registry.register(sredis, worker_info("w1"), ttl_s=10)
    assert registry.heartbeat(sredis, "w1", 2, 10) is True
    registry.unregister(sredis, "w1")
    assert registry.heartbeat(sredis, "w1", 2, 10) is False
    assert not sredis.exists(registry.worker_key("w1"))
