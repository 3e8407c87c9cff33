"""The one module where Cocoon leans on RQ (2.x) beyond its documented API.

Everything else (:mod:`workers.jobs`) uses RQ's public classes and methods. Two things have no
public way, and live here, each checked against the installed RQ by ``tests/test_rq_compat.py``,
which fails naming the RQ version when a release changes them:

* :class:`NodeRQWorker`: a worker listed in its queue's worker set only, never in RQ's global
  ``rq:workers`` (a key every worker shares, which an attested worker's Redis user may not
  write). RQ's workers write the global set through their ``redis_workers_keys`` attribute.
* :func:`offline_queue` and :func:`enqueue_commands`: RQ's enqueue replayed on an asyncio
  client. RQ asks the server its version before it builds a job (``get_redis_server_version``,
  cached in the queue's ``redis_server_version``); the asyncio enqueue has no synchronous
  connection to ask, so the queue is told the version, and RQ's commands go to a recorder.
* :func:`recorded` and :func:`job_from_hash`: the node's bookkeeping (:mod:`workers.job_book`)
  the same way: RQ's own methods write a transition into a recorder passed as their pipeline,
  and a job is rebuilt from the hash an asyncio ``HGETALL`` read (``Job.restore``, what
  ``Job.fetch`` does after its own read), its connection one that leads nowhere, so a command
  RQ would send outside the pipeline fails instead of blocking the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import redis
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

__all__ = [
    "Command",
    "NodeRQWorker",
    "enqueue_commands",
    "job_from_hash",
    "offline_queue",
    "recorded",
    "replay",
]

Command = tuple[str, tuple[Any, ...], dict[str, Any]]
"""A Redis command as RQ issued it: the client method's name, its arguments."""


class NodeRQWorker(SimpleWorker):
    """The node as RQ sees it, kept to keys of its own: its "global" worker set (RQ's
    ``redis_workers_keys``, which ``register_birth`` and ``register_death`` write through
    :mod:`rq.worker_registration`) is its queue's own set. ``rq info --queue`` and
    ``Worker.all(queue=...)`` list the node; RQ's global list does not."""

    def __init__(self, queues: list[Queue], **kwargs: Any) -> None:
        super().__init__(queues, **kwargs)
        self.redis_workers_keys = WORKERS_BY_QUEUE_KEY % queues[0].name


# A client RQ may hold but must never use: every command of an enqueue goes to the recorder.
_OFFLINE = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.01)


def offline_queue(name: str, server_version: tuple[int, int, int]) -> Queue:
    """A queue (JSON serializer) that builds jobs without a connection: it is told the Redis
    server's version instead of asking it."""
    queue = Queue(name, connection=_OFFLINE, serializer=JSONSerializer)
    queue.redis_server_version = server_version
    return queue


class _Recorder:
    """Stands in for a Redis pipeline: records the commands RQ issues. RQ's own code decides
    what an enqueue writes; the caller only carries it."""

    def __init__(self) -> None:
        self.calls: list[Command] = []

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> _Recorder:
            self.calls.append((name, args, kwargs))
            return self

        return record


def recorded(action: Callable[[Any], object]) -> list[Command]:
    """The commands ``action(pipeline)`` issues through the pipeline it is given, in order, none
    sent (the recorder stands in for a redis ``Pipeline``, RQ's type: it only records)."""
    recorder = _Recorder()
    action(recorder)
    return recorder.calls


def replay(pipe: Any, commands: list[Command]) -> None:
    """Issue recorded ``commands`` on ``pipe`` (a synchronous or an asyncio pipeline)."""
    for name, args, kwargs in commands:
        getattr(pipe, name)(*args, **kwargs)


def enqueue_commands(queue: Queue, job: Job) -> list[Command]:
    """The commands ``queue.enqueue_job(job)`` sends, in order, none sent: replay them on any
    client as one MULTI/EXEC and the queue, the job hash and RQ's queue set come out as RQ's own
    enqueue writes them."""
    return recorded(lambda pipe: queue.enqueue_job(job, pipeline=pipe))


def job_from_hash(job_id: str, fields: Mapping[bytes, bytes]) -> Job:
    """The job ``Job.fetch(job_id)`` would return (JSON serializer), from its hash as read by
    ``HGETALL``; its connection leads nowhere (write it through :func:`recorded`)."""
    job = Job(job_id, connection=_OFFLINE, serializer=JSONSerializer)
    job.restore(fields)
    return job
