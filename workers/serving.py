"""The worker node serving jobs: :class:`Node`, started by :func:`workers.node.run_node`.

A node (one process, one engine, many jobs at once):

1. registers in the worker registry and as an RQ worker, with the engine already loaded;
2. heartbeats every ~2 s (TTL 10 s) with its load, and sooner when the load changes;
3. takes jobs from its own RQ queue (:mod:`workers.jobs` has the contract) as long as it has a
   free slot, and runs each as an asyncio task on the shared engine, up to ``capacity`` at once
   (``min(--capacity, engine.max_concurrency)``). It never dequeues a job it has no room for.

Each job is a :class:`workers.job_run.JobRun` (what is streamed, and how a job is stopped).
The node cancels a job when asked (:func:`workers.streams.request_cancel`: it listens on the
cancel channel, and sweeps the cancel keys of its running jobs with every heartbeat).

Shutdown (SIGTERM or SIGINT alike, :mod:`workers.lifecycle`): unregister at once (no dispatcher
picks the node any more), stop dequeuing, reject the jobs still waiting in the queue with
ErrorRecord ``worker_shutdown`` (so their dispatchers retry elsewhere without waiting for a
timeout), let running jobs finish for up to ``--grace`` seconds (default 30), then stop the rest
as above, and exit 0. A second signal ends the grace period at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from redis.exceptions import AuthenticationError, RedisError
from rq.job import Job

from workers import redis_auth, registry, streams
from workers.attest_client import Attestation
from workers.engines import Engine
from workers.evidence import AttestationRefused
from workers.job_book import BookWriter, JobBook
from workers.job_run import JobRun, Outcome, describe_error
from workers.jobs import CHALLENGE_FUNCTION, challenge_argument
from workers.logcontext import bind as bind_log_context
from workers.metrics import WorkerMetrics
from workers.node_cli import NodeConfig
from workers.receipts import sign_challenge
from workers.wire import WireError, WorkerKeys

__all__ = ["Node"]

log = logging.getLogger("cocoon.worker")

T = TypeVar("T")

DEQUEUE_BLOCK_S = 1
"""One blocking dequeue waits this long, so a stop request is noticed within a second."""

RQ_HEARTBEAT_S = 15.0
"""How often the node's RQ worker entry and its jobs' executions are kept alive."""

TAKE_AT_ONCE = 32
"""The most jobs taken from the queue in one go (two round trips, however many)."""


class Node:
    """A running worker node. Build with a started engine, then ``await serve(stop)``."""

    def __init__(
        self,
        config: NodeConfig,
        engine: Engine,
        keys: WorkerKeys | None = None,
        attestation: Attestation | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.engine = engine
        self.keys = keys or WorkerKeys.generate()
        self.attestation = attestation
        self.tee = (
            attestation.registration.tee if attestation and attestation.registration else "dev"
        )
        self.worker_id = config.worker_id or f"w-{self.keys.fingerprint()}"
        # An attested node writes its own keys only; a direct dev node (operator credentials)
        # indexes itself. Attested credentials can be replaced after a re-attestation.
        self.shared = attestation is None
        self.credentials = None if self.shared else redis_auth.NodeCredentials(config.redis_url)
        self.capacity = max(1, min(config.capacity, engine.max_concurrency))
        self.peak_load = 0
        self._running: dict[str, JobRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = False
        self._beating = True  # False: the heartbeat loop ends (see serve's finally)
        self._load_changed = asyncio.Event()

    @property
    def load(self) -> int:
        return len(self._running)

    def _job_run(self, job: Job) -> JobRun:
        coalesce_s = self.config.stream_coalesce_ms / 1000
        return JobRun(
            job, engine=self.engine, keys=self.keys, redis=self._redis, coalesce_s=coalesce_s
        )

    def info(self) -> registry.WorkerInfo:
        return registry.WorkerInfo(
            worker_id=self.worker_id,
            model=self.engine.model,
            engine=self.engine.name,
            engine_version=self.engine.version,
            box_public_key=self.keys.box_public_b64,
            verify_key=self.keys.verify_key_b64,
            capacity=self.capacity,
            load=self.load,
            provider_id=self.config.provider_id,
            last_heartbeat=time.time(),
        )

    # -- lifecycle -------------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event, force: asyncio.Event | None = None) -> None:
        """Serve jobs until ``stop`` is set, then shut down gracefully (see the module doc).

        Setting ``force`` ends the shutdown's grace period at once.
        """
        self._force = force or asyncio.Event()
        url, ca_pem = self.config.redis_url, self.config.redis_ca_pem
        self._sync = redis_auth.sync_client(url, credentials=self.credentials, ca_pem=ca_pem)
        # One connection per job writing a chunk, plus the heartbeat and the cancel watch.
        self._redis = redis_auth.async_client(
            url, credentials=self.credentials, ca_pem=ca_pem, max_connections=self.capacity + 16
        )
        self._writer = BookWriter(self._redis)
        self._book = JobBook(self._sync, self.worker_id, self._writer)
        self._slots = asyncio.Semaphore(self.capacity)
        background: list[asyncio.Task[None]] = []
        try:
            await self._in_thread(self._book.register_birth)
            await registry.register(self._redis, self.info(), self.config.ttl_s, shared=self.shared)
            self._accepting = True
            watching = asyncio.Event()
            background = [
                asyncio.create_task(self._heartbeat_loop()),
                asyncio.create_task(
                    streams.watch_cancels(self._redis, self._on_cancel, ready=watching)
                ),
            ]
            if self.attestation is not None:
                background.append(asyncio.create_task(self.attestation.renew_forever()))
            await asyncio.wait_for(watching.wait(), 10)
            dequeuer = asyncio.create_task(self._dequeue_loop())
            log.info(
                "worker %s ready: model=%s engine=%s %s capacity=%d keys=%s (tee=%s%s)",
                self.worker_id,
                self.engine.model,
                self.engine.name,
                self.engine.version,
                self.capacity,
                self.keys.fingerprint(),
                self.tee,
                "" if self.attestation else ", unattested: direct development registration",
            )
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([stopping, dequeuer, *background], return_when="FIRST_COMPLETED")
            stopping.cancel()
            broken = [
                task
                for task in (dequeuer, *background)
                if task.done() and not (self.attestation and self.attestation.revoked)
            ]
            for task in broken:  # they loop until cancelled: ending is a bug
                log.critical(
                    "worker %s: a background task ended (%s)", self.worker_id, describe_error(task)
                )
            await self._shut_down(dequeuer)
            if broken:
                raise RuntimeError("a background task of the node ended; it was shut down")
        finally:
            # The heartbeat loop ends on this flag, not only on its cancellation: about once in
            # thirteen stops its cancellation was lost (the cause is not pinned down), and the
            # node beat on after "stopped" until killed.
            self._beating = False
            self._load_changed.set()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._writer.drain()  # the jobs' last bookkeeping, the last heartbeat
            try:
                await self._in_thread(self._book.register_death)
            except RedisError as error:
                log.warning("could not record the RQ worker's death: %s", error)
            await self._redis.aclose()
            self._sync.close()

    async def _shut_down(self, dequeuer: asyncio.Task[None]) -> None:
        log.info("worker %s stopping: %d jobs running", self.worker_id, self.load)
        self._accepting = False
        # A revoked worker has lost its Redis user: the backend removed its entry already.
        revoked = self.attestation is not None and self.attestation.revoked is not None
        if not revoked:
            await registry.unregister(self._redis, self.worker_id, shared=self.shared)
        dequeuer.cancel()
        await asyncio.gather(dequeuer, return_exceptions=True)
        rejected = 0
        while not revoked and (jobs := await self._book.take(TAKE_AT_ONCE, None)):
            await asyncio.gather(*(self._reject(job) for job in jobs))
            rejected += len(jobs)
        if rejected:
            log.info("rejected %d queued jobs (worker_shutdown)", rejected)
        if self._tasks:
            force = asyncio.create_task(self._force.wait())
            await asyncio.wait([*self._tasks, force], timeout=self.config.grace_s)
            force.cancel()
        for run in list(self._running.values()):
            run.stop("shutdown")
        if self._tasks:
            await asyncio.wait(self._tasks)
        log.info("worker %s stopped (peak load %d)", self.worker_id, self.peak_load)

    async def _heartbeat_loop(self) -> None:
        last_rq = time.monotonic()
        while self._beating:
            try:
                alive = await registry.heartbeat(
                    self._redis, self.worker_id, self.load, self.config.ttl_s
                )
                if not alive and self._accepting:
                    log.warning(
                        "worker %s fell out of the registry; registering again", self.worker_id
                    )
                    await registry.register(
                        self._redis, self.info(), self.config.ttl_s, shared=self.shared
                    )
                for job_id in await streams.cancelled_among(self._redis, list(self._running)):
                    self._on_cancel(job_id)
                if time.monotonic() - last_rq >= RQ_HEARTBEAT_S:
                    last_rq = time.monotonic()
                    executions = [
                        (r.job, r.execution) for r in self._running.values() if r.execution
                    ]
                    await self._book.aheartbeat(executions, bool(executions))
            except AuthenticationError as error:
                if self.attestation is None:
                    log.warning("heartbeat failed: %s", error)
                elif not await self._reattest(error):
                    return  # refused: revoked
            except RedisError as error:
                log.warning("heartbeat failed: %s", error)
            except Exception as error:  # keep beating: a silent node would look dead
                log.error("heartbeat failed: %s", describe_error(error))
            self._load_changed.clear()
            if not self._beating:
                break
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns instead of raising
            # when it is cancelled just as the event is set (a job ending at shutdown), and this
            # loop would beat on after "stopped" if it ended by cancellation alone.
            try:
                async with asyncio.timeout(self.config.heartbeat_s):
                    await self._load_changed.wait()
            except TimeoutError:
                continue
            await asyncio.sleep(0.05)  # report a burst of changes once

    async def _reattest(self, error: Exception) -> bool:
        """Redis refuses this worker's credentials: its user is gone (a Redis restart or
        failover the backend has not repaired yet, or a revocation). Attest again with the
        renewal token: the backend answers with the same credentials (it recreated the user),
        new ones, or a refusal. False when refused (the worker is revoked)."""
        assert self.attestation is not None
        log.warning("Redis refuses this worker's credentials (%s); attesting again", error)
        try:
            registration = await self.attestation.renew()
        except (AttestationRefused, redis_auth.TlsRefused) as refused:
            self.attestation.refused(refused)
            return False
        except Exception as failure:  # the backend is unreachable: at the next heartbeat
            log.warning("re-attestation failed (%s); trying again", describe_error(failure))
            return True
        if self.credentials is not None:
            self.credentials.replace(registration.redis_url)
        return True

    async def _dequeue_loop(self) -> None:
        """Take jobs whenever slots are free, as many at once as are free (and waiting).
        Cancelled (by shutdown) only between takes."""
        while self._accepting:
            await self._slots.acquire()
            free = 1
            while free < TAKE_AT_ONCE and not self._slots.locked():
                await self._slots.acquire()  # free: it does not wait
                free += 1
            taking = asyncio.ensure_future(self._book.take(free, DEQUEUE_BLOCK_S))
            try:
                jobs = await asyncio.shield(taking)
            except asyncio.CancelledError:
                # A take half done would lose its jobs: let it end, refuse what it took.
                for _ in range(free):
                    self._slots.release()
                with contextlib.suppress(Exception):
                    await asyncio.gather(*(self._reject(job) for job in await taking))
                raise
            except Exception as error:  # Redis down
                for _ in range(free):
                    self._slots.release()
                log.warning("dequeue failed: %s", type(error).__name__)
                await asyncio.sleep(1)
                continue
            for _ in range(free - len(jobs)):
                self._slots.release()
            for job in jobs:
                if not self._accepting:
                    self._slots.release()
                    await self._reject(job)
                    continue
                task = asyncio.create_task(self._run_job(job))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    # -- one job ---------------------------------------------------------------------------------

    async def _run_job(self, job: Job) -> None:
        bind_log_context(job_id=job.id)  # this job's own task: its log records carry its id
        if job.func_name == CHALLENGE_FUNCTION:
            await self._answer_challenge(job)
            return
        run = self._job_run(job)
        self._running[job.id] = run
        if self.metrics is not None:
            self.metrics.set_running(self.load)
        self.peak_load = max(self.peak_load, self.load)
        self._load_changed.set()
        outcome = Outcome(False, "internal error")
        # RQ's bookkeeping (group-committed, JobBook's writer) runs beside the job, off its
        # first token's path; the job's end is booked once its start is.
        starting = asyncio.ensure_future(self._book.astart(job))
        starting.add_done_callback(lambda done: self._started(run, done))
        try:
            outcome = await run.run()
        except Exception as error:
            log.error("job %s: internal error: %s", job.id, describe_error(error))
            outcome = Outcome(False, f"internal error ({type(error).__name__})")
            if run.chunks == 0:
                # Nothing was sent (Redis came back under this job, say): tell the backend at
                # once, so the turn goes on elsewhere instead of waiting out its first token.
                with contextlib.suppress(Exception):
                    await run.reject("worker_unavailable", "the worker could not start this job")
        finally:
            del self._running[job.id]
            if self.metrics is not None:
                self.metrics.set_running(self.load)
            self._slots.release()
            self._load_changed.set()
            await asyncio.wait({starting})
            await self._record(run, outcome)

    @staticmethod
    def _started(run: JobRun, starting: asyncio.Future[Any]) -> None:
        """The job's start is booked in RQ (its execution kept for the heartbeats), or could
        not be: the job runs all the same, and its end is booked without an execution."""
        if starting.cancelled():
            return
        if (error := starting.exception()) is not None:
            log.warning("job %s: its start could not be booked in RQ: %s", run.job_id, error)
        else:
            run.execution = starting.result()

    async def _record(self, run: JobRun, outcome: Outcome) -> None:
        job = run.job
        try:  # its slot is the backend's to release (when the turn ends)
            if outcome.ok:
                usage = outcome.usage
                result = {
                    "finish_reason": outcome.detail,
                    "prompt_tokens": usage.prompt_tokens if usage else 0,
                    "completion_tokens": usage.completion_tokens if usage else run.deltas,
                }
                await self._book.afinish(job, run.execution, result)
            else:
                await self._book.afail(job, run.execution, outcome.detail)
        except RedisError as error:
            log.error("job %s: could not record its outcome in RQ: %s", job.id, error)
        elapsed = time.monotonic() - run.started
        if self.metrics is not None:
            usage = outcome.usage if outcome.ok else None
            self.metrics.job_ended(
                "ok" if outcome.ok else "failed",
                elapsed,
                prompt_tokens=usage.prompt_tokens if usage else 0,
                cached_prompt_tokens=usage.cached_prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
            )
        if outcome.ok and outcome.usage:
            log.info(
                "job %s %s in %.3fs: %d prompt (%d cached) + %d completion tokens, %d chunks",
                job.id,
                outcome.detail,
                elapsed,
                outcome.usage.prompt_tokens,
                outcome.usage.cached_prompt_tokens,
                outcome.usage.completion_tokens,
                run.chunks,
            )
        else:
            log.info("job %s failed in %.3fs: %s", job.id, elapsed, outcome.detail)

    async def _answer_challenge(self, job: Job) -> None:
        """Sign a client's nonce with the attested key (the public attestation report's
        freshness): the signature, in the clear, is the job's one stream entry."""
        try:
            execution = await self._book.astart(job)
            try:
                signature = sign_challenge(
                    self.worker_id, challenge_argument(job), self.keys.signing_key
                )
            except (ValueError, WireError) as error:
                await self._book.afail(job, execution, f"bad challenge: {error}")
                return
            await streams.append(self._redis, job.id, signature.encode(), last=True)
            await self._book.afinish(job, execution, {"challenge": "signed"})
        except RedisError as error:
            log.warning("challenge %s not answered: %s", job.id, error)
        finally:
            self._slots.release()

    async def _reject(self, job: Job) -> None:
        """Refuse a job that was never started (the node is shutting down)."""
        run = self._job_run(job)
        try:
            await run.reject("worker_shutdown", "the worker is shutting down")
            await self._book.afail(job, None, "worker_shutdown: never started")
        except RedisError as error:
            log.error("job %s: could not reject it: %s", job.id, error)
        if self.metrics is not None:
            self.metrics.job_ended("rejected", 0.0)

    def _on_cancel(self, job_id: str) -> None:
        run = self._running.get(job_id)
        if run is not None and run.stop("cancel"):
            log.info("job %s: cancel requested", job_id)

    async def _in_thread(self, func: Callable[..., T], *args: Any) -> T:
        """RQ's worker registration (once at start, once at the end): synchronous."""
        return await asyncio.get_running_loop().run_in_executor(None, func, *args)
