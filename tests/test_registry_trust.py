"""Only the backend writes shared routing state (issue 12, item 3), on the real Redis with real
worker ACL users: the index is the backend's, capacity is the attestation record's, load is the
backend's own slot count, ids are checked, and reading the index is bounded and off a turn's
path. Each attack is tried as a worker would, with its own credentials."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError
from rq import Worker
from rq.serializers import JSONSerializer

from backend.attestation import acl, store
from backend.attestation.onboarding import Onboarding
from backend.attestation.policy import Policy
from backend.settings import Settings
from tests.support.attest import (
    MODEL,
    assert_no_permission,
    plain_service,
    register_plain,
    with_attestation,
    worker_info,
)
from workers import registry
from workers.job_book import BookWriter, JobBook
from workers.jobs import aenqueue_job, job_id_for
from workers.registry import WorkerInfo
from workers.registry import snapshot as snapshot_module
from workers.wire import WorkerKeys


def onboarding(
    settings: Settings, admin: aioredis.Redis, *, policy: Policy | None = None, **values: object
) -> Onboarding:
    return plain_service(with_attestation(settings, allow_dev=True, **values), admin, policy=policy)


class Onboarded:
    """A worker onboarded through the real service (dev evidence), holding its own Redis user."""

    def __init__(self, worker_id: str, keys: WorkerKeys, client: redis.Redis) -> None:
        self.worker_id = worker_id
        self.keys = keys
        self.redis = client

    def info(self, **update: object) -> WorkerInfo:
        return worker_info(self.worker_id, self.keys, **update)

    def register(self, **update: object) -> None:
        registry.register(self.redis, self.info(**update), ttl_s=30, shared=False)


class Onboarder:
    """Onboards workers (through ``service``, by default one with dev mode on) and closes their
    Redis connections when the test is over."""

    def __init__(self, service: Onboarding) -> None:
        self.service = service
        self.onboarded: list[Onboarded] = []

    async def __call__(self, service: Onboarding | None = None) -> Onboarded:
        service = service or self.service
        token = await store.issue_registration_token(service.redis, None, 60)
        keys = WorkerKeys.generate()
        reply, credentials = await register_plain(service, token, keys)
        worker = Onboarded(reply["worker_id"], keys, redis.Redis.from_url(credentials["redis_url"]))
        self.onboarded.append(worker)
        return worker


@pytest.fixture
async def onboard(settings: Settings, admin: aioredis.Redis) -> AsyncIterator[Onboarder]:
    onboarder = Onboarder(onboarding(settings, admin))
    yield onboarder
    for worker in onboarder.onboarded:
        worker.redis.close()


async def index(admin: aioredis.Redis) -> list[str]:
    return [m.decode() for m in await admin.zrange(registry.INDEX_KEY, 0, -1)]


# -- the index is the backend's ------------------------------------------------------------------


async def test_acceptance_indexes_a_worker_and_revocation_takes_it_out(
    settings: Settings, admin: aioredis.Redis, onboard: Onboarder
) -> None:
    service = onboarding(settings, admin, default_capacity=5)
    worker = await onboard(service)
    # Indexed at acceptance, before its node wrote anything.
    assert await index(admin) == [worker.worker_id]
    record = await registry.read_attestation(admin, worker.worker_id)
    assert record is not None and record.capacity == 5
    worker.register()
    assert [w.worker_id for w in await registry.list_workers(admin)] == [worker.worker_id]

    await service.revoke(worker.worker_id)
    assert await index(admin) == []
    assert worker.worker_id not in await acl.worker_users(admin)
    assert await store.acl_digests(admin, [worker.worker_id]) == {}


async def test_an_expired_worker_leaves_the_index(
    admin: aioredis.Redis, onboard: Onboarder
) -> None:
    worker = await onboard()
    worker.register()
    # Expiry: Redis drops the record (it was written with the evidence's expiry), and the
    # node, cut off by the sweep, stops beating.
    await admin.delete(registry.attestation_key(worker.worker_id))
    assert [w.attested for w in await registry.list_workers(admin)] == [False]
    await admin.delete(registry.worker_key(worker.worker_id))
    assert await registry.list_workers(admin) == []
    assert await index(admin) == []


async def test_one_worker_cannot_take_the_others_out_of_dispatch(
    admin: aioredis.Redis, onboard: Onboarder
) -> None:
    """Before: a worker ZREMed every other id and 10 of 10 requests got no worker."""
    honest, rogue = await onboard(), await onboard()
    honest.register()
    rogue.register()
    assert_no_permission(
        lambda: rogue.redis.zrem(registry.INDEX_KEY, honest.worker_id),
        lambda: rogue.redis.delete(registry.INDEX_KEY),
        lambda: registry.unregister(rogue.redis, honest.worker_id),
        lambda: rogue.redis.delete(registry.worker_key(honest.worker_id)),
        lambda: rogue.redis.zadd(registry.INDEX_KEY, {"w-0000000000000000": 1}),
        lambda: rogue.redis.zadd(registry.slots_key(honest.worker_id), {"x": 2e9}),
    )
    picks = [
        await registry.pick_worker(
            admin, MODEL, attested_only=True, exclude=[rogue.worker_id], job_id=f"j{n}"
        )
        for n in range(10)
    ]
    assert [p.worker_id if p else None for p in picks[:4]] == [honest.worker_id] * 4
    # Its 4 slots are the backend's count: the fifth request finds it full, not gone.
    assert picks[4:] == [None] * 6
    assert sorted(await index(admin)) == sorted([honest.worker_id, rogue.worker_id])


async def test_an_advertised_capacity_is_capped_by_the_attestation_record(
    settings: Settings, admin: aioredis.Redis, onboard: Onboarder
) -> None:
    """Before: a worker claiming capacity 10^9 took all traffic."""
    service = onboarding(settings, admin, policy=Policy(max_capacity=3))
    honest, greedy = await onboard(service), await onboard(service)
    honest.register(capacity=3)
    greedy.register(capacity=1_000_000_000, load=0)
    listed = {w.worker_id: w for w in await registry.list_workers(admin)}
    assert listed[greedy.worker_id].capacity == 3
    picks = [
        await registry.pick_worker(admin, MODEL, attested_only=True, job_id=f"j{n}")
        for n in range(8)
    ]
    chosen = [p.worker_id for p in picks if p is not None]
    assert chosen.count(greedy.worker_id) == 3 and chosen.count(honest.worker_id) == 3
    assert picks[6:] == [None, None]
    # Reporting itself idle frees no slot: load is the backend's own count.
    assert registry.heartbeat(greedy.redis, greedy.worker_id, 0, 30) is True
    assert not await registry.reserve_slot(admin, greedy.worker_id, "more", ttl_s=60)


async def test_a_workers_bogus_entry_spoils_no_read_of_the_others(
    admin: aioredis.Redis, onboard: Onboarder
) -> None:
    honest, rogue = await onboard(), await onboard()
    key = registry.worker_key(rogue.worker_id)
    honest.register()
    rogue.register()
    reads = []
    # Its own entry is all it can write: unparseable numbers, a huge entry, another type,
    # and an entry that names another worker.
    rogue.redis.hset(key, mapping={"load": "nan", "last_heartbeat": "inf"})
    reads.append(await registry.list_workers(admin))
    rogue.redis.hset(key, "load", "9" * 5000)
    reads.append(await registry.list_workers(admin))
    rogue.redis.hset(key, "info", "{" * 1_000_000)
    reads.append(await registry.list_workers(admin))
    rogue.redis.delete(key)
    rogue.redis.rpush(key, "not a hash")
    reads.append(await registry.list_workers(admin))
    rogue.redis.delete(key)
    rogue.register()
    rogue.redis.hset(key, "info", rogue.info(worker_id=honest.worker_id).model_dump_json())
    reads.append(await registry.list_workers(admin))
    assert {w.worker_id for w in reads[0]} == {honest.worker_id, rogue.worker_id}
    for listed in reads[1:4]:
        assert [w.worker_id for w in listed] == [honest.worker_id]
    # Listed under its own key's id, whatever its entry says.
    assert sorted(w.worker_id for w in reads[4]) == sorted([honest.worker_id, rogue.worker_id])
    assert {w.box_public_key for w in reads[4] if w.worker_id == honest.worker_id} == {
        honest.keys.box_public_b64
    }
    # Reserving on a key of the wrong type skips that worker only.
    rogue.redis.delete(key)
    rogue.redis.rpush(key, "x")
    picked = await registry.pick_worker(admin, MODEL, attested_only=True, job_id="j")
    assert picked is not None and picked.worker_id == honest.worker_id


async def test_the_node_writes_its_own_entry_in_one_transaction_without_scripts(
    admin: aioredis.Redis, onboard: Onboarder
) -> None:
    worker = await onboard()
    worker.register()
    assert registry.heartbeat(worker.redis, worker.worker_id, 2, 30) is True
    registry.unregister(worker.redis, worker.worker_id, shared=False)
    assert registry.heartbeat(worker.redis, worker.worker_id, 2, 30) is False
    assert not await admin.exists(registry.worker_key(worker.worker_id))  # not resurrected
    assert await index(admin) == [worker.worker_id]  # the index is the backend's


# -- worker ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["", "a b", "x" * 65, "w-*", "cocoon:workers", "a\n", "é", b"\xff", b"y" * 65, 7, None],
)
def test_a_worker_id_is_a_short_plain_name(value: object) -> None:
    assert registry.valid_worker_id(value) is None


def test_a_worker_id_from_redis_is_read_as_text() -> None:
    assert registry.valid_worker_id(b"w-0123456789abcdef") == "w-0123456789abcdef"
    assert registry.valid_worker_id("dev.worker_1-a") == "dev.worker_1-a"


async def test_bogus_index_entries_are_skipped_dropped_and_read_in_bounded_steps(
    admin: aioredis.Redis, onboard: Onboarder
) -> None:
    worker = await onboard()
    worker.register()
    await admin.zadd(registry.INDEX_KEY, {f"bogus-{n}": 0 for n in range(2_000)})
    await admin.zadd(registry.INDEX_KEY, {b"\xff\xfe": 0, "a b": 0, "x" * 200: 0, "w-*": 0})
    sizes = []
    for _ in range(5):
        listed = await registry.list_workers(admin, limit=500)
        # The newest entries first: the worker accepted last is seen behind all of them.
        assert [w.worker_id for w in listed] == [worker.worker_id]
        sizes.append(await admin.zcard(registry.INDEX_KEY))
    # Each read looks at 500 entries at most and drops those that name no worker.
    assert sizes == [1_506, 1_007, 508, 9, 1]
    assert await index(admin) == [worker.worker_id]
    # A route (read from Redis) that names no worker is ignored.
    await admin.set(registry.route_key("conv"), "../../x")
    picked = await registry.pick_worker(admin, MODEL, conversation_id="conv")
    assert picked is not None and picked.worker_id == worker.worker_id
    assert await registry.get_worker(admin, "a b") is None
    assert await registry.read_attestation(admin, "*") is None


class CommandLog(aioredis.Redis):
    """The real client, noting the name of every command it sends on its own (not pipelined)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sent: list[str] = []

    async def execute_command(self, *args: object, **options: object) -> object:
        self.sent.append(str(args[0]).upper())
        return await super().execute_command(*args, **options)


async def test_a_turn_reads_no_index_however_many_entries_it_has(
    admin: aioredis.Redis, redis_url: str, onboard: Onboarder
) -> None:
    """Before: 300,000 bogus ids froze the web server (/healthz 27 s): every turn read them."""
    worker = await onboard()
    client = CommandLog.from_url(redis_url)
    snapshot = registry.WorkerSnapshot(client, refresh_s=3600)
    try:
        worker.register()
        await snapshot.refresh()
        pipe = admin.pipeline(transaction=False)
        for start in range(0, 50_000, 10_000):
            pipe.zadd(registry.INDEX_KEY, {f"bogus-{n}": 0 for n in range(start, start + 10_000)})
        await pipe.execute()
        client.sent.clear()
        for n in range(3):
            picked = await registry.pick_worker(
                client, MODEL, attested_only=True, job_id=f"j{n}", snapshot=snapshot
            )
            assert picked is not None and picked.worker_id == worker.worker_id
        assert client.sent == ["EVAL"] * 3  # one slot reservation each, no index read
        assert await admin.zcard(registry.INDEX_KEY) == 50_001  # nothing was read
    finally:
        await snapshot.close()
        await client.aclose()


async def test_the_snapshot_refreshes_in_the_background_and_keeps_its_copy_when_redis_fails(
    admin: aioredis.Redis, onboard: Onboarder
) -> None:
    first = await onboard()
    now = [0.0]
    snapshot = registry.WorkerSnapshot(admin, refresh_s=5, clock=lambda: now[0])
    try:
        first.register()
        assert [w.worker_id for w in await snapshot.workers(MODEL)] == [first.worker_id]
        second = await onboard()
        second.register()
        assert len(await snapshot.workers(MODEL)) == 1  # a copy: not read again yet
        now[0] = 6.0  # older than refresh_s: a read starts in the background
        assert len(await snapshot.workers(MODEL)) == 1
        for _ in range(100):
            if len(await snapshot.workers(MODEL)) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(await snapshot.workers(MODEL)) == 2
    finally:
        await snapshot.close()


async def test_a_worker_that_came_during_a_slow_read_is_picked_at_once(
    admin: aioredis.Redis, onboard: Onboarder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a copy's age counted from the end of its read, so a worker that registered while
    a slow read was under way (a loaded machine) was missing from a copy that looked fresh, and
    the turn right after its registration answered 503 no_worker."""
    late = await onboard()
    now = [0.0]
    snapshot = registry.WorkerSnapshot(admin, refresh_s=1, clock=lambda: now[0])
    read = snapshot_module.list_workers

    async def slow_read(*args: Any, **kwargs: Any) -> list[WorkerInfo]:
        workers = await read(*args, **kwargs)
        late.register()  # the worker comes after the registry was read...
        now[0] += 0.5  # ...and the read ends half a second after it began
        return workers

    monkeypatch.setattr(snapshot_module, "list_workers", slow_read)
    try:
        assert late.worker_id not in [w.worker_id for w in await snapshot.workers(MODEL)]
        assert snapshot.age_s == 0.5
        monkeypatch.setattr(snapshot_module, "list_workers", read)
        picked = await registry.pick_worker(admin, MODEL, job_id="turn-1", snapshot=snapshot)
        assert picked is not None and picked.worker_id == late.worker_id
    finally:
        await snapshot.close()


async def test_a_slot_freed_here_is_free_in_the_snapshot_at_once(admin: aioredis.Redis) -> None:
    """Before: a worker that runs one job at a time looked full in the dispatcher's copy
    until its next read (a second), so the turn right after another answered 503 no_worker."""
    worker = worker_info("one-at-a-time", WorkerKeys.generate(), capacity=1)
    await registry.register(admin, worker, ttl_s=60)
    now = [0.0]  # the copy is never old enough to be read again
    snapshot = registry.WorkerSnapshot(admin, refresh_s=3600, clock=lambda: now[0])
    try:
        first = await registry.pick_worker(admin, MODEL, job_id="turn-1", snapshot=snapshot)
        assert first is not None
        assert await registry.pick_worker(admin, MODEL, job_id="turn-2", snapshot=snapshot) is None
        await registry.release_slot(admin, worker.worker_id, "turn-1")
        snapshot.released(worker.worker_id)
        again = await registry.pick_worker(admin, MODEL, job_id="turn-2", snapshot=snapshot)
        assert again is not None and again.worker_id == worker.worker_id
        snapshot.released("never-seen")  # nothing to count: no error
    finally:
        await snapshot.close()
        await registry.unregister(admin, worker.worker_id)


# -- RQ's bookkeeping ----------------------------------------------------------------------------


async def test_the_rq_bookkeeping_needs_no_shared_key(
    admin: aioredis.Redis, onboard: Onboarder
) -> None:
    """RQ lists a worker in the shared set ``rq:workers``; the node's RQ worker lists itself in
    its queue's set only (workers/rq_compat.py, NodeRQWorker). If an RQ release writes the shared
    set again, the worker's ACL user refuses it here, with NOPERM."""
    worker = await onboard()
    # The node's asyncio client, with the worker's own credentials (the node's path).
    known = worker.redis.connection_pool.connection_kwargs
    client = aioredis.Redis(**{k: known[k] for k in ("host", "port", "db", "username", "password")})
    book = JobBook(worker.redis, worker.worker_id, BookWriter(client))
    ok_id = job_id_for(worker.worker_id, "t1", 1)
    bad_id = job_id_for(worker.worker_id, "t2", 1)
    for job_id in (ok_id, bad_id):
        await aenqueue_job(admin, worker.worker_id, job_id, b"sealed", timeout_s=60, ttl_s=60)
    book.register_birth()
    first, second = await book.take(2, None)
    assert (first.id, second.id) == (ok_id, bad_id)
    execution = await book.astart(first)
    await book.aheartbeat([(first, execution)], True)
    await book.afinish(first, execution, {"finish_reason": "stop"})
    await book.afail(second, await book.astart(second), "engine failed")
    await client.aclose()
    queue_workers = Worker.all(queue=book.queue, serializer=JSONSerializer)
    assert [w.name for w in queue_workers] == [worker.worker_id]
    book.register_death()
    assert not await admin.exists("rq:workers")
    with pytest.raises(NoPermissionError):
        worker.redis.sadd("rq:workers", "rq:worker:x")


async def test_a_kept_digest_is_the_passwords_sha256_and_goes_with_the_record(
    settings: Settings, admin: aioredis.Redis, onboard: Onboarder
) -> None:
    worker = await onboard(onboarding(settings, admin, lifetime_s=600))
    digest = (await store.acl_digests(admin, [worker.worker_id]))[worker.worker_id]
    password = worker.redis.connection_pool.connection_kwargs["password"]
    assert digest == acl.password_digest(password) != password
    ttl = await admin.ttl(f"cocoon:worker-acl:{worker.worker_id}")
    record_ttl = await admin.ttl(registry.attestation_key(worker.worker_id))
    assert 0 < ttl and abs(ttl - record_ttl) <= 1
