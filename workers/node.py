"""The worker node: one process, one engine, many jobs at once.

``cocoon worker --model NAME --engine ENGINE [--capacity 64] [--redis-url URL]
[--engine-option k=v ...]`` (or ``python -m workers.node ...``):

1. generates the node's keys (:class:`workers.wire.WorkerKeys`) in memory only: they are never
   written to disk, to Redis or to the logs; a restarted node is a new worker;
2. loads the engine once, then registers in the worker registry and as an RQ worker;
3. heartbeats every ~2 s (TTL 10 s) with its load, and sooner when the load changes;
4. takes jobs from its own RQ queue (:mod:`workers.jobs` has the contract) as long as it has a
   free slot, and runs each as an asyncio task on the shared engine, up to ``capacity`` at once
   (``min(--capacity, engine.max_concurrency)``). It never dequeues a job it has no room for.

Each job is a :class:`workers.job_run.JobRun` (what is streamed, and how a job is stopped).
The node cancels a job when asked (:func:`workers.streams.request_cancel`: it listens on the
cancel channel, and sweeps the cancel keys of its running jobs with every heartbeat).

Shutdown (SIGTERM or SIGINT alike, :mod:`workers.lifecycle`): unregister at once (no dispatcher
picks the node any more), stop dequeuing, reject the jobs still waiting in the queue with
ErrorRecord ``worker_shutdown`` (so their dispatchers retry elsewhere without waiting for a
timeout), let running jobs finish for up to ``--grace`` seconds (default 30), then stop the rest
as above, and exit 0. A second signal ends the grace period at once. A signal while the engine
loads or the node attests stops it at once. With ``--parent-pid PID`` (``cocoon up`` passes its
own) the node stops the same way when that process ends: Linux tells it (``PR_SET_PDEATHSIG``)
and it checks its parent every second as well.

Attestation. With ``--register-url URL --token T`` the node first proves itself to the
backend (:func:`workers.evidence.register_with_backend`): it asks for a nonce, takes evidence
bound to its keys, model and that nonce (a TDX quote through configfs-tsm, or, with ``--tee dev``
or ``auto`` on a machine without TDX, the development TEE), and receives, sealed to its key, its
worker id and Redis credentials of its own (an ACL user) that reach its own keys only: the
backend indexes it, counts its load and releases its slots. Outside the development TEE it
connects to Redis only with TLS (``rediss://``, checked against the CA bundle that came with
the credentials; a plain ``redis://`` is refused: exit 3). It attests again before the evidence
expires, and at once when Redis refuses its credentials (a Redis restart or failover: the
backend recreates its user, or gives it a new password); if the backend refuses, the node has
been revoked and shuts down. A node that cannot onboard (refused: exit 3; no evidence: exit 3;
the backend unreachable for ``--register-wait`` seconds: exit 1) says why and exits, so that a
supervisor restarts it.

Without ``--register-url`` the node registers itself directly with ``--redis-url``: an
unattested development worker, dispatched only by backends in dev mode
(``COCOON_ATTESTATION__ALLOW_DEV=true``) and shown everywhere as ``tee=dev``.

Logs carry job ids, durations and token counts: never prompt or reply text, never keys
(``--log-json`` or ``COCOON_LOG_JSON=true``: one JSON object per line, with the ``job_id``).
``--metrics-port`` (or ``COCOON_WORKER_METRICS_PORT``) serves Prometheus ``/metrics`` of the
node (:mod:`workers.metrics`): jobs by outcome, tokens, job duration, jobs running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from redis.exceptions import AuthenticationError, RedisError
from rq.job import Job

from workers import redis_auth, registry, streams
from workers.engines import Engine, EngineError, create_engine
from workers.evidence import (
    AttestationRefused,
    EvidenceError,
    Registration,
    file_sha256,
    register_with_backend,
    worker_version,
)
from workers.job_run import JobRun, Outcome, describe_error
from workers.jobs import JobBook
from workers.lifecycle import Shutdown, die_with_parent, watch_parent
from workers.logcontext import bind as bind_log_context
from workers.logcontext import configure as configure_logging
from workers.metrics import METRICS_PORT_ENV, WorkerMetrics, metrics_port_from_env
from workers.wire import WorkerKeys

__all__ = ["Node", "NodeConfig", "main", "run_node"]

log = logging.getLogger("cocoon.worker")

T = TypeVar("T")

DEQUEUE_BLOCK_S = 1
"""One blocking dequeue waits this long, so a stop request is noticed within a second."""

RQ_HEARTBEAT_S = 15.0
"""How often the node's RQ worker entry and its jobs' executions are kept alive."""

BOOK_THREADS = 8
"""Threads for RQ's (synchronous) bookkeeping."""


class BackendUnreachable(Exception):
    """The backend could not be reached to attest within ``register_wait_s``: not onboarded."""


@dataclass(frozen=True)
class NodeConfig:
    """What a node is started with (the CLI's arguments)."""

    model: str
    engine: str
    redis_url: str
    capacity: int = 64
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    worker_id: str | None = None
    provider_id: int | None = None
    heartbeat_s: float = 2.0
    ttl_s: int = registry.DEFAULT_TTL_S
    grace_s: float = 30.0
    register_url: str | None = None
    token: str | None = None
    tee: str = "auto"
    register_wait_s: float = 120.0
    metrics_port: int | None = None  # serve Prometheus /metrics on this port (None: off)
    metrics_host: str = "0.0.0.0"
    redis_ca_pem: str | None = None  # the CA bundle of the Redis server (from the credentials)


class Attestation:
    """The node's standing with the backend that attested it (None: a direct dev worker)."""

    def __init__(self, config: NodeConfig, keys: WorkerKeys, engine: Engine) -> None:
        import nacl.signing

        self.config = config
        self.keys = keys
        self.engine = engine
        self.dev_key = nacl.signing.SigningKey.generate()  # the development TEE's software key
        self.registration: Registration | None = None
        self.revoked: AttestationRefused | None = None
        self._renewing = asyncio.Lock()  # a renewal token is good for one attestation
        # The model file's hash, once (the engine is loaded: it does not change under us).
        self.model_sha256 = file_sha256(getattr(engine, "model_path", None))

    def claims(self) -> dict[str, Any]:
        return {
            "box_public_key": self.keys.box_public_b64,
            "verify_key": self.keys.verify_key_b64,
            "model": self.engine.model,
            "model_sha256": self.model_sha256,
            "engine": self.engine.name,
            "engine_version": str(self.engine.version)[:64],
            "worker_version": worker_version(),
        }

    async def attest(self, token: str) -> Registration:
        """Attest with ``token``, retrying while the backend cannot be reached."""
        import aiohttp

        deadline = time.monotonic() + self.config.register_wait_s
        while True:
            try:
                registration = await register_with_backend(
                    self.config.register_url or "",
                    token,
                    self.claims(),
                    self.keys.box_key,
                    tee=self.config.tee,
                    dev_key=self.dev_key,
                )
            except (aiohttp.ClientError, OSError, TimeoutError) as error:
                if time.monotonic() > deadline:
                    raise BackendUnreachable(
                        f"the backend at {self.config.register_url} could not be reached for "
                        f"{self.config.register_wait_s:g} s ({describe_error(error)})"
                    ) from error
                log.warning("backend not reachable for attestation (%s); retrying", error)
                await asyncio.sleep(1.0)
                continue
            if not registration.redis_url and self.registration is not None:  # a renewal
                registration = registration.model_copy(
                    update={
                        "redis_url": self.registration.redis_url,
                        "redis_ca_pem": self.registration.redis_ca_pem,
                    }
                )
            problem = redis_auth.tls_refusal(registration.redis_url, registration.tee)
            if problem:
                raise redis_auth.TlsRefused(problem)
            self.registration = registration
            log.info(
                "attested as %s: tee=%s%s, until %s",
                registration.worker_id,
                registration.tee,
                " (development TEE, not hardware-attested)" if registration.tee == "dev" else "",
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(registration.expires_at)),
            )
            return registration

    async def renew(self) -> Registration:
        """Attest again with the renewal token (one renewal at a time: a second caller gets
        the first one's result). Raises AttestationRefused, TlsRefused, or a network error."""
        assert self.registration is not None
        token = self.registration.renewal_token
        async with self._renewing:
            if self.registration.renewal_token != token:  # renewed meanwhile
                return self.registration
            return await self.attest(token)

    def refused(self, error: Exception) -> None:
        log.critical("re-attestation refused, the worker is revoked: %s", error)
        self.revoked = (
            error if isinstance(error, AttestationRefused) else AttestationRefused(0, [str(error)])
        )

    async def renew_forever(self) -> None:
        """Attest again before the evidence expires. Returns only when refused (revoked)."""
        while True:
            assert self.registration is not None
            left = self.registration.expires_at - time.time()
            await asyncio.sleep(max(1.0, left - max(30.0, min(3600.0, left / 10))))
            try:
                await self.renew()
            except (AttestationRefused, redis_auth.TlsRefused) as error:
                self.refused(error)
                return
            except Exception as error:
                log.warning("re-attestation failed (%s); trying again", type(error).__name__)
                await asyncio.sleep(30)


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
        self._load_changed = asyncio.Event()

    @property
    def load(self) -> int:
        return len(self._running)

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
        self._book = JobBook(self._sync, self.worker_id)
        self._book_pool = ThreadPoolExecutor(BOOK_THREADS, thread_name_prefix="rq-book")
        self._dequeue_pool = ThreadPoolExecutor(1, thread_name_prefix="rq-dequeue")
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
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            try:
                await self._in_thread(self._book.register_death)
            except RedisError as error:
                log.warning("could not record the RQ worker's death: %s", error)
            self._book_pool.shutdown(wait=False)
            self._dequeue_pool.shutdown(wait=False)
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
        while not revoked and (
            job := await self._in_thread(self._book.dequeue, None, pool=self._dequeue_pool)
        ):
            await self._reject(job)
            rejected += 1
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
        while True:
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
                    await self._in_thread(self._book.heartbeat, executions, bool(executions))
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
            try:
                await asyncio.wait_for(self._load_changed.wait(), self.config.heartbeat_s)
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
        """Take a job whenever a slot is free. Cancelled (by shutdown) only between jobs."""
        loop = asyncio.get_running_loop()
        while self._accepting:
            await self._slots.acquire()
            taking = loop.run_in_executor(self._dequeue_pool, self._book.dequeue, DEQUEUE_BLOCK_S)
            try:
                job = await asyncio.shield(taking)
            except asyncio.CancelledError:
                # The blocking dequeue cannot be interrupted: let it end, refuse what it took.
                self._slots.release()
                with contextlib.suppress(Exception):
                    if (taken := await taking) is not None:
                        await self._reject(taken)
                raise
            except Exception as error:  # Redis down, or a job RQ cannot load
                self._slots.release()
                log.warning("dequeue failed: %s", type(error).__name__)
                await asyncio.sleep(1)
                continue
            if job is None:
                self._slots.release()
            elif not self._accepting:
                self._slots.release()
                await self._reject(job)
            else:
                task = asyncio.create_task(self._run_job(job))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    # -- one job ---------------------------------------------------------------------------------

    async def _run_job(self, job: Job) -> None:
        bind_log_context(job_id=job.id)  # this job's own task: its log records carry its id
        run = JobRun(job, engine=self.engine, keys=self.keys, redis=self._redis)
        self._running[job.id] = run
        if self.metrics is not None:
            self.metrics.set_running(self.load)
        self.peak_load = max(self.peak_load, self.load)
        self._load_changed.set()
        outcome = Outcome(False, "internal error")
        try:
            run.execution = await self._in_thread(self._book.start, job)
            outcome = await run.run()
        except Exception as error:
            log.error("job %s: internal error: %s", job.id, describe_error(error))
            outcome = Outcome(False, f"internal error ({type(error).__name__})")
        finally:
            del self._running[job.id]
            if self.metrics is not None:
                self.metrics.set_running(self.load)
            self._slots.release()
            self._load_changed.set()
            await self._record(run, outcome)

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
                await self._in_thread(self._book.finish, job, run.execution, result)
            else:
                await self._in_thread(self._book.fail, job, run.execution, outcome.detail)
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

    async def _reject(self, job: Job) -> None:
        """Refuse a job that was never started (the node is shutting down)."""
        run = JobRun(job, engine=self.engine, keys=self.keys, redis=self._redis)
        try:
            await run.reject("worker_shutdown", "the worker is shutting down")
            await self._in_thread(self._book.fail, job, None, "worker_shutdown: never started")
        except RedisError as error:
            log.error("job %s: could not reject it: %s", job.id, error)
        if self.metrics is not None:
            self.metrics.job_ended("rejected", 0.0)

    def _on_cancel(self, job_id: str) -> None:
        run = self._running.get(job_id)
        if run is not None and run.stop("cancel"):
            log.info("job %s: cancel requested", job_id)

    async def _in_thread(self, func: Callable[..., T], *args: Any, pool: Any = None) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool or self._book_pool, func, *args)


# -- process entry points ------------------------------------------------------------------------


async def _unless_stopped(awaitable: Awaitable[T], stop: asyncio.Event) -> tuple[bool, T | None]:
    """``(True, result)`` of ``awaitable``, or ``(False, None)`` when ``stop`` is set first (it
    is then cancelled): what a node does before it serves must not outlast a signal."""
    task = asyncio.ensure_future(awaitable)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        stopping.cancel()
    if task.done():
        return True, task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return False, None


async def run_node(
    config: NodeConfig, stop: asyncio.Event, force: asyncio.Event | None = None
) -> None:
    """Load the engine once, then serve until ``stop`` is set (``force``: no grace period).

    ``stop`` set while the engine loads or the node attests ends it there, without serving.
    """
    engine = create_engine(config.engine, config.model, **dict(config.engine_options))
    metrics = None
    if config.metrics_port is not None:
        metrics = WorkerMetrics(config.model, config.engine)
        port = metrics.serve(config.metrics_port, config.metrics_host)
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, port)
    started = time.monotonic()
    try:
        loaded, _ = await _unless_stopped(engine.start(), stop)
        if not loaded:
            log.info("stopped while the engine was loading")
            return
        log.info("engine %s loaded in %.1fs", engine, time.monotonic() - started)
        keys = WorkerKeys.generate()
        attestation = None
        if config.register_url:
            attestation = Attestation(config, keys, engine)
            attested, registration = await _unless_stopped(
                attestation.attest(config.token or ""), stop
            )
            if not attested or registration is None:
                log.info("stopped while onboarding: not attested")
                return
            config = replace(
                config,
                redis_url=registration.redis_url,
                worker_id=registration.worker_id,
                redis_ca_pem=registration.redis_ca_pem,
            )
        await Node(config, engine, keys, attestation, metrics).serve(stop, force)
        if attestation is not None and attestation.revoked is not None:
            raise attestation.revoked  # shut down: the backend revoked this worker
    finally:
        await engine.close()
        if metrics is not None:
            metrics.close()


def parse_engine_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["n_ctx=4096", "model_path=/m.gguf"]`` → ``{"n_ctx": 4096, "model_path": "/m.gguf"}``.

    A value that parses as JSON (numbers, true/false, null) is taken as such, else as a string.
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--engine-option takes name=value, got {pair!r}")
        try:
            options[name.replace("-", "_")] = json.loads(raw)
        except ValueError:
            options[name.replace("-", "_")] = raw
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cocoon worker", description="Run a Cocoon worker node: serve one model's jobs."
    )
    parser.add_argument("--model", required=True, help="model id served, e.g. smollm2-135m")
    parser.add_argument("--engine", required=True, help="llama-cpp, openai, vllm or instant")
    parser.add_argument("--capacity", type=int, default=64, help="jobs run at once (default 64)")
    parser.add_argument(
        "--redis-url",
        help="register directly as an unattested dev worker (default: COCOON_REDIS_URL)",
    )
    parser.add_argument(
        "--register-url", metavar="URL", help="attest to this backend (cocoon web) first"
    )
    parser.add_argument("--token", help="registration token (cocoon provider token)")
    parser.add_argument(
        "--register-wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to keep trying an unreachable backend before exiting (default 120)",
    )
    parser.add_argument(
        "--tee",
        choices=("auto", "tdx", "dev"),
        default="auto",
        help="evidence to send: tdx (configfs-tsm), dev (software), auto (tdx when present)",
    )
    parser.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="engine keyword argument (repeatable)",
    )
    parser.add_argument(
        "--worker-id", help="default: w-<key fingerprint> (attested: assigned by the backend)"
    )
    parser.add_argument(
        "--provider-id",
        type=int,
        help="Cocoon user id of the provider (attested: from the registration token)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds running jobs get to finish after SIGTERM or SIGINT (default 30)",
    )
    parser.add_argument(
        "--parent-pid",
        type=int,
        metavar="PID",
        help="stop when this process ends (cocoon up passes its own pid)",
    )
    parser.add_argument("--heartbeat", type=float, default=2.0, help="seconds between heartbeats")
    parser.add_argument("--ttl", type=int, default=registry.DEFAULT_TTL_S, help="registry TTL, s")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=os.environ.get("COCOON_LOG_JSON", "").lower() in {"1", "true", "yes"},
        help="one JSON object per log line (default: COCOON_LOG_JSON)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help=f"serve Prometheus /metrics on this port (default: {METRICS_PORT_ENV}, else off)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``cocoon worker`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level.upper(), json_lines=args.log_json)
    try:
        options = parse_engine_options(args.engine_option)
        metrics_port = (
            args.metrics_port if args.metrics_port is not None else metrics_port_from_env()
        )
    except ValueError as error:
        parser.error(str(error))
    if args.register_url and not args.token:
        parser.error("--register-url needs --token (from `cocoon provider token`)")
    redis_url = args.redis_url or ""
    if not redis_url and not args.register_url:
        from backend.settings import load_settings

        redis_url = load_settings().redis_url
    config = NodeConfig(
        model=args.model,
        engine=args.engine,
        redis_url=redis_url,
        capacity=args.capacity,
        engine_options=options,
        worker_id=args.worker_id,
        provider_id=args.provider_id,
        heartbeat_s=args.heartbeat,
        ttl_s=args.ttl,
        grace_s=args.grace,
        register_url=args.register_url,
        token=args.token,
        tee=args.tee,
        register_wait_s=args.register_wait,
        metrics_port=metrics_port,
    )
    try:
        return asyncio.run(_serve_until_signalled(config, args.parent_pid))
    except EngineError as error:
        log.error("the engine could not start: %s", error)
        return 1
    except AttestationRefused as error:
        log.error("the backend refused this worker: %s", error)
        return 3
    except EvidenceError as error:
        log.error("no evidence can be taken on this machine: %s", error)
        return 3
    except redis_auth.TlsRefused as error:
        log.error("not connecting to Redis: %s", error)
        return 3
    except BackendUnreachable as error:
        log.error("%s: not onboarded, exiting", error)
        return 1


async def _serve_until_signalled(config: NodeConfig, parent_pid: int | None = None) -> int:
    """Run the node under SIGINT/SIGTERM handlers (and its parent's watch); the exit code."""
    shutdown = Shutdown(config.grace_s, announce=log.warning).install()
    watch: asyncio.Task[None] | None = None
    if parent_pid is not None:
        die_with_parent(signal.SIGTERM)
        watch = asyncio.create_task(watch_parent(parent_pid, shutdown))
    try:
        await run_node(config, shutdown.stop, shutdown.force)
    finally:
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        shutdown.uninstall()
    return shutdown.exit_code()


if __name__ == "__main__":
    sys.exit(main())
