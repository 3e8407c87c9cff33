"""A worker that lies, for the tests of what the backend bounds (billing, replies, deadlines).

:class:`RogueWorker` registers like a development node registered directly (keys of its own, in
the registry), takes its jobs off its own RQ queue, opens each request with its real key, and
then writes whatever sealed records it likes to the job's stream, final records signed with its
real key: everything a modified node could do on the reply path. Nothing here is kinder than such
a node: the records are valid on the wire, only their contents lie.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from dataclasses import dataclass

import nacl.public
import redis
import redis.asyncio as aioredis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from backend.settings import DEFAULT_MODEL
from workers import registry, streams
from workers.jobs import sealed_argument
from workers.registry import WorkerInfo, queue_name
from workers.wire import (
    ErrorRecord,
    FinalRecord,
    JobRequest,
    StreamChunk,
    WorkerKeys,
    open_request,
    seal_event,
)


@dataclass
class RogueJob:
    """A job the rogue took: its opened request, and how many chunks it wrote."""

    request: JobRequest
    chunks: int = 0

    @property
    def job_id(self) -> str:
        return self.request.job_id


class RogueWorker:
    """A registered worker whose stream records are written by the test."""

    def __init__(
        self,
        redis_url: str,
        *,
        provider_id: int | None = None,
        model: str = DEFAULT_MODEL,
        capacity: int = 4,
    ) -> None:
        self.keys = WorkerKeys.generate()
        self.worker_id = f"rogue-{uuid.uuid4().hex[:10]}"
        self.redis = aioredis.Redis.from_url(redis_url)
        self._sync = redis.Redis.from_url(redis_url)
        self.info = WorkerInfo(
            worker_id=self.worker_id,
            model=model,
            engine="llama-cpp",
            engine_version="0.3.36",
            box_public_key=self.keys.box_public_b64,
            verify_key=self.keys.verify_key_b64,
            capacity=capacity,
            provider_id=provider_id,
        )
        registry.register(self._sync, self.info, ttl_s=600)

    async def close(self) -> None:
        registry.unregister(self._sync, self.worker_id)
        self._sync.close()
        await self.redis.aclose()

    async def take(self, timeout_s: float = 10.0) -> RogueJob:
        """The next job off the rogue's own queue, opened with its key."""
        queue = Queue(queue_name(self.worker_id), connection=self._sync, serializer=JSONSerializer)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (job_id := queue.pop_job_id()) is None:
            if loop.time() > deadline:
                raise AssertionError("no job reached the rogue worker")
            await asyncio.sleep(0.01)
        job = Job.fetch(job_id, connection=self._sync, serializer=JSONSerializer)
        return RogueJob(open_request(sealed_argument(job), self.keys))

    async def chunk(self, job: RogueJob, text: str) -> None:
        event = StreamChunk(job_id=job.job_id, seq=job.chunks, text=text)
        job.chunks += 1
        await self._append(job, seal_event(event, job.request.reply_key))

    async def raw_entry(self, job: RogueJob, plaintext: bytes) -> None:
        """Any bytes, sealed to the job's reply key as one stream entry (no schema applied: a
        modified node is not held to the wire's limits when it writes)."""
        box = nacl.public.SealedBox(nacl.public.PublicKey(base64.b64decode(job.request.reply_key)))
        await self._append(job, box.encrypt(plaintext))

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
        await self._append(job, seal_event(record, job.request.reply_key, self.keys), last=True)

    async def error(self, job: RogueJob, code: str) -> None:
        record = ErrorRecord(job_id=job.job_id, code=code, message=code)
        await self._append(job, seal_event(record, job.request.reply_key), last=True)

    async def _append(self, job: RogueJob, sealed: bytes, *, last: bool = False) -> None:
        await streams.append(self.redis, job.job_id, sealed, last=last)
