"""The asyncio enqueue writes what RQ's own enqueue writes, in one round trip."""

from __future__ import annotations

import base64

import redis
import redis.asyncio as aioredis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from workers.jobs import aenqueue_job, enqueue_job
from workers.registry import queue_name


async def test_async_enqueue_matches_rq(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    client = aioredis.Redis.from_url(redis_url)
    enqueue_job(sync, "w1", "job-sync", b"sealed-1", timeout_s=60, ttl_s=30)
    assert await aenqueue_job(client, "w1", "job-async", b"sealed-2", timeout_s=60, ttl_s=30)

    queue = Queue(queue_name("w1"), connection=sync, serializer=JSONSerializer)
    assert queue.job_ids == ["job-sync", "job-async"]
    ours = Job.fetch("job-async", connection=sync, serializer=JSONSerializer)
    theirs = Job.fetch("job-sync", connection=sync, serializer=JSONSerializer)
    assert ours.get_status() == JobStatus.QUEUED
    assert ours.origin == theirs.origin == queue.name
    assert ours.timeout == 60 and ours.func_name == theirs.func_name
    assert base64.b64decode(ours.args[0]) == b"sealed-2"
    assert set(sync.hkeys("rq:job:job-async")) == set(sync.hkeys("rq:job:job-sync"))
    assert 0 < sync.ttl("rq:job:job-async") <= 30
    assert queue.key.encode() in sync.smembers("rq:queues")
    await client.aclose()
    sync.close()
