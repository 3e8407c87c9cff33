"""The RQ side of a job: the asyncio enqueue writes what RQ's own enqueue writes, in one round
trip, and the node books the jobs it runs as a stock RQ worker would."""

from __future__ import annotations

import asyncio
import base64

import pytest
import redis
import redis.asyncio as aioredis
import rq
from rq import Queue, SimpleWorker, Worker
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from workers.job_book import BookWriter, JobBook
from workers.jobs import (
    FAILURE_TTL_S,
    RESULT_TTL_S,
    aenqueue_job,
    enqueue_job,
    outer_max_tokens,
)
from workers.registry import queue_name


async def test_async_enqueue_matches_rq(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    client = aioredis.Redis.from_url(redis_url)
    enqueue_job(sync, "w1", "job-sync", b"sealed-1", timeout_s=60, ttl_s=30, max_tokens=7)
    assert await aenqueue_job(
        client, "w1", "job-async", b"sealed-2", timeout_s=60, ttl_s=30, max_tokens=7
    )

    queue = Queue(queue_name("w1"), connection=sync, serializer=JSONSerializer)
    assert queue.job_ids == ["job-sync", "job-async"]
    ours = Job.fetch("job-async", connection=sync, serializer=JSONSerializer)
    theirs = Job.fetch("job-sync", connection=sync, serializer=JSONSerializer)
    assert ours.get_status() == JobStatus.QUEUED
    assert ours.origin == theirs.origin == queue.name
    assert ours.timeout == 60 and ours.func_name == theirs.func_name
    assert base64.b64decode(ours.args[0]) == b"sealed-2"
    assert outer_max_tokens(ours) == outer_max_tokens(theirs) == 7  # the backend's bound
    assert set(sync.hkeys("rq:job:job-async")) == set(sync.hkeys("rq:job:job-sync"))
    assert 0 < sync.ttl("rq:job:job-async") <= 30
    assert queue.key.encode() in sync.smembers("rq:queues")
    await client.aclose()
    sync.close()


def test_a_jobs_bound_is_a_positive_integer_or_the_job_is_refused(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    job = enqueue_job(sync, "w1", "job-bound", b"sealed", timeout_s=60, ttl_s=30)
    assert outer_max_tokens(job) is None  # an older enqueuer: the sealed request's own bound
    for bad in ("7", 0, -1, True, 1.5, 10**7, [7]):
        job.meta = {"max_tokens": bad}
        with pytest.raises(ValueError, match="max_tokens"):
            outer_max_tokens(job)
    with pytest.raises(ValueError, match="max_tokens"):
        enqueue_job(sync, "w1", "job-zero", b"sealed", timeout_s=60, ttl_s=30, max_tokens=0)
    sync.close()


# -- the node's bookkeeping, against a stock RQ worker's -------------------------------------------


def stock_run(sync: redis.Redis) -> tuple[Job, Job]:
    """A stock SimpleWorker runs one job that succeeds and one that fails, as RQ books them."""
    queue = Queue("stock", connection=sync, serializer=JSONSerializer)
    options = {"result_ttl": RESULT_TTL_S, "failure_ttl": FAILURE_TTL_S, "timeout": 60, "ttl": 60}
    ok = queue.enqueue_call("builtins.dict", kwargs=RESULT, job_id="stock-ok", **options)
    bad = queue.enqueue_call("builtins.int", args=("x",), job_id="stock-bad", **options)
    SimpleWorker([queue], connection=sync, serializer=JSONSerializer, name="stock").work(burst=True)
    return ok, bad


async def node_run(sync: redis.Redis, client: aioredis.Redis) -> tuple[Job, Job, JobBook]:
    """The node's JobBook books one job finished, one failed (its engine's words), as the node
    does: both taken at once, each transition through the writer (one MULTI/EXEC for those
    that come together)."""
    for job_id in ("node-ok", "node-bad"):
        enqueue_job(sync, "w1", job_id, b"sealed", timeout_s=60, ttl_s=60)
    book = JobBook(sync, "w1", BookWriter(client))
    book.register_birth()
    ok, bad = await book.take(8, None)
    assert (ok.id, bad.id) == ("node-ok", "node-bad")
    assert await book.take(8, None) == []
    ok_execution, bad_execution = await asyncio.gather(book.astart(ok), book.astart(bad))
    await asyncio.gather(
        book.afinish(ok, ok_execution, RESULT), book.afail(bad, bad_execution, "engine failed")
    )
    return ok, bad, book


RESULT = {"finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 3}


async def test_the_node_books_a_job_as_a_stock_rq_worker_does(redis_url: str) -> None:
    """What RQ's readers see of a job the node finished or failed (status, registries, result,
    the job's stored fields, the worker's counts) is what a stock RQ worker leaves. An RQ
    release that books jobs differently fails here, naming its version."""
    sync = redis.Redis.from_url(redis_url)
    client = aioredis.Redis.from_url(redis_url)
    stock_ok, stock_bad = stock_run(sync)
    node_ok, node_bad, book = await node_run(sync, client)
    version = f"rq {rq.__version__} books jobs differently than workers/jobs.py (JobBook)"

    def seen(job: Job) -> dict[str, object]:
        fresh = Job.fetch(job.id, connection=sync, serializer=JSONSerializer)
        queue = Queue(fresh.origin, connection=sync, serializer=JSONSerializer)
        latest = fresh.latest_result()
        return {
            "status": fresh.get_status(),
            "fields": set(sync.hkeys(fresh.key)) - {b"data"},
            "finished": fresh.id in queue.finished_job_registry.get_job_ids(),
            "failed": fresh.id in queue.failed_job_registry.get_job_ids(),
            "started": queue.started_job_registry.get_job_ids(),
            "queued": queue.job_ids,
            "result": latest.type if latest else None,
            "results": len(fresh.results()),
        }

    assert seen(node_ok) == seen(stock_ok), version
    assert seen(node_bad) == seen(stock_bad), version
    for node_job, stock_job in ((node_ok, stock_ok), (node_bad, stock_bad)):
        assert abs(sync.ttl(node_job.key) - sync.ttl(stock_job.key)) <= 2, version
    ok = Job.fetch("node-ok", connection=sync, serializer=JSONSerializer)
    assert ok.return_value() == RESULT and ok.worker_name == "w1"
    bad = Job.fetch("node-bad", connection=sync, serializer=JSONSerializer)
    latest = bad.latest_result()
    assert latest is not None and latest.exc_string == "engine failed"
    node = Worker.find_by_key(book.rq_worker.key, connection=sync, serializer=JSONSerializer)
    stock = Worker.find_by_key(
        Worker.redis_worker_namespace_prefix + "stock", connection=sync, serializer=JSONSerializer
    )
    assert node is not None
    assert (node.successful_job_count, node.failed_job_count) == (1, 1), version
    if stock is not None:  # a burst worker is gone once done; its counts went with it
        assert (stock.successful_job_count, stock.failed_job_count) == (1, 1)
    book.register_death()
    await client.aclose()
    sync.close()


def test_a_job_never_started_is_failed_off_the_intermediate_queue(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    enqueue_job(sync, "w1", "node-late", b"sealed", timeout_s=60, ttl_s=60)
    book = JobBook(sync, "w1")
    job = book.dequeue(None)
    assert job is not None
    book.fail(job, None, "worker_shutdown: never started")
    fresh = Job.fetch("node-late", connection=sync, serializer=JSONSerializer)
    assert fresh.get_status() == JobStatus.FAILED
    assert sync.llen(book.queue.intermediate_queue_key) == 0
    assert "node-late" in book.queue.failed_job_registry.get_job_ids()
    latest = fresh.latest_result()
    assert latest is not None and latest.exc_string == "worker_shutdown: never started"
    sync.close()


async def test_a_job_whose_ttl_passed_is_skipped_and_heartbeats_keep_a_job_alive(
    redis_url: str,
) -> None:
    sync = redis.Redis.from_url(redis_url)
    client = aioredis.Redis.from_url(redis_url)
    for job_id in ("node-gone", "node-kept"):
        enqueue_job(sync, "w1", job_id, b"sealed", timeout_s=60, ttl_s=60)
    sync.delete(Job.key_for("node-gone"))  # as its TTL does
    book = JobBook(sync, "w1", BookWriter(client))
    book.register_birth()
    (kept,) = await book.take(8, 1)
    assert kept.id == "node-kept"
    assert sync.llen(book.queue.intermediate_queue_key) == 1  # the kept one only
    execution = await book.astart(kept)
    sync.hset(Job.key_for("node-kept"), "last_heartbeat", "2000-01-01T00:00:00.000000Z")
    await book.aheartbeat([(kept, execution)], True)
    fresh = Job.fetch("node-kept", connection=sync, serializer=JSONSerializer)
    assert fresh.get_status() == JobStatus.STARTED
    assert fresh.last_heartbeat is not None and fresh.last_heartbeat.year > 2000
    assert "node-kept" in book.queue.started_job_registry.get_job_ids()
    assert await book.take(8, None) == []
    await book.afinish(kept, execution, RESULT)
    assert book.queue.started_job_registry.get_job_ids() == []
    book.register_death()
    await client.aclose()
    sync.close()


async def test_the_writer_sends_what_came_meanwhile_in_one_round_trip(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    pipelines = []
    real_pipeline = client.pipeline

    def counted(transaction: bool = True) -> object:
        pipe = real_pipeline(transaction=transaction)
        pipelines.append(transaction)
        return pipe

    client.pipeline = counted  # type: ignore[method-assign]
    writer = BookWriter(client)
    await asyncio.gather(*(writer.send([("set", (f"book-{i}", i), {})]) for i in range(5)))
    assert pipelines == [True]  # one MULTI/EXEC for the five
    assert await client.mget([f"book-{i}" for i in range(5)]) == [b"0", b"1", b"2", b"3", b"4"]
    with pytest.raises(redis.ResponseError):  # a failed round trip fails its sends
        await writer.send([("lpush", ("book-0", "x"), {})])
    await writer.send([("set", ("book-9", 9), {})])  # and not the next ones
    assert await client.get("book-9") == b"9"
    await writer.drain()
    await client.aclose()
