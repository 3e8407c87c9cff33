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

Per job: open the sealed request with the node's key (a request that cannot be opened fails the
RQ job: there is no reply key to answer to), check the model, stream each text delta as a sealed
:class:`~workers.wire.StreamChunk` (``seq`` 0, 1, 2, ...), then the signed
:class:`~workers.wire.FinalRecord`, sealed to the reply key. An engine error ends the stream with
an :class:`~workers.wire.ErrorRecord` instead.

Stopping a job. A cancel request (:func:`workers.streams.request_cancel`) closes the generation
at once and ends the stream with a FinalRecord ``finish_reason="cancelled"`` counting the tokens
streamed so far (they were generated: they are billed). When the node itself stops a job
(shutdown, or the RQ job timeout), the rule is: before the first chunk, an ErrorRecord
(``worker_shutdown`` / ``job_timeout``: nothing was delivered, the dispatcher may retry
elsewhere); after it, a FinalRecord ``"cancelled"`` with the tokens so far.

Shutdown (SIGTERM or SIGINT): unregister at once (no dispatcher picks the node any more), stop
dequeuing, reject the jobs still waiting in the queue with ErrorRecord ``worker_shutdown`` (so
their dispatchers retry elsewhere without waiting for a timeout), let running jobs finish for up
to ``--grace`` seconds (default 30), then stop the rest as above. A second signal ends the grace
period at once.

Logs carry job ids, durations and token counts: never prompt or reply text, never keys.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError
from rq import Queue
from rq.executions import Execution
from rq.job import Job

from workers import registry, streams
from workers.engines import Engine, EngineError, GenerationRequest, TextDelta, Usage, create_engine
from workers.jobs import JobBook, sealed_argument
from workers.wire import (
    ErrorRecord,
    Event,
    FinalRecord,
    JobRequest,
    StreamChunk,
    WireError,
    WorkerKeys,
    open_request,
    seal_event,
)

__all__ = ["Node", "NodeConfig", "main", "run_node"]

log = logging.getLogger("cocoon.worker")

T = TypeVar("T")

DEQUEUE_BLOCK_S = 1
"""One blocking dequeue waits this long, so a stop request is noticed within a second."""

RQ_HEARTBEAT_S = 15.0
BOOK_THREADS = 8


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


@dataclass(eq=False)
class _Running:
    """One job the node has taken, from dequeue to its last stream entry."""

    job: Job
    started: float = field(default_factory=time.monotonic)
    execution: Execution | None = None
    deltas: int = 0  # text pieces the engine produced (its tokens, near enough)
    chunks: int = 0  # sealed chunks written (deltas are merged while a write is in flight)
    unsent: list[str] = field(default_factory=list)
    stop_reason: str | None = None  # "cancel", "shutdown" or "timeout"
    generation: asyncio.Task[Usage] | None = None
    writer: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    detail: str  # RQ's failure reason (no payload text), or the finish reason
    usage: Usage | None = None


class Node:
    """A running worker node. Build with a started engine, then ``await serve(stop)``."""

    def __init__(self, config: NodeConfig, engine: Engine, keys: WorkerKeys | None = None) -> None:
        self.config = config
        self.engine = engine
        self.keys = keys or WorkerKeys.generate()
        self.worker_id = config.worker_id or f"w-{self.keys.fingerprint()}"
        self.capacity = max(1, min(config.capacity, engine.max_concurrency))
        self.peak_load = 0
        self._running: dict[str, _Running] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = False
        self._load_changed = asyncio.Event()
        self._force = asyncio.Event()

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

    def force_stop(self) -> None:
        """End the shutdown grace period now."""
        self._force.set()

    # -- lifecycle -------------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve jobs until ``stop`` is set, then shut down gracefully (see the module doc)."""
        self._sync = redis.Redis.from_url(self.config.redis_url)
        # One connection per job writing a chunk, plus the heartbeat and the cancel watch.
        self._redis = AsyncRedis.from_url(self.config.redis_url, max_connections=self.capacity + 16)
        self._book = JobBook(self._sync, self.worker_id)
        self._book_pool = ThreadPoolExecutor(BOOK_THREADS, thread_name_prefix="rq-book")
        self._dequeue_pool = ThreadPoolExecutor(1, thread_name_prefix="rq-dequeue")
        self._slots = asyncio.Semaphore(self.capacity)
        background: list[asyncio.Task[None]] = []
        try:
            await self._in_thread(self._book.register_birth)
            await registry.register(self._redis, self.info(), self.config.ttl_s)
            self._accepting = True
            watching = asyncio.Event()
            background = [
                asyncio.create_task(self._heartbeat_loop()),
                asyncio.create_task(
                    streams.watch_cancels(self._redis, self._on_cancel, ready=watching)
                ),
            ]
            await asyncio.wait_for(watching.wait(), 10)
            dequeuer = asyncio.create_task(self._dequeue_loop())
            log.info(
                "worker %s ready: model=%s engine=%s %s capacity=%d keys=%s (tee=dev)",
                self.worker_id,
                self.engine.model,
                self.engine.name,
                self.engine.version,
                self.capacity,
                self.keys.fingerprint(),
            )
            await stop.wait()
            await self._shut_down(dequeuer)
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
        await registry.unregister(self._redis, self.worker_id)
        dequeuer.cancel()
        await asyncio.gather(dequeuer, return_exceptions=True)
        rejected = 0
        while (
            job := await self._in_thread(self._book.dequeue, None, pool=self._dequeue_pool)
        ) is not None:
            await self._reject(job)
            rejected += 1
        if rejected:
            log.info("rejected %d queued jobs (worker_shutdown)", rejected)
        if self._tasks:
            force = asyncio.create_task(self._force.wait())
            await asyncio.wait([*self._tasks, force], timeout=self.config.grace_s)
            force.cancel()
        for running in list(self._running.values()):
            self._stop(running, "shutdown")
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
                    await registry.register(self._redis, self.info(), self.config.ttl_s)
                for job_id in await streams.cancelled_among(self._redis, list(self._running)):
                    self._on_cancel(job_id)
                if time.monotonic() - last_rq >= RQ_HEARTBEAT_S:
                    last_rq = time.monotonic()
                    executions = [
                        (r.job, r.execution) for r in self._running.values() if r.execution
                    ]
                    await self._in_thread(self._book.heartbeat, executions, bool(executions))
            except RedisError as error:
                log.warning("heartbeat failed: %s", error)
            self._load_changed.clear()
            try:
                await asyncio.wait_for(self._load_changed.wait(), self.config.heartbeat_s)
            except TimeoutError:
                continue
            await asyncio.sleep(0.05)  # report a burst of changes once

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
        running = _Running(job)
        self._running[job.id] = running
        self.peak_load = max(self.peak_load, self.load)
        self._load_changed.set()
        outcome = _Outcome(False, "internal error")
        try:
            running.execution = await self._in_thread(self._book.start, job)
            outcome = await self._handle(running)
        except Exception as error:
            log.exception("job %s: %s", job.id, type(error).__name__)
            outcome = _Outcome(False, f"internal error ({type(error).__name__})")
        finally:
            del self._running[job.id]
            self._slots.release()
            self._load_changed.set()
            await self._record(running, outcome)

    async def _record(self, running: _Running, outcome: _Outcome) -> None:
        job = running.job
        elapsed = time.monotonic() - running.started
        try:
            await registry.release_slot(self._redis, self.worker_id, job.id)
            if outcome.ok:
                usage = outcome.usage
                result = {
                    "finish_reason": outcome.detail,
                    "prompt_tokens": usage.prompt_tokens if usage else 0,
                    "completion_tokens": usage.completion_tokens if usage else running.deltas,
                }
                await self._in_thread(self._book.finish, job, running.execution, result)
            else:
                await self._in_thread(self._book.fail, job, running.execution, outcome.detail)
        except RedisError as error:
            log.error("job %s: could not record its outcome in RQ: %s", job.id, error)
        if outcome.ok and outcome.usage:
            log.info(
                "job %s %s in %.3fs: %d prompt (%d cached) + %d completion tokens, %d chunks",
                job.id,
                outcome.detail,
                elapsed,
                outcome.usage.prompt_tokens,
                outcome.usage.cached_prompt_tokens,
                outcome.usage.completion_tokens,
                running.chunks,
            )
        else:
            log.info("job %s failed in %.3fs: %s", job.id, elapsed, outcome.detail)

    async def _handle(self, running: _Running) -> _Outcome:
        job = running.job
        request = self._open(job)
        if isinstance(request, _Outcome):
            return request
        if request.model != self.engine.model:
            message = f"this worker serves {self.engine.model!r}, not {request.model!r}"
            await self._send(
                request, ErrorRecord(job_id=job.id, code="wrong_model", message=message)
            )
            return _Outcome(False, "wrong model")
        if await streams.is_cancel_requested(self._redis, job.id):
            self._stop(running, "cancel")
        if running.stop_reason is None:
            running.generation = asyncio.create_task(self._generate(running, request))
            done, _ = await asyncio.wait({running.generation}, timeout=_time_left(running))
            if not done:
                self._stop(running, "timeout")
                await asyncio.wait({running.generation})
        if running.writer is not None:
            await running.writer  # a Redis error here fails the job
        await self._write_unsent(running, request)
        return await self._conclude(running, request)

    def _open(self, job: Job) -> JobRequest | _Outcome:
        try:
            request = open_request(sealed_argument(job), self.keys)
        except (ValueError, WireError) as error:  # WireError messages never quote the payload
            return _Outcome(False, f"cannot open the request: {error}")
        except Exception as error:  # job data RQ could not deserialize
            return _Outcome(False, f"cannot read the job: {type(error).__name__}")
        if request.job_id != job.id:
            return _Outcome(False, "the sealed request belongs to another job id")
        return request

    async def _generate(self, running: _Running, request: JobRequest) -> Usage:
        sampling = request.sampling
        generation = self.engine.generate(
            GenerationRequest(
                messages=[message.model_dump() for message in request.messages],
                max_tokens=request.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                stop=tuple(sampling.stop),
                seed=sampling.seed,
            )
        )
        usage: Usage | None = None
        try:
            async for item in generation:
                if isinstance(item, Usage):
                    usage = item
                elif isinstance(item, TextDelta) and item.text:
                    running.deltas += 1
                    running.unsent.append(item.text)
                    self._ensure_writer(running, request)
        finally:
            aclose = getattr(generation, "aclose", None)
            if aclose is not None:
                await aclose()
        if usage is None:
            raise EngineError("the engine ended without reporting token usage")
        return usage

    def _ensure_writer(self, running: _Running, request: JobRequest) -> None:
        """Start writing the unsent text unless a write is already under way.

        The engine never waits for Redis: deltas that arrive while a chunk is being written are
        merged into the next chunk, so a busy node writes fewer, longer chunks. The writer is
        its own task, so stopping the generation never cuts a write in half.
        """
        writer = running.writer
        if writer is not None and writer.done() and writer.exception() is not None:
            raise writer.exception()  # type: ignore[misc]
        if writer is None or writer.done():
            running.writer = asyncio.create_task(self._write_unsent(running, request))

    async def _write_unsent(self, running: _Running, request: JobRequest) -> None:
        while running.unsent:
            text = "".join(running.unsent)
            running.unsent.clear()
            chunk = StreamChunk(job_id=request.job_id, seq=running.chunks, text=text)
            running.chunks += 1
            await self._send(request, chunk)

    async def _conclude(self, running: _Running, request: JobRequest) -> _Outcome:
        job_id = request.job_id
        task = running.generation
        if task is not None and not task.cancelled() and task.exception() is None:
            usage = task.result()
            await self._send(request, _final(job_id, usage))
            return _Outcome(True, usage.finish_reason, usage)
        reason = running.stop_reason
        if reason is None:  # the engine failed
            assert task is not None
            error = task.exception()
            log.warning("job %s: engine error %s", job_id, type(error).__name__)
            message = str(error) if isinstance(error, EngineError) else "the engine failed"
            record = ErrorRecord(job_id=job_id, code="engine_error", message=message[:4096])
            await self._send(request, record)
            return _Outcome(False, f"engine error ({type(error).__name__})")
        if reason != "cancel" and running.deltas == 0:
            code = "worker_shutdown" if reason == "shutdown" else "job_timeout"
            what = "the worker is shutting down" if reason == "shutdown" else "the job timed out"
            await self._send(request, ErrorRecord(job_id=job_id, code=code, message=what))
            return _Outcome(False, f"{code}: stopped before the first token")
        usage = Usage(0, 0, running.deltas, "cancelled")
        await self._send(request, _final(job_id, usage))
        if reason == "cancel":
            return _Outcome(True, "cancelled", usage)
        return _Outcome(False, f"{reason}: stopped after {running.deltas} tokens")

    async def _reject(self, job: Job) -> None:
        """Refuse a job that was never started (the node is shutting down)."""
        request = self._open(job)
        try:
            if isinstance(request, JobRequest):
                record = ErrorRecord(
                    job_id=job.id, code="worker_shutdown", message="the worker is shutting down"
                )
                await self._send(request, record)
            await registry.release_slot(self._redis, self.worker_id, job.id)
            await self._in_thread(self._book.fail, job, None, "worker_shutdown: never started")
        except RedisError as error:
            log.error("job %s: could not reject it: %s", job.id, error)

    async def _send(self, request: JobRequest, event: Event) -> None:
        sealed = seal_event(event, request.reply_key, self.keys)
        last = not isinstance(event, StreamChunk)
        await streams.append(self._redis, request.job_id, sealed, last=last)

    # -- stopping jobs ---------------------------------------------------------------------------

    def _on_cancel(self, job_id: str) -> None:
        running = self._running.get(job_id)
        if running is not None:
            self._stop(running, "cancel")

    def _stop(self, running: _Running, reason: str) -> None:
        if running.stop_reason is None:
            running.stop_reason = reason
            log.info("job %s: stopping (%s)", running.job.id, reason)
        if running.generation is not None:
            running.generation.cancel()

    async def _in_thread(self, func: Callable[..., T], *args: Any, pool: Any = None) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool or self._book_pool, func, *args)


def _time_left(running: _Running) -> float | None:
    """Seconds left of the RQ job timeout (None: no limit, RQ's ``-1``)."""
    timeout = running.job.timeout
    if timeout is None:
        timeout = Queue.DEFAULT_TIMEOUT
    if timeout < 0:
        return None
    return max(0.001, timeout - (time.monotonic() - running.started))


def _final(job_id: str, usage: Usage) -> FinalRecord:
    return FinalRecord(
        job_id=job_id,
        prompt_tokens=usage.prompt_tokens,
        cached_prompt_tokens=min(usage.cached_prompt_tokens, usage.prompt_tokens),
        completion_tokens=usage.completion_tokens,
        finish_reason=usage.finish_reason,  # type: ignore[arg-type]
    )


# -- process entry points ------------------------------------------------------------------------


async def run_node(
    config: NodeConfig, stop: asyncio.Event, node_ready: Callable[[Node], None] | None = None
) -> None:
    """Load the engine once, then serve until ``stop`` is set."""
    engine = create_engine(config.engine, config.model, **dict(config.engine_options))
    started = time.monotonic()
    await engine.start()
    log.info("engine %s loaded in %.1fs", engine, time.monotonic() - started)
    try:
        node = Node(config, engine)
        if node_ready is not None:
            node_ready(node)
        await node.serve(stop)
    finally:
        await engine.close()


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
    parser.add_argument("--redis-url", help="default: COCOON_REDIS_URL / settings")
    parser.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="engine keyword argument (repeatable)",
    )
    parser.add_argument("--worker-id", help="default: w-<key fingerprint>")
    parser.add_argument("--provider-id", type=int, help="Cocoon user id of the provider")
    parser.add_argument("--grace", type=float, default=30.0, help="shutdown grace, seconds")
    parser.add_argument("--heartbeat", type=float, default=2.0, help="seconds between heartbeats")
    parser.add_argument("--ttl", type=int, default=registry.DEFAULT_TTL_S, help="registry TTL, s")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``cocoon worker`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        options = parse_engine_options(args.engine_option)
    except ValueError as error:
        parser.error(str(error))
    redis_url = args.redis_url
    if redis_url is None:
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
    )
    try:
        asyncio.run(_serve_until_signalled(config))
    except EngineError as error:
        log.error("the engine could not start: %s", error)
        return 1
    return 0


async def _serve_until_signalled(config: NodeConfig) -> None:
    stop = asyncio.Event()
    nodes: list[Node] = []

    def on_signal() -> None:
        if stop.is_set():
            for node in nodes:
                node.force_stop()
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    await run_node(config, stop, nodes.append)


if __name__ == "__main__":
    sys.exit(main())
