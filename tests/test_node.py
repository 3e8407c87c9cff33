"""The worker node, on the real Redis with real node processes (the registry's own tests are in
tests/test_registry.py, the kit in tests/support/node.py).

Queue mechanics run on the ``instant`` engine (no model); one test runs the real llama-cpp model.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal

import pytest
from rq import Queue, Worker
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from tests.support.node import (
    Submitted,
    events_of,
    max_overlap,
    rq_job,
    submit,
    text_of,
    wait_for_status,
    words,
)
from workers import registry, streams, wire
from workers.registry import queue_name
from workers.stream_crypto import StreamOpener

CANARY = "zebra-canary-7f3a"
QUEUED_S = 240.0  # a queued job's stream waits for its turn: the test's own timeout bounds it


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
    # What the registry said while the jobs ran (one full run on a busy machine saw no load
    # above 0 while 30 jobs ran at once): a failed read or a missing entry is kept, not fatal.
    seen: collections.Counter[str] = collections.Counter()

    async def watch_load() -> None:
        nonlocal observed_load
        while True:
            try:
                info = await registry.get_worker(aredis, node.worker_id)
            except Exception as error:  # said in the assertion below
                seen[f"error {error!r}"] += 1
            else:
                seen["no entry" if info is None else f"load {info.load}"] += 1
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
    assert observed_load > 1, dict(seen)


@pytest.mark.slow
async def test_a_full_node_takes_no_more_jobs_than_its_capacity(start_node, aredis, sredis):
    """Six jobs of 20 s each on a node of capacity 2. Each is stopped once another runs beside
    it (the last one once it is alone), never after a time: however slow the machine, the
    first two overlap, and RQ's own timestamps show the node never ran a third at once."""
    node = await start_node("--capacity", "2", "--engine-option", "token_delay=0.05")
    submitted = [submit(sredis, node.info, words(400), max_tokens=400) for _ in range(6)]
    running: set[str] = set()
    ended: list[str] = []

    async def run(job: Submitted) -> list[wire.Event]:
        events: list[wire.Event] = []
        opener = StreamOpener(job.reply_key, job.worker.verify_key, job.job_id)
        async for blob in streams.read_stream(
            aredis, job.job_id, first_timeout_s=QUEUED_S, idle_timeout_s=QUEUED_S
        ):
            events.append(opener.open(blob))
            running.add(job.job_id)
            # A pair runs together: stop both. The last job has no one left to pair with.
            if len(running) >= 2 or len(ended) == len(submitted) - 1:
                for job_id in list(running):
                    await streams.request_cancel(aredis, job_id)
        running.discard(job.job_id)
        ended.append(job.job_id)
        return events

    for events in await asyncio.gather(*(run(job) for job in submitted)):
        assert events[-1].finish_reason == "cancelled"
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
