"""The worker registry and the worker node, on the real Redis with real node processes.

Queue mechanics run on the ``instant`` engine (no model); one test runs the real llama-cpp model.
"""

from __future__ import annotations

import asyncio
import os
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
from rq import Queue, Worker
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from tests.support import attest
from workers import registry, streams, wire
from workers.jobs import enqueue_job
from workers.registry import WorkerInfo, queue_name
from workers.stream_crypto import StreamOpener

REPO = Path(__file__).resolve().parent.parent
CANARY = "zebra-canary-7f3a"


# -- helpers ---------------------------------------------------------------------------------


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


async def wait_for_status(sredis: redis.Redis, job_id: str, status: JobStatus) -> Job:
    for _ in range(100):
        job = rq_job(sredis, job_id)
        if job.get_status() == status:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} is {job.get_status()}, not {status}")


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


# -- the registry ----------------------------------------------------------------------------


def worker_info(
    worker_id: str, *, model: str = "m", capacity: int = 4, load: int = 0
) -> WorkerInfo:
    keys = wire.WorkerKeys.generate()
    return attest.worker_info(worker_id, keys, model=model, capacity=capacity, load=load)


async def reserve(aredis, worker_id: str, slots: int) -> None:
    for n in range(slots):
        assert await registry.reserve_slot(aredis, worker_id, f"{worker_id}-{n}", ttl_s=60)


async def test_pick_worker_prefers_least_loaded_then_sticky_and_skips_dead_and_full(aredis):
    await registry.register(aredis, worker_info("busy"), ttl_s=10)
    await registry.register(aredis, worker_info("idle"), ttl_s=10)
    await registry.register(aredis, worker_info("full"), ttl_s=10)
    await registry.register(aredis, worker_info("dead", load=0), ttl_s=1)
    await registry.register(aredis, worker_info("other-model", model="x"), ttl_s=10)
    # Load is the backend's own count of the jobs it gave each worker (capacity 4).
    await reserve(aredis, "busy", 3)
    await reserve(aredis, "idle", 1)
    await reserve(aredis, "full", 4)
    await asyncio.sleep(1.2)  # "dead" misses its heartbeat

    assert {w.worker_id for w in await registry.list_workers(aredis, "m")} == {
        "busy",
        "idle",
        "full",
    }
    assert (await registry.pick_worker(aredis, "m")).worker_id == "idle"
    assert await registry.get_worker(aredis, "dead") is None

    await registry.remember_route(aredis, "conv-1", "busy", ttl_s=60)
    picked = await registry.pick_worker(aredis, "m", conversation_id="conv-1")
    assert picked.worker_id == "busy"  # sticky: its prefix cache has the conversation
    # A sticky worker that is full, dead or excluded is passed over for the least loaded.
    await registry.remember_route(aredis, "conv-2", "full", ttl_s=60)
    assert (await registry.pick_worker(aredis, "m", conversation_id="conv-2")).worker_id == "idle"
    await registry.remember_route(aredis, "conv-3", "dead", ttl_s=60)
    assert (await registry.pick_worker(aredis, "m", conversation_id="conv-3")).worker_id == "idle"
    picked = await registry.pick_worker(aredis, "m", conversation_id="conv-1", exclude=["busy"])
    assert picked.worker_id == "idle"
    assert await registry.pick_worker(aredis, "m", exclude=["idle", "busy"]) is None
    assert await registry.pick_worker(aredis, "no-such-model") is None


async def test_reservations_move_the_pick_and_a_reported_load_does_not(aredis):
    await registry.register(aredis, worker_info("a", load=0), ttl_s=10)
    await registry.register(aredis, worker_info("b", load=0), ttl_s=10)
    await reserve(aredis, "b", 2)
    assert (await registry.pick_worker(aredis, "m")).worker_id == "a"
    # What a node reports is shown, not trusted: reporting itself idle wins it nothing.
    assert await registry.heartbeat(aredis, "b", 0, 10) is True
    assert await registry.heartbeat(aredis, "a", 4, 10) is True
    assert (await registry.pick_worker(aredis, "m")).worker_id == "a"
    await reserve(aredis, "a", 3)
    assert (await registry.pick_worker(aredis, "m")).worker_id == "b"


async def test_slot_reservations_stop_two_dispatchers_overfilling_a_worker(aredis):
    await registry.register(aredis, worker_info("only", capacity=3), ttl_s=10)
    # Ten dispatchers race for three slots; the reported load (0) is stale for all of them.
    picks = await asyncio.gather(
        *(registry.pick_worker(aredis, "m", job_id=f"job-{i}") for i in range(10))
    )
    assert sum(pick is not None for pick in picks) == 3
    info = await registry.get_worker(aredis, "only")
    assert info.reserved == 3 and not info.has_room

    await registry.release_slot(aredis, "only", "job-0")
    assert await registry.reserve_slot(aredis, "only", "job-new", ttl_s=60) is True
    assert await registry.reserve_slot(aredis, "only", "job-more", ttl_s=60) is False
    # Slots of jobs that never ran expire on their own.
    await registry.release_slot(aredis, "only", "job-new")
    assert await registry.reserve_slot(aredis, "only", "short", ttl_s=0.2) is True
    assert await registry.reserve_slot(aredis, "only", "job-more", ttl_s=60) is False
    await asyncio.sleep(0.3)
    assert await registry.reserve_slot(aredis, "only", "job-more", ttl_s=60) is True
    assert await registry.reserve_slot(aredis, "gone", "job-x", ttl_s=60) is False


def test_heartbeat_never_resurrects_an_unregistered_worker(sredis):
    registry.register(sredis, worker_info("w1"), ttl_s=10)
    assert registry.heartbeat(sredis, "w1", 2, 10) is True
    registry.unregister(sredis, "w1")
    assert registry.heartbeat(sredis, "w1", 2, 10) is False
    assert not sredis.exists(registry.worker_key("w1"))


# -- the node --------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_job_streams_sealed_chunks_then_a_signed_final(start_node, aredis, sredis):
    node = await start_node()
    assert node.info.tee == "dev" and node.info.capacity == 64
    job = submit(sredis, node.info, "hello sealed world")

    events = await events_of(aredis, job)

    chunks, final = events[:-1], events[-1]
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert text_of(events) == "hello sealed world"
    assert isinstance(final, wire.FinalRecord)
    assert (final.completion_tokens, final.finish_reason) == (3, "stop")
    # The stream is signed by the key the node registered, and by no other.
    blob = (await aredis.xrange(streams.stream_key(job.job_id)))[0][1][b"d"]
    other = wire.WorkerKeys.generate().verify_key_b64
    with pytest.raises(wire.WireError, match="not signed by the worker"):
        StreamOpener(job.reply_key, other, job.job_id).open(blob)

    # RQ tells the truth: finished by this node, result without text.
    rq = await wait_for_status(sredis, job.job_id, JobStatus.FINISHED)
    assert rq.worker_name == node.worker_id
    assert (rq.timeout, rq.ttl, rq.func_name) == (60, 60, "workers.jobs.run_job")
    assert rq.return_value() == {
        "finish_reason": "stop",
        "prompt_tokens": 3,
        "completion_tokens": 3,
    }
    queue = Queue(queue_name(node.worker_id), connection=sredis, serializer=JSONSerializer)
    assert job.job_id in queue.finished_job_registry.get_job_ids()
    assert queue.started_job_registry.get_job_ids() == []
    # Listed in its queue's worker set (RQ's global one is shared: no worker writes it).
    assert node.worker_id in [w.name for w in Worker.all(queue=queue)]


@pytest.mark.slow
async def test_sixty_jobs_run_concurrently(start_node, aredis, sredis):
    # A heartbeat (with the node's load) every 0.1 s: several while the jobs, >= 0.5 s each,
    # run together, however fast or slow the machine is.
    node = await start_node("--heartbeat", "0.1", "--engine-option", "token_delay=0.02")
    submitted = [submit(sredis, node.info, words(25)) for _ in range(60)]

    observed_load = 0

    async def watch_load() -> None:
        nonlocal observed_load
        while True:
            info = await registry.get_worker(aredis, node.worker_id)
            observed_load = max(observed_load, info.load if info else 0)
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch_load())
    results = await asyncio.gather(*(events_of(aredis, job) for job in submitted))
    watcher.cancel()

    for events in results:
        assert [e.seq for e in events[:-1]] == list(range(len(events) - 1))
        assert text_of(events) == words(25)
        assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == 25
    jobs = [await wait_for_status(sredis, job.job_id, JobStatus.FINISHED) for job in submitted]
    # Each job takes >= 0.5 s (25 words, 20 ms apart): serially that would be 30 s.
    assert max_overlap(jobs) >= 30
    assert observed_load > 1


@pytest.mark.slow
async def test_a_full_node_takes_no_more_jobs_than_its_capacity(start_node, aredis, sredis):
    node = await start_node("--capacity", "2", "--engine-option", "token_delay=0.02")
    submitted = [submit(sredis, node.info, words(10)) for _ in range(6)]
    await asyncio.gather(*(events_of(aredis, job) for job in submitted))
    jobs = [await wait_for_status(sredis, job.job_id, JobStatus.FINISHED) for job in submitted]
    assert max_overlap(jobs) == 2


@pytest.mark.slow
async def test_cancel_stops_a_long_generation(start_node, aredis, sredis):
    node = await start_node("--engine-option", "token_delay=0.05")
    job = submit(sredis, node.info, words(400), max_tokens=400)  # 20 s if left alone
    seen: list[wire.Event] = []
    opener = StreamOpener(job.reply_key, node.info.verify_key, job.job_id)
    async for blob in streams.read_stream(
        aredis, job.job_id, first_timeout_s=10, idle_timeout_s=10
    ):
        seen.append(opener.open(blob))
        if len(seen) == 3:
            await streams.request_cancel(aredis, job.job_id)
    final = seen[-1]
    assert isinstance(final, wire.FinalRecord)
    assert final.finish_reason == "cancelled"
    streamed = len(text_of(seen).split())
    assert 3 <= streamed < 400  # stopped where the cancel found it, not at the end
    assert final.completion_tokens == streamed  # billed for what was generated
    rq = await wait_for_status(sredis, job.job_id, JobStatus.FINISHED)
    assert rq.return_value()["finish_reason"] == "cancelled"


@pytest.mark.slow
async def test_a_job_cancelled_before_it_starts_generates_nothing(start_node, aredis, sredis):
    node = await start_node("--capacity", "1", "--engine-option", "token_delay=0.05")
    first = submit(sredis, node.info, words(10))
    second = submit(sredis, node.info, words(10))
    await streams.request_cancel(aredis, second.job_id)
    await events_of(aredis, first)
    events = await events_of(aredis, second)
    assert len(events) == 1
    assert events[0].finish_reason == "cancelled" and events[0].completion_tokens == 0


@pytest.mark.slow
async def test_a_job_for_another_model_gets_an_error_record(start_node, aredis, sredis):
    node = await start_node(model="echo")
    job = submit(sredis, node.info, "hi", model="some-other-model")
    events = await events_of(aredis, job)
    assert len(events) == 1 and isinstance(events[0], wire.ErrorRecord)
    assert events[0].code == "wrong_model"
    rq = await wait_for_status(sredis, job.job_id, JobStatus.FAILED)
    assert "wrong model" in rq.latest_result().exc_string


@pytest.mark.slow
async def test_the_node_generates_within_the_bound_its_job_carries(start_node, aredis, sredis):
    """The sealed request asks for 100 tokens, the backend's bound (the job's meta) is 3."""
    node = await start_node()
    job = submit(sredis, node.info, words(10), max_tokens=100, bound=3)
    events = await events_of(aredis, job)
    final = events[-1]
    assert isinstance(final, wire.FinalRecord)
    assert (final.completion_tokens, final.finish_reason) == (3, "length")
    assert text_of(events) == "w0 w1 w2"


@pytest.mark.slow
async def test_a_request_the_node_cannot_open_fails_the_rq_job(start_node, sredis):
    node = await start_node()
    stranger = wire.WorkerKeys.generate().box_public_b64
    job = submit(sredis, node.info, "hi", seal_to=stranger)
    rq = await wait_for_status(sredis, job.job_id, JobStatus.FAILED)
    assert "cannot open the request" in rq.latest_result().exc_string
    assert not sredis.exists(streams.stream_key(job.job_id))


@pytest.mark.slow
async def test_the_job_timeout_stops_generation(start_node, aredis, sredis):
    node = await start_node("--engine-option", "token_delay=0.05")
    job = submit(sredis, node.info, words(400), max_tokens=400, timeout_s=1)
    events = await events_of(aredis, job)
    assert events[-1].finish_reason == "cancelled"
    # 400 tokens take 20 s: the 1 s timeout stopped it, billed for what was streamed.
    assert events[-1].completion_tokens == len(text_of(events).split()) < 400
    rq = await wait_for_status(sredis, job.job_id, JobStatus.FAILED)
    assert "timeout" in rq.latest_result().exc_string


@pytest.mark.slow
async def test_sigterm_unregisters_and_settles_every_job(start_node, aredis, sredis):
    node = await start_node(  # registered for 120 s: gone before that is gone by SIGTERM
        "--capacity", "1", "--grace", "0.5", "--ttl", "120", "--engine-option", "token_delay=0.05"
    )
    running = submit(sredis, node.info, words(400), max_tokens=400)
    queued = submit(sredis, node.info, words(5))
    reader = asyncio.create_task(events_of(aredis, running, timeout_s=60))
    async with asyncio.timeout(60):  # until the running job has streamed something
        while not await aredis.exists(streams.stream_key(running.job_id)):  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    node.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(60):  # at once, not at the TTL
        while await registry.get_worker(aredis, node.worker_id) is not None:  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    assert node.process.wait(60) == 0
    queued_events = await events_of(aredis, queued, timeout_s=10)
    assert [(e.type, e.code) for e in queued_events] == [("error", "worker_shutdown")]
    running_events = await reader
    assert running_events[-1].finish_reason == "cancelled"  # after the 0.5 s grace
    assert running_events[-1].completion_tokens == len(text_of(running_events).split()) > 0
    assert rq_job(sredis, queued.job_id).get_status() == JobStatus.FAILED
    assert rq_job(sredis, running.job_id).get_status() == JobStatus.FAILED
    queue = Queue(queue_name(node.worker_id), connection=sredis, serializer=JSONSerializer)
    assert node.worker_id not in [w.name for w in Worker.all(queue=queue)]


@pytest.mark.slow
async def test_no_plaintext_in_redis_or_the_logs(start_node, aredis, sredis):
    node = await start_node("--log-level", "DEBUG")
    job = submit(sredis, node.info, f"my secret is {CANARY} ok")
    events = await events_of(aredis, job)
    assert CANARY in text_of(events)  # the reader does see it
    await wait_for_status(sredis, job.job_id, JobStatus.FINISHED)
    cancelled = submit(sredis, node.info, f"again {CANARY}")
    await streams.request_cancel(aredis, cancelled.job_id)
    await events_of(aredis, cancelled)

    dumped = []
    for key in sredis.scan_iter(count=1000):
        kind = sredis.type(key).decode()
        if kind == "string":
            dumped.append(sredis.get(key))
        elif kind == "hash":
            dumped.extend(k + b"=" + v for k, v in sredis.hgetall(key).items())
        elif kind == "list":
            dumped.extend(sredis.lrange(key, 0, -1))
        elif kind == "set":
            dumped.extend(sredis.smembers(key))
        elif kind == "zset":
            dumped.extend(sredis.zrange(key, 0, -1))
        elif kind == "stream":
            for _, fields in sredis.xrange(key):
                dumped.extend(fields.values())
        dumped.append(key)
    blob = b"\n".join(dumped)
    assert job.job_id.encode() in blob  # the scan did reach RQ's job hashes
    assert CANARY.encode() not in blob
    assert CANARY not in node.log()


@pytest.mark.engine
async def test_a_real_model_on_llama_cpp(start_node, aredis, sredis):
    pytest.importorskip("llama_cpp")
    from workers.engines import DEFAULT_MODEL, default_model_path

    try:
        default_model_path()
    except Exception as error:
        pytest.skip(str(error))
    node = await start_node(model=DEFAULT_MODEL, engine="llama-cpp", ready_s=120)
    job = submit(sredis, node.info, "What is the capital of France?", max_tokens=24)
    events = await events_of(aredis, job, timeout_s=60)
    final = events[-1]
    assert isinstance(final, wire.FinalRecord)
    assert final.prompt_tokens > 5 and 1 <= final.completion_tokens <= 24
    assert text_of(events).strip()

    too_long = submit(sredis, node.info, "word " * 3000)  # more than the model's context
    events = await events_of(aredis, too_long, timeout_s=60)
    assert [(e.type, e.code) for e in events] == [("error", "context_length_exceeded")]
    assert "context" in events[0].message


def test_node_argument_parsing():
    from workers.node import build_parser, parse_engine_options

    assert parse_engine_options(["n_ctx=4096", "model_path=/m.gguf", "flag=true"]) == {
        "n_ctx": 4096,
        "model_path": "/m.gguf",
        "flag": True,
    }
    with pytest.raises(ValueError):
        parse_engine_options(["nonsense"])
    args = build_parser().parse_args(["--model", "m", "--engine", "instant"])
    assert args.capacity == 64 and args.grace == 30.0


@pytest.fixture(autouse=True)
def _unbuffered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    monkeypatch.delenv("COCOON_REDIS_URL", raising=False)
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
