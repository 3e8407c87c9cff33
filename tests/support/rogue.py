"""A worker that lies, for the tests of what the backend bounds and refuses (issue 12).

:class:`RogueWorker` holds keys of its own and either registers like a development node
registered directly (in the registry, with the test's Redis connection: ``RogueWorker(url)``),
or is onboarded as ``cocoon up`` onboards its node: through the onboarding HTTP API with a
one-time token and development-TEE evidence, receiving its own Redis ACL user
(:meth:`RogueWorker.onboard`; then every command it sends goes with those credentials). It takes
its jobs off its own RQ queue, opens each request with its real key, and writes whatever sealed
records it likes to the job's stream, final records signed with its real key: everything a
modified node could do on the reply path. With its own credentials it also tries what a
modified node could try on shared state: editing or flooding the worker index
(:meth:`index_edits`, :meth:`flood_index`), scripts (:meth:`script_attempts`), another
database (:meth:`select`), and a capacity of its own choosing (:meth:`advertise`). Nothing here
is kinder than such a node: the records are valid on the wire, only their contents lie.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nacl.public
import nacl.signing
import redis
import redis.asyncio as aioredis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from backend.settings import DEFAULT_MODEL
from workers import registry, streams
from workers.evidence import Registration, register_with_backend
from workers.jobs import sealed_argument
from workers.registry import WorkerInfo, queue_name
from workers.stream_crypto import StreamSealer
from workers.wire import (
    WIRE_VERSION,
    ErrorRecord,
    FinalRecord,
    JobRequest,
    StreamChunk,
    WorkerKeys,
    open_request,
)

BUSY_LOOP = (
    "local t0 = redis.call('TIME')[1] "
    "while tonumber(redis.call('TIME')[1]) - t0 < tonumber(ARGV[1]) do end return 1"
)
"""A script that keeps Redis busy for ARGV[1] seconds: every other client gets ``BUSY``."""


@dataclass
class RogueJob:
    """A job the rogue took: its opened request, and how many chunks it wrote."""

    request: JobRequest
    chunks: int = 0
    sealer: StreamSealer | None = None  # the job's stream key, made at its first entry

    @property
    def job_id(self) -> str:
        return self.request.job_id

    @property
    def words(self) -> list[str]:
        """The last user message's words: what the instant engine echoes."""
        last = next((m.content for m in reversed(self.request.messages) if m.role == "user"), "")
        return last.split()


def instant_claims(keys: WorkerKeys, model: str) -> dict[str, Any]:
    """What an unmodified node running the instant engine claims (less the nonce)."""
    return {
        "box_public_key": keys.box_public_b64,
        "verify_key": keys.verify_key_b64,
        "model": model,
        "model_sha256": "",
        "engine": "instant",
        "engine_version": "1",
        "engine_config": {"token_delay": 0.0},
        "worker_version": "0.1.0",
    }


class RogueWorker:
    """A worker whose stream records (and Redis commands) are written by the test."""

    def __init__(
        self,
        redis_url: str,
        *,
        provider_id: int | None = None,
        model: str = DEFAULT_MODEL,
        capacity: int = 4,
        keys: WorkerKeys | None = None,
        registration: Registration | None = None,
    ) -> None:
        """Without ``registration``: a development worker registered directly, indexed with the
        connection of ``redis_url``. With it: an onboarded worker whose ``redis_url`` carries
        its own ACL user; it writes its entry only when it :meth:`advertise`\\ s."""
        self.keys = keys or WorkerKeys.generate()
        self.registration = registration
        self.worker_id = (
            registration.worker_id if registration else f"rogue-{uuid.uuid4().hex[:10]}"
        )
        self.redis_url = redis_url
        self.redis = aioredis.Redis.from_url(redis_url)
        self.sync = redis.Redis.from_url(redis_url)
        self.info = WorkerInfo(
            worker_id=self.worker_id,
            model=model,
            engine="instant" if registration else "llama-cpp",
            engine_version="1" if registration else "0.3.36",
            box_public_key=self.keys.box_public_b64,
            verify_key=self.keys.verify_key_b64,
            capacity=capacity,
            provider_id=provider_id,
        )
        self.taken: list[RogueJob] = []
        self.closed = False
        if registration is None:
            registry.register(self.sync, self.info, ttl_s=600)

    @classmethod
    async def onboard(
        cls,
        register_url: str,
        token: str,
        *,
        model: str = DEFAULT_MODEL,
        capacity: int = 4,
        claims: dict[str, Any] | None = None,
        advertise: bool = True,
    ) -> RogueWorker:
        """Onboard through the backend's HTTP API as ``cocoon up``'s node does (nonce,
        development-TEE evidence over the instant engine's claims with ``claims`` changed,
        register), then, with ``advertise``, write its own registry entry. Raises
        :class:`workers.evidence.AttestationRefused` when the backend refuses it."""
        keys = WorkerKeys.generate()
        registration = await register_with_backend(
            register_url,
            token,
            {**instant_claims(keys, model), **(claims or {})},
            keys.box_key,
            tee="dev",
            dev_key=nacl.signing.SigningKey.generate(),
        )
        rogue = cls(
            registration.redis_url,
            model=model,
            capacity=capacity,
            keys=keys,
            registration=registration,
        )
        if advertise:
            rogue.advertise()
        return rogue

    @property
    def onboarded(self) -> bool:
        return self.registration is not None

    def advertise(self, **claims: Any) -> None:
        """Write its own registry entry (as a node's registration does), claiming ``claims``
        (``capacity=10**9``, ``load=0``, ...) over its info."""
        info = self.info.model_copy(update=claims)
        registry.register(self.sync, info, ttl_s=600, shared=not self.onboarded)

    async def close(self) -> None:
        """Leave (its entry removed, with its own credentials) and close its connections."""
        if self.closed:
            return
        self.closed = True
        try:
            registry.unregister(self.sync, self.worker_id, shared=not self.onboarded)
        except redis.RedisError:
            if not self.onboarded:  # its user may be gone (revoked, Redis restarted): only then
                raise
        self.sync.close()
        await self.redis.aclose()

    # -- the reply path -------------------------------------------------------------------------

    async def take(self, timeout_s: float | None = None) -> RogueJob:
        """The next job off the rogue's own queue, opened with its key. It waits for that job
        however long a loaded machine takes to dispatch it (the test's own timeout bounds a
        job that never comes); ``timeout_s``: an AssertionError after that long instead."""
        queue = Queue(queue_name(self.worker_id), connection=self.sync, serializer=JSONSerializer)
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while (job_id := self.sync.lpop(queue.key)) is None:  # RQ's pop_job_id, empty or not
            if deadline is not None and loop.time() > deadline:
                raise AssertionError("no job reached the rogue worker")
            await asyncio.sleep(0.01)
        job = Job.fetch(job_id.decode(), connection=self.sync, serializer=JSONSerializer)
        taken = RogueJob(open_request(sealed_argument(job), self.keys))
        self.taken.append(taken)
        return taken

    async def serve(
        self, behaviour: Callable[[RogueWorker, RogueJob], Awaitable[None]], stop: asyncio.Event
    ) -> None:
        """Take every job that reaches the rogue until ``stop`` is set, each handled by
        ``behaviour`` in a task of its own; then wait for those tasks. Redis away (a restart)
        only pauses it, as it pauses a node."""
        running: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                try:
                    job = await self.take(timeout_s=0.2)
                except AssertionError:
                    continue
                except redis.RedisError:
                    await asyncio.sleep(0.1)
                    continue
                task = asyncio.create_task(behaviour(self, job))
                running.add(task)
                task.add_done_callback(self._forget)
                task.add_done_callback(running.discard)
        finally:
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    @staticmethod
    def _forget(task: asyncio.Task[None]) -> None:
        """A job it could not finish (Redis away) is abandoned, as a crashed node abandons it."""
        if not task.cancelled():
            task.exception()

    async def answer_honestly(self, job: RogueJob) -> None:
        """Answer as the instant engine would: the words echoed, the usage as it counts it."""
        echoed = job.words[: job.request.max_tokens]
        for index, word in enumerate(echoed):
            await self.chunk(job, word if index == 0 else " " + word)
        prompt = sum(len(m.content.split()) for m in job.request.messages)
        finish = "length" if len(job.words) > len(echoed) else "stop"
        await self.final(
            job, prompt_tokens=prompt, completion_tokens=len(echoed), finish_reason=finish
        )

    async def cancel_requested(self, job: RogueJob) -> bool:
        """Whether the backend asked this job to stop (read with the rogue's own credentials)."""
        return bool(await streams.is_cancel_requested(self.redis, job.job_id))

    async def chunk(self, job: RogueJob, text: str, *, seq: int | None = None) -> None:
        """The next chunk of the reply, numbered in order unless ``seq`` says otherwise."""
        event = StreamChunk(job_id=job.job_id, seq=job.chunks if seq is None else seq, text=text)
        job.chunks += 1
        await self._append(job, self.sealer_of(job).seal(event))

    async def raw_entry(self, job: RogueJob, plaintext: bytes) -> None:
        """Any bytes, sealed to the job's reply key as one stream entry (no schema applied: a
        modified node is not held to the wire's limits when it writes)."""
        await self._append(job, self.sealer_of(job).seal_payload(plaintext))

    async def oversized_chunk(self, job: RogueJob, size: int) -> None:
        """One chunk carrying ``size`` bytes of text: past the wire's own limit."""
        chunk = {"v": WIRE_VERSION, "type": "chunk", "job_id": job.job_id, "seq": job.chunks}
        job.chunks += 1
        await self.raw_entry(job, json.dumps({**chunk, "text": "x" * size}).encode())

    async def final(
        self,
        job: RogueJob,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int = 0,
        finish_reason: str = "stop",
    ) -> None:
        record = FinalRecord(
            job_id=job.job_id,
            prompt_tokens=prompt_tokens,
            cached_prompt_tokens=cached_prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish_reason,  # type: ignore[arg-type]
        )
        await self._append(job, self.sealer_of(job).seal(record), last=True)

    async def error(self, job: RogueJob, code: str) -> None:
        record = ErrorRecord(job_id=job.job_id, code=code, message=code)
        await self._append(job, self.sealer_of(job).seal(record), last=True)

    def sealer_of(self, job: RogueJob) -> StreamSealer:
        """The job's stream key (the rogue's own keys), made at its first entry."""
        if job.sealer is None:
            job.sealer = StreamSealer(job.job_id, job.request.reply_key, self.keys)
        return job.sealer

    async def _append(self, job: RogueJob, sealed: bytes, *, last: bool = False) -> None:
        await streams.append(self.redis, job.job_id, sealed, last=last)

    # -- shared state, with the rogue's own credentials -------------------------------------------

    def index_edits(self, victim: str) -> dict[str, Callable[[], object]]:
        """Each way a worker could take ``victim`` out of dispatch or corrupt the registry."""
        client = self.sync
        return {
            "ZREM the victim from the index": lambda: client.zrem(registry.INDEX_KEY, victim),
            "DEL the index": lambda: client.delete(registry.INDEX_KEY),
            "unregister the victim": lambda: registry.unregister(client, victim),
            "DEL the victim's entry": lambda: client.delete(registry.worker_key(victim)),
            "expire the victim's entry": lambda: client.expire(registry.worker_key(victim), 1),
            "DEL the victim's record": lambda: client.delete(registry.attestation_key(victim)),
            "fill the victim's slots": lambda: client.zadd(
                registry.slots_key(victim), {f"x{n}": 2e9 for n in range(64)}
            ),
            "ZADD a made-up id": lambda: client.zadd(registry.INDEX_KEY, {"w-0000000000000000": 1}),
        }

    def flood_index(self, count: int, batch: int = 10_000) -> None:
        """ZADD ``count`` bogus ids to the worker index, ``batch`` per command, pipelined."""
        pipe = self.sync.pipeline(transaction=False)
        for start in range(0, count, batch):
            ids = {f"bogus-{n}": 0 for n in range(start, min(count, start + batch))}
            pipe.zadd(registry.INDEX_KEY, ids)
        pipe.execute()

    def script_attempts(self, busy_s: int = 8) -> dict[str, Callable[[], object]]:
        """Each way of running a script: one that would keep Redis busy ``busy_s`` seconds."""
        client = self.sync
        return {
            "EVAL a busy loop": lambda: client.eval(BUSY_LOOP, 0, busy_s),
            "EVAL_RO a busy loop": lambda: client.execute_command("EVAL_RO", BUSY_LOOP, 0, busy_s),
            "EVALSHA": lambda: client.evalsha("a" * 40, 0),
            "SCRIPT LOAD": lambda: client.script_load(BUSY_LOOP),
            "FUNCTION LOAD": lambda: client.execute_command(
                "FUNCTION",
                "LOAD",
                "#!lua name=rogue\nredis.register_function('f', function() return 1 end)",
            ),
            "FCALL": lambda: client.execute_command("FCALL", "f", 0),
        }

    def select(self, db: int) -> object:
        """SELECT ``db`` on the rogue's connection."""
        return self.sync.execute_command("SELECT", db)

    def other_database(self, db: int) -> redis.Redis:
        """A client with the rogue's credentials for database ``db``."""
        from urllib.parse import urlsplit, urlunsplit

        return redis.Redis.from_url(urlunsplit(urlsplit(self.redis_url)._replace(path=f"/{db}")))

    @contextlib.contextmanager
    def keep_trying(self, attack: Callable[[], object]) -> Any:
        """Run ``attack`` again and again in a thread while the block runs; yields the list of
        its outcomes (``"allowed"`` or the error's class name)."""
        import threading

        outcomes: list[str] = []
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    attack()
                    outcomes.append("allowed")
                except redis.RedisError as error:
                    outcomes.append(type(error).__name__)
                stop.wait(0.02)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield outcomes
        finally:
            stop.set()
            thread.join(10)
