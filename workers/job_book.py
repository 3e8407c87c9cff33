"""The node's bookkeeping in RQ (:class:`JobBook`): what a stock RQ worker writes around a job.

:func:`workers.jobs.run_job` is never executed by RQ: the node consumes its queue itself, many
jobs at once. :class:`JobBook` does the bookkeeping a stock worker would, so ``rq info``, the
job's status, and the started / finished / failed registries tell the truth.

Each transition's commands are RQ's own (its methods write into a recorder given as their
pipeline, :func:`workers.rq_compat.recorded`); the node sends them on its asyncio client
through a :class:`BookWriter`: whatever transitions are waiting go in one MULTI/EXEC, one round
trip, while the jobs run (a job's start is booked beside its first token, never before it).
Jobs are taken several at once (:meth:`JobBook.take`): their moves to RQ's intermediate queue
in one round trip, their hashes in a second. The synchronous methods (``start``, ``finish``,
...) send the same commands on a synchronous client, for tools and tests.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from datetime import timedelta
from typing import Any

import redis
from redis.asyncio import Redis as AsyncRedis
from rq import Queue
from rq.exceptions import DequeueTimeout
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import WorkerStatus

from workers.jobs import RESULT_TTL_S
from workers.registry import queue_name
from workers.rq_compat import Command, NodeRQWorker, job_from_hash, recorded, replay

__all__ = ["EXECUTION_TTL_S", "BookWriter", "JobBook"]

log = logging.getLogger(__name__)

EXECUTION_TTL_S = 90
"""An execution not heartbeaten for this long is abandoned (the node beats every ~15 s)."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class BookWriter:
    """Sends bookkeeping on an asyncio client, group-committed: the transitions that come while
    one MULTI/EXEC is under way all go in the next one. Each ``send`` returns once its own
    commands were executed (or raises what their round trip raised)."""

    def __init__(self, redis_async: AsyncRedis) -> None:
        self.redis = redis_async
        self._waiting: list[tuple[list[Command], asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def send(self, commands: list[Command]) -> None:
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((commands, done))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        await asyncio.shield(done)  # a caller that leaves does not take its commands back

    async def drain(self) -> None:
        """Wait until what was sent is written (before the client closes)."""
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)

    async def _flush(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                pipe = self.redis.pipeline(transaction=True)
                for commands, _done in batch:
                    replay(pipe, commands)
                await pipe.execute()
            except Exception as error:
                for _commands, done in batch:
                    if not done.done():
                        done.set_exception(error)
            except BaseException:  # cancelled: so are the sends waiting on it
                for _commands, done in batch + self._waiting:
                    done.cancel()
                raise
            else:
                for _commands, done in batch:
                    if not done.done():
                        done.set_result(None)


class JobBook:
    """The node's bookkeeping in RQ, one call per transition.

    It registers the node as an RQ worker (named after the worker id) and, per job, does what a
    stock worker does around ``job.perform()``: an Execution in the started registry, the job's
    status and timestamps, the result or the failure, the finished / failed registries. All
    through RQ's public classes (``tests/test_jobs.py`` holds it to what a stock worker leaves),
    the node's worker registration and the recording aside (:mod:`workers.rq_compat`).
    ``writer``: the asyncio side (``take``, ``astart``, ...).
    """

    def __init__(
        self, connection: redis.Redis, worker_id: str, writer: BookWriter | None = None
    ) -> None:
        self.connection = connection
        self.writer = writer
        self.queue = Queue(queue_name(worker_id), connection=connection, serializer=JSONSerializer)
        with warnings.catch_warnings():
            # An attested worker's Redis user may not list other clients (CLIENT LIST): RQ then
            # records its address as unknown, which is all this warning says.
            warnings.filterwarnings("ignore", "CLIENT LIST command not supported")
            self.rq_worker = NodeRQWorker(
                [self.queue], connection=connection, name=worker_id, serializer=JSONSerializer
            )
        self.name = worker_id

    # -- the node as an RQ worker (synchronous: once each) ---------------------------------------

    def register_birth(self) -> None:
        self.rq_worker.register_birth()
        self.rq_worker.set_state(WorkerStatus.IDLE)

    def register_death(self) -> None:
        self.rq_worker.register_death()

    # -- each transition's commands, none sent ---------------------------------------------------

    def heartbeat_commands(
        self, executions: list[tuple[Job, Execution]], busy: bool
    ) -> list[Command]:
        """Keep the RQ worker and the running executions alive (not abandoned)."""

        def beat(pipe: Any) -> None:
            self.rq_worker.heartbeat(EXECUTION_TTL_S + 60, pipeline=pipe)
            self.rq_worker.set_state(WorkerStatus.BUSY if busy else WorkerStatus.IDLE, pipe)
            for job, execution in executions:
                execution.heartbeat(job.started_job_registry, EXECUTION_TTL_S, pipeline=pipe)
                job.heartbeat(now(), EXECUTION_TTL_S, pipeline=pipe, xx=True)

        return recorded(beat)

    def start_commands(self, job: Job) -> tuple[Execution, list[Command]]:
        """Mark ``job`` started by this node (status, started registry, out of intermediate)."""
        executions: list[Execution] = []

        def start(pipe: Any) -> None:
            executions.append(
                Execution.create(job, EXECUTION_TTL_S, pipeline=pipe, worker_name=self.name)
            )
            job.prepare_for_execution(self.name, pipeline=pipe)
            pipe.lrem(self.queue.intermediate_queue_key, 1, job.id)

        commands = recorded(start)
        return executions[0], commands

    def finish_commands(
        self, job: Job, execution: Execution | None, result: dict[str, Any]
    ) -> list[Command]:
        """Mark ``job`` finished with a JSON-able ``result`` (never text or keys); ``execution``
        None: its start could not be booked (the job is still in the intermediate queue)."""
        job.ended_at = now()
        result_ttl = job.get_result_ttl(RESULT_TTL_S)

        def finish(pipe: Any) -> None:
            job.set_status(JobStatus.FINISHED, pipeline=pipe)
            job.save(pipeline=pipe, include_meta=False, include_result=False)
            Result.create(
                job,
                Result.Type.SUCCESSFUL,
                result_ttl,
                return_value=result,
                worker_name=self.name,
                pipeline=pipe,
                **self._execution_fields(job, execution),
            )
            if result_ttl != 0:
                job.finished_job_registry.add(job, result_ttl, pipe)
            job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
            self._end_execution(job, execution, pipe)
            self.rq_worker.increment_successful_job_count(pipeline=pipe)
            self.rq_worker.increment_total_working_time(self._working_time(job), pipe)

        return recorded(finish)

    def fail_commands(self, job: Job, execution: Execution | None, reason: str) -> list[Command]:
        """Mark ``job`` failed with ``reason`` (shown by RQ as the exception text)."""
        job.ended_at = now()
        ttl = job.failure_ttl

        def fail(pipe: Any) -> None:
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            self._end_execution(job, execution, pipe)
            job.failed_job_registry.add(job, ttl=ttl, exc_string=reason, pipeline=pipe)
            Result.create_failure(
                job,
                ttl,
                exc_string=reason,
                worker_name=self.name,
                pipeline=pipe,
                **self._execution_fields(job, execution),
            )
            self.rq_worker.increment_failed_job_count(pipeline=pipe)
            self.rq_worker.increment_total_working_time(self._working_time(job), pipe)

        return recorded(fail)

    def _end_execution(self, job: Job, execution: Execution | None, pipe: Any) -> None:
        if execution is not None:
            execution.delete(job=job, pipeline=pipe)
        else:  # never started: it is still in the intermediate queue
            pipe.lrem(self.queue.intermediate_queue_key, 1, job.id)

    @staticmethod
    def _execution_fields(job: Job, execution: Execution | None) -> dict[str, Any]:
        return {
            "execution_id": execution.id if execution is not None else None,
            "execution_started_at": execution.created_at if execution is not None else None,
            "execution_ended_at": job.ended_at,
        }

    @staticmethod
    def _working_time(job: Job) -> timedelta:
        if job.started_at is None or job.ended_at is None:
            return timedelta(0)
        return job.ended_at - job.started_at

    # -- asyncio: through the writer -------------------------------------------------------------

    def _writer(self) -> BookWriter:
        if self.writer is None:
            raise RuntimeError("this JobBook has no asyncio writer")
        return self.writer

    async def take(self, most: int, timeout_s: int | None) -> list[Job]:
        """Up to ``most`` jobs (each moved to RQ's intermediate queue), in queue order, in two
        round trips: the ids at the queue's head, then their moves and hashes in one MULTI/EXEC.
        None waiting: wait up to ``timeout_s`` for one (``None``: do not wait). Jobs whose TTL
        passed are skipped, as RQ does."""
        redis_async = self._writer().redis
        source, intermediate = self.queue.key, self.queue.intermediate_queue_key
        # The node is its queue's one consumer: the head it reads is what it moves.
        head = await redis_async.lrange(source, 0, max(1, most) - 1)
        moves = len(head)
        if not head:
            if timeout_s is None:
                return []
            moved = await redis_async.blmove(source, intermediate, timeout_s)
            if moved is None:
                return []
            head = [moved]
        names = [_text(job_id) for job_id in head]
        pipe = redis_async.pipeline(transaction=True)
        for _ in range(moves):
            pipe.lmove(source, intermediate)
        for job_id in names:
            pipe.hgetall(Job.key_for(job_id))
        replies = await pipe.execute()
        hashes = replies[moves:]
        taken = [_text(job_id) for job_id in replies[:moves] if job_id] if moves else names
        if taken != names:  # not what was read: an id pushed to the front, or one removed
            names = taken
            pipe = redis_async.pipeline(transaction=False)
            for job_id in names:
                pipe.hgetall(Job.key_for(job_id))
            hashes = await pipe.execute()
        jobs, gone = [], []
        for job_id, fields in zip(names, hashes, strict=True):
            if not fields:
                gone.append(job_id)  # its TTL passed while it waited
                continue
            try:
                jobs.append(job_from_hash(job_id, fields))
            except Exception as error:  # left in the intermediate queue, as RQ leaves it
                log.warning("job %s cannot be read: %s", job_id, type(error).__name__)
        if gone:
            pipe = redis_async.pipeline(transaction=False)
            for job_id in gone:
                pipe.lrem(intermediate, 1, job_id)
            await pipe.execute()
        return jobs

    async def astart(self, job: Job) -> Execution:
        execution, commands = self.start_commands(job)
        await self._writer().send(commands)
        return execution

    async def afinish(self, job: Job, execution: Execution | None, result: dict[str, Any]) -> None:
        await self._writer().send(self.finish_commands(job, execution, result))

    async def afail(self, job: Job, execution: Execution | None, reason: str) -> None:
        await self._writer().send(self.fail_commands(job, execution, reason))

    async def aheartbeat(self, executions: list[tuple[Job, Execution]], busy: bool) -> None:
        await self._writer().send(self.heartbeat_commands(executions, busy))

    # -- synchronous: the same commands on the connection ----------------------------------------

    def _send(self, commands: list[Command]) -> None:
        with self.connection.pipeline() as pipe:
            replay(pipe, commands)
            pipe.execute()

    def dequeue(self, timeout_s: int | None) -> Job | None:
        """The next job (moved to RQ's intermediate queue), or None after ``timeout_s``.

        ``timeout_s=None`` does not block. Jobs whose TTL passed are skipped by RQ.
        """
        try:
            result = Queue.dequeue_any(
                [self.queue], timeout_s, connection=self.connection, serializer=JSONSerializer
            )
        except DequeueTimeout:
            return None
        return None if result is None else result[0]

    def start(self, job: Job) -> Execution:
        execution, commands = self.start_commands(job)
        self._send(commands)
        return execution

    def finish(self, job: Job, execution: Execution | None, result: dict[str, Any]) -> None:
        self._send(self.finish_commands(job, execution, result))

    def fail(self, job: Job, execution: Execution | None, reason: str) -> None:
        self._send(self.fail_commands(job, execution, reason))

    def heartbeat(self, executions: list[tuple[Job, Execution]], busy: bool) -> None:
        self._send(self.heartbeat_commands(executions, busy))
