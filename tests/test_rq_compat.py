"""The RQ details Cocoon leans on beyond RQ's documented API (``workers/rq_compat.py``), held
to the installed RQ: a release that changes one fails here, and says which RQ and what to fix.
(The node's ACL user refusing RQ's global worker set is ``tests/test_registry_trust.py``.)"""

from __future__ import annotations

import redis
import rq
from rq import Queue, Worker
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from workers.jobs import run_job
from workers.rq_compat import NodeRQWorker, enqueue_commands, offline_queue

CHANGED = f"rq {rq.__version__} changed what workers/rq_compat.py relies on"


def test_the_node_is_listed_in_its_queues_worker_set_only(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    queue = Queue("cocoon:queue:w-compat", connection=sync, serializer=JSONSerializer)
    worker = NodeRQWorker([queue], connection=sync, name="w-compat", serializer=JSONSerializer)
    worker.register_birth()
    try:
        assert not sync.exists("rq:workers"), f"{CHANGED}: NodeRQWorker wrote rq:workers"
        listed = [w.name for w in Worker.all(queue=queue, serializer=JSONSerializer)]
        assert listed == ["w-compat"], f"{CHANGED}: NodeRQWorker is not in its queue's set"
    finally:
        worker.register_death()
    assert not sync.exists("rq:workers"), f"{CHANGED}: NodeRQWorker's death wrote rq:workers"
    assert Worker.all(queue=queue, serializer=JSONSerializer) == [], CHANGED
    sync.close()


def test_an_offline_queue_builds_a_job_without_asking_the_server() -> None:
    queue = offline_queue("cocoon:queue:w-compat", (7, 2, 4))
    # Its connection leads nowhere: a question to the server would raise here.
    assert queue.get_redis_server_version() == (7, 2, 4), f"{CHANGED}: the server version"
    job = queue.create_job(run_job, args=("c2VhbGVk",), job_id="w-compat_t-1")
    commands = enqueue_commands(queue, job)
    assert commands, f"{CHANGED}: an enqueue issued no command through its pipeline"
    assert "execute" not in [name for name, _args, _kwargs in commands], CHANGED


def test_the_recorded_enqueue_replays_into_a_queued_job(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    info = sync.info("server")
    major, minor, patch = (int(part) for part in str(info["redis_version"]).split(".")[:3])
    queue = offline_queue("cocoon:queue:w-compat", (major, minor, patch))
    job = queue.create_job(
        run_job, args=("c2VhbGVk",), job_id="w-compat_t-2", status=JobStatus.QUEUED
    )
    with sync.pipeline(transaction=True) as pipe:
        for name, args, kwargs in enqueue_commands(queue, job):
            getattr(pipe, name)(*args, **kwargs)
        pipe.execute()
    live = Queue("cocoon:queue:w-compat", connection=sync, serializer=JSONSerializer)
    assert live.job_ids == ["w-compat_t-2"], CHANGED
    fetched = Job.fetch("w-compat_t-2", connection=sync, serializer=JSONSerializer)
    assert fetched.get_status() == JobStatus.QUEUED, CHANGED
    assert list(fetched.args) == ["c2VhbGVk"], CHANGED
    sync.close()
