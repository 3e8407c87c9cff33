"""The worker registry's and the worker node's test kit, on the real Redis: clients of the test
database (the ``aredis`` and ``sredis`` fixtures), registry entries and reserved slots, real
``python -m workers.node`` processes (the ``start_node`` fixture), and the backend's side of a
job: a request sealed and enqueued, its stream read and opened as the bot would. Its fixtures
are registered in tests/conftest.py."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nacl.public
import pytest
import redis
import redis.asyncio
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from tests.support import attest
from workers import registry, streams, wire
from workers.jobs import enqueue_job
from workers.registry import WorkerInfo
from workers.stream_crypto import StreamOpener

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def sredis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def worker_info(
    worker_id: str, *, model: str = "m", capacity: int = 4, load: int = 0
) -> WorkerInfo:
    """A registry entry of a worker with fresh keys."""
    keys = wire.WorkerKeys.generate()
    return attest.worker_info(worker_id, keys, model=model, capacity=capacity, load=load)


async def fill(aredis: redis.asyncio.Redis, worker_id: str, count: int) -> None:
    """Reserve ``count`` of the worker's slots, as dispatchers that gave it jobs would."""
    for n in range(count):
        assert await registry.reserve_slot(aredis, worker_id, f"{worker_id}-{n}", ttl_s=60)


@dataclass
class NodeProcess:
    process: subprocess.Popen[bytes]
    info: WorkerInfo
    log_path: Path

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
async def start_node(
    redis_url: str, aredis: redis.asyncio.Redis, tmp_path: Path
) -> AsyncIterator[Callable[..., object]]:
    """Start ``python -m workers.node`` and wait until it is registered."""
    started: list[NodeProcess] = []

    async def start(
        *extra: str, model: str = "echo", engine: str = "instant", ready_s: float = 30.0
    ) -> NodeProcess:
        worker_id = "t-" + uuid.uuid4().hex[:10]
        log_path = tmp_path / f"{worker_id}.log"
        command = [
            sys.executable, "-m", "workers.node", "--model", model, "--engine", engine,
            "--redis-url", redis_url, "--worker-id", worker_id, *extra,
        ]  # fmt: skip
        process = spawn(command, log_path)
        deadline = time.monotonic() + ready_s
        while time.monotonic() < deadline:
            info = await registry.get_worker(aredis, worker_id)
            if info is not None:
                node = NodeProcess(process, info, log_path)
                started.append(node)
                return node
            if process.poll() is not None:
                break
            await asyncio.sleep(0.05)
        process.kill()
        raise AssertionError(f"the node did not register:\n{log_path.read_text()}")

    yield start
    for node in started:
        if node.process.poll() is None:
            node.process.send_signal(signal.SIGINT)
            node.process.send_signal(signal.SIGINT)  # second signal: no grace period
            try:
                node.process.wait(10)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()


def spawn(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log_file:
        return subprocess.Popen(command, cwd=REPO, stdout=log_file, stderr=log_file)


@dataclass
class Submitted:
    job_id: str
    reply_key: nacl.public.PrivateKey
    worker: WorkerInfo


def submit(
    sredis: redis.Redis,
    worker: WorkerInfo,
    content: str,
    *,
    model: str | None = None,
    max_tokens: int = 100,
    timeout_s: int = 60,
    seal_to: str | None = None,
    bound: int | None = None,
) -> Submitted:
    """What the backend does: seal a request to the worker and enqueue it on its queue."""
    reply_key = wire.new_reply_keypair()
    job_id = uuid.uuid4().hex
    request = wire.JobRequest(
        job_id=job_id,
        model=model or worker.model,
        messages=[wire.ChatMessage(role="user", content=content)],
        max_tokens=max_tokens,
        reply_key=wire.public_b64(reply_key),
    )
    sealed = wire.seal_request(request, seal_to or worker.box_public_key)
    enqueue_job(
        sredis, worker.worker_id, job_id, sealed, timeout_s=timeout_s, ttl_s=60, max_tokens=bound
    )
    return Submitted(job_id, reply_key, worker)


async def events_of(
    aredis: redis.asyncio.Redis, job: Submitted, *, timeout_s: float = 20.0
) -> list[wire.Event]:
    """Read the job's stream to its end and open every event as the bot would."""
    events: list[wire.Event] = []
    opener = StreamOpener(job.reply_key, job.worker.verify_key, job.job_id)
    async for blob in streams.read_stream(
        aredis, job.job_id, first_timeout_s=timeout_s, idle_timeout_s=timeout_s
    ):
        events.append(opener.open(blob))
    return events


def text_of(events: list[wire.Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, wire.StreamChunk))


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def rq_job(sredis: redis.Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=sredis, serializer=JSONSerializer)


ENDED = {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}


async def wait_for_status(sredis: redis.Redis, job_id: str, status: JobStatus) -> Job:
    """The RQ job once it has ended (a stream's end comes before RQ writes its own), which must
    be as ``status``: waits for that event, not for a time a loaded machine may overrun."""
    while True:
        job = rq_job(sredis, job_id)
        if job.get_status() in ENDED:
            break
        await asyncio.sleep(0.05)
    assert job.get_status() == status, f"job {job_id} is {job.get_status()}, not {status}"
    return job


def max_overlap(jobs: list[Job]) -> int:
    """The most jobs that were running at the same instant, from RQ's own timestamps."""
    edges = sorted(
        [(job.started_at, 1) for job in jobs] + [(job.ended_at, -1) for job in jobs],
        key=lambda edge: (edge[0], edge[1]),
    )
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak
