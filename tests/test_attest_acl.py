"""A worker's Redis ACL user against the real Redis server: what it can and cannot touch.

These pin down the rules of :mod:`backend.attestation.acl` as the README documents them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis

from backend.attestation import acl
from backend.attestation.onboarding import worker_redis_url
from tests.support.attest import assert_no_permission
from workers import registry, streams
from workers.registry import queue_name

A = "w-aaaaaaaaaaaaaaaa"
B = "w-bbbbbbbbbbbbbbbb"


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    for worker_id in (A, B):
        await acl.delete_worker_user(client, worker_id)
    await client.aclose()


async def login(admin: aioredis.Redis, redis_url: str, worker_id: str) -> redis.Redis:
    user, password = await acl.create_worker_user(admin, worker_id)
    return redis.Redis.from_url(worker_redis_url(redis_url, user, password))


async def test_a_worker_touches_its_own_jobs_and_streams_only(
    admin: aioredis.Redis, redis_url: str
) -> None:
    a = await login(admin, redis_url, A)
    await login(admin, redis_url, B)
    qa, qb = f"rq:queue:{queue_name(A)}", f"rq:queue:{queue_name(B)}"
    await admin.rpush(qa, f"{A}_t1-1")
    await admin.rpush(qb, f"{B}_t2-1")
    await admin.hset(f"rq:job:{A}_t1-1", "data", "sealed")
    await admin.hset(f"rq:job:{B}_t2-1", "data", "sealed")
    await admin.set(streams.cancel_key(f"{A}_t1-1"), 1)
    try:
        # Its own: take its job, read it, record it, stream its reply, see its cancels.
        assert a.lmove(qa, f"{qa}:intermediate") == f"{A}_t1-1".encode()
        assert a.hget(f"rq:job:{A}_t1-1", "data") == b"sealed"
        a.hset(f"rq:job:{A}_t1-1", "status", "started")
        a.zadd(f"rq:wip:{queue_name(A)}", {f"{A}_t1-1": 1})
        a.xadd(streams.stream_key(f"{A}_t1-1"), {"d": b"sealed"})
        assert a.get(streams.cancel_key(f"{A}_t1-1")) == b"1"
        a.hset(registry.worker_key(A), "load", 1)

        # Another worker's: its queue, its jobs, its streams, its registry entry.
        assert_no_permission(
            lambda: a.lrange(qb, 0, -1),
            lambda: a.lmove(qb, f"{qa}:intermediate"),
            lambda: a.delete(f"rq:job:{B}_t2-1"),
            lambda: a.hgetall(f"rq:job:{B}_t2-1"),
            lambda: a.xadd(streams.stream_key(f"{B}_t2-1"), {"d": b"x"}),
            lambda: a.xrange(streams.stream_key(f"{B}_t2-1")),
            lambda: a.hset(registry.worker_key(B), "load", 0),
            lambda: a.delete(registry.slots_key(B)),
        )
        # Nor can it forge attestation, cancel jobs, write cancels, list keys or change ACLs.
        assert_no_permission(
            lambda: a.set(registry.attestation_key(A), "{}"),
            lambda: a.get(registry.attestation_key(A)),
            lambda: a.set(streams.cancel_key(f"{A}_t1-1"), 0),
            lambda: a.publish(streams.CANCEL_CHANNEL, f"{B}_t2-1"),
            lambda: a.keys("*"),
            lambda: a.scan(0),
            lambda: a.execute_command("ACL", "LIST"),
            lambda: a.client_list(),
            lambda: a.flushdb(),
            lambda: a.get("cocoon:reg-token:x"),
        )
        assert await admin.llen(qb) == 1 and await admin.exists(f"rq:job:{B}_t2-1")

        # No shared key at all: not the worker index, not slots (its own neither: they are the
        # backend's count of its load), not RQ's global worker set.
        await admin.zadd(registry.INDEX_KEY, {A: 1, B: 1})
        assert_no_permission(
            lambda: a.zadd(registry.INDEX_KEY, {"w-cccccccccccccccc": 1}),
            lambda: a.zrem(registry.INDEX_KEY, B),
            lambda: a.zrange(registry.INDEX_KEY, 0, -1),
            lambda: a.delete(registry.INDEX_KEY),
            lambda: a.zadd(registry.slots_key(A), {"x": 1}),
            lambda: a.zrem(registry.slots_key(A), "x"),
            lambda: a.sadd("rq:workers", f"rq:worker:{B}"),
            lambda: a.srem("rq:workers", f"rq:worker:{B}"),
            lambda: a.set("rq:suspended", 1),
        )
        assert await admin.zrange(registry.INDEX_KEY, 0, -1) == [A.encode(), B.encode()]
        assert a.get("rq:suspended") is None  # read-only
    finally:
        a.close()


async def test_a_worker_runs_no_script_and_stays_in_its_database(
    admin: aioredis.Redis, redis_url: str
) -> None:
    a = await login(admin, redis_url, A)
    db = acl._db(admin)
    other = 1 if db != 1 else 2
    script = "while true do end"  # what froze the server for everyone: BUSY
    try:
        assert_no_permission(
            lambda: a.eval(script, 0),
            lambda: a.eval("return 1", 0),
            lambda: a.evalsha("a" * 40, 0),
            lambda: a.script_load("return 1"),
            lambda: a.execute_command("SCRIPT", "KILL"),
            lambda: a.execute_command("FUNCTION", "LIST"),
            lambda: a.execute_command("FCALL", "f", 0),
            lambda: a.execute_command("SELECT", other),
            lambda: a.execute_command("SELECT", 0 if db else 3),
            lambda: a.execute_command("SWAPDB", db, other),
            lambda: a.execute_command("MOVE", registry.worker_key(A), other),
        )
        assert a.execute_command("SELECT", db)  # its own database, as its URL says
        assert a.ping()
    finally:
        a.close()


async def test_deleting_the_user_cuts_its_connections(
    admin: aioredis.Redis, redis_url: str
) -> None:
    a = await login(admin, redis_url, A)
    assert a.hset(registry.worker_key(A), "load", 0) == 1
    assert A in await acl.worker_users(admin)
    assert await acl.delete_worker_user(admin, A)
    with pytest.raises(redis.ConnectionError):
        a.hset(registry.worker_key(A), "load", 1)
        a.hset(registry.worker_key(A), "load", 2)  # after a reconnect: the user is gone
    a.close()
    assert A not in await acl.worker_users(admin)


async def test_a_user_recreated_from_its_digest_takes_the_same_password(
    admin: aioredis.Redis, redis_url: str
) -> None:
    user, password = await acl.create_worker_user(admin, A)
    digest = await acl.user_digest(admin, A)
    assert digest == acl.password_digest(password) and password not in digest
    await acl.delete_worker_user(admin, A)  # what a Redis restart does to ACL users
    assert await acl.user_digest(admin, A) is None
    await acl.restore_worker_user(admin, A, digest)
    a = redis.Redis.from_url(worker_redis_url(redis_url, user, password))
    try:
        assert a.hset(registry.worker_key(A), "load", 0) == 1
    finally:
        a.close()


def test_only_attested_ids_get_an_acl() -> None:
    for bogus in ("t-*", "w-aaaaaaaaaaaaaaaa_x", "w-aaaaaaaaaaaaaaaa\n", "w-AAAAAAAAAAAAAAAA"):
        with pytest.raises(ValueError):
            acl.key_patterns(bogus)
    with pytest.raises(ValueError):
        acl.acl_rules(A, "not a digest")
