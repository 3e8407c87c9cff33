"""The per-job reply stream and the cancel signal, on the real Redis."""

from __future__ import annotations

import asyncio
import os
import tracemalloc
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio

from workers import streams
from workers.stream_bell import StreamBell
from workers.streams import (
    StreamLimits,
    StreamOverrun,
    StreamReader,
    StreamTimeout,
    append,
    cancelled_among,
    is_cancel_requested,
    read_stream,
    request_cancel,
    stream_key,
    watch_cancels,
)


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def collect(client: redis.asyncio.Redis, job_id: str, **timeouts: float) -> list[bytes]:
    options = {"first_timeout_s": 2.0, "idle_timeout_s": 2.0, **timeouts}
    return [entry async for entry in read_stream(client, job_id, **options)]


def write_later(
    client: redis.asyncio.Redis, job_id: str, entries: list[bytes], every_s: float
) -> asyncio.Task[None]:
    """Write ``entries`` to the job's stream, one every ``every_s`` seconds; the last ends it."""

    async def writer() -> None:
        for n, entry in enumerate(entries, 1):
            await asyncio.sleep(every_s)
            await append(client, job_id, entry, last=n == len(entries))

    return asyncio.create_task(writer())


async def test_entries_come_back_in_order_and_the_last_one_ends_the_read(aredis):
    blobs = [os.urandom(40) + b"\x00\xff" for _ in range(5)]
    for blob in blobs[:-1]:
        await append(aredis, "job-1", blob)
    await append(aredis, "job-1", blobs[-1], last=True)
    await append(aredis, "job-1", b"after the end")  # never read

    assert await collect(aredis, "job-1") == blobs


async def test_a_reader_waiting_first_gets_entries_as_they_are_written(aredis):
    task = write_later(aredis, "job-2", [b"chunk 0", b"chunk 1", b"chunk 2"], 0.05)
    got = await collect(aredis, "job-2")
    await task
    assert got == [b"chunk 0", b"chunk 1", b"chunk 2"]


def test_the_sync_client_writes_the_same_stream(redis_url):
    client = redis.Redis.from_url(redis_url)
    entry_id = append(client, "job-3", b"sealed", last=True)
    assert isinstance(entry_id, str) and "-" in entry_id
    assert client.xlen(stream_key("job-3")) == 1
    assert 0 < client.ttl(stream_key("job-3")) <= streams.STREAM_TTL_S
    client.close()


async def test_nothing_at_all_is_a_first_token_timeout(aredis):
    with pytest.raises(StreamTimeout) as caught:
        await collect(aredis, "job-silent", first_timeout_s=0.3)
    assert caught.value.first_token is True


async def test_a_stall_after_some_entries_is_an_idle_timeout(aredis):
    await append(aredis, "job-stall", b"one")
    got: list[bytes] = []
    with pytest.raises(StreamTimeout) as caught:
        async for entry in read_stream(
            aredis, "job-stall", first_timeout_s=5.0, idle_timeout_s=0.3
        ):
            got.append(entry)
    assert got == [b"one"]
    assert caught.value.first_token is False


async def test_the_idle_timer_restarts_with_each_entry(aredis):
    task = write_later(aredis, "job-slow", [b"0", b"1", b"2", b"3"], 0.2)
    # 0.8 s in all, more than the idle timeout, but never 0.5 s between two entries.
    got = await collect(aredis, "job-slow", first_timeout_s=1.0, idle_timeout_s=0.5)
    await task
    assert got == [b"0", b"1", b"2", b"3"]


async def test_streams_are_bounded(aredis, monkeypatch):
    monkeypatch.setattr(streams, "STREAM_MAXLEN", 50)
    for i in range(1000):
        await append(aredis, "job-long", b"%d" % i)
    # Trimming is approximate: whole nodes of up to 100 entries are dropped.
    assert await aredis.xlen(stream_key("job-long")) <= 50 + 100
    assert await aredis.ttl(stream_key("job-long")) > 0


async def test_cancel_is_a_key_and_a_message(aredis):
    assert await is_cancel_requested(aredis, "job-c") is False
    heard: list[str] = []
    ready = asyncio.Event()
    watcher = asyncio.create_task(watch_cancels(aredis, heard.append, ready=ready))
    await asyncio.wait_for(ready.wait(), 5)

    await request_cancel(aredis, "job-c")

    for _ in range(100):
        if heard:
            break
        await asyncio.sleep(0.02)
    watcher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watcher
    assert heard == ["job-c"]
    assert await is_cancel_requested(aredis, "job-c") is True
    assert await cancelled_among(aredis, ["job-a", "job-c", "job-z"]) == {"job-c"}
    assert await cancelled_among(aredis, []) == set()
    assert 0 < await aredis.ttl(streams.cancel_key("job-c")) <= streams.CANCEL_TTL_S


# -- the reader's limits: a writer is not trusted ----------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_an_entry_over_the_limit_is_refused_without_being_transferred(aredis):
    await append(aredis, "job-big", b"small")
    await append(aredis, "job-big", b"x" * (4 * 1024 * 1024))  # 4 MB in one entry
    await append(aredis, "job-big", b"end", last=True)
    reader = StreamReader(
        aredis,
        "job-big",
        first_timeout_s=2,
        idle_timeout_s=2,
        limits=StreamLimits(entry_bytes=64 * 1024),
    )
    got: list[bytes] = []
    tracemalloc.start()
    try:
        with pytest.raises(StreamOverrun) as caught:
            async for entry in reader.entries():
                got.append(entry)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == [b"small"]
    assert caught.value.kind == "entry_bytes" and caught.value.seen > 4 * 1024 * 1024
    assert reader.bytes_read < 100 and peak < 1024 * 1024  # the 4 MB never left Redis


async def test_the_job_s_bytes_and_entries_are_bounded_together(aredis):
    for _ in range(20):
        await aredis.xadd(stream_key("job-many"), {b"junk": b"j" * 10_000})  # no data field
    over_bytes = StreamReader(
        aredis, "job-many", first_timeout_s=2, idle_timeout_s=2,
        limits=StreamLimits(total_bytes=50_000),
    )  # fmt: skip
    with pytest.raises(StreamOverrun) as caught:
        async for _entry in over_bytes.entries():
            pass
    assert caught.value.kind == "total_bytes" and over_bytes.entries_read == 4
    assert over_bytes.bytes_read <= 50_000 < caught.value.seen

    for i in range(10):
        await append(aredis, "job-chatty", b"%d" % i)
    over_count = StreamReader(
        aredis, "job-chatty", first_timeout_s=2, idle_timeout_s=2, limits=StreamLimits(entries=6)
    )
    got = []
    with pytest.raises(StreamOverrun) as caught:
        async for entry in over_count.entries():
            got.append(entry)
    assert caught.value.kind == "entries" and got == [b"%d" % i for i in range(6)]


async def test_the_deadline_is_absolute_and_checked_only_while_waiting(aredis):
    clock = FakeClock()
    reader = StreamReader(
        aredis, "job-trickle", first_timeout_s=60, idle_timeout_s=60, clock=clock,
        limits=StreamLimits(deadline=100.0),
    )  # fmt: skip
    got: list[bytes] = []
    arrived = asyncio.Event()

    async def consume() -> None:
        async for entry in reader.entries():
            got.append(entry)
            arrived.set()

    task = asyncio.create_task(consume())
    for i in range(3):  # one entry every 50 s: never idle for 60 s
        arrived.clear()
        await append(aredis, "job-trickle", b"%d" % i)
        await asyncio.wait_for(arrived.wait(), 5)
        clock.now += 50
    with pytest.raises(StreamOverrun) as caught:
        await asyncio.wait_for(task, 5)
    assert caught.value.kind == "deadline" and got == [b"0", b"1", b"2"]

    # Entries already written are read whatever the time: only waiting is late.
    late = StreamReader(
        aredis, "job-done", first_timeout_s=1, idle_timeout_s=1, clock=clock,
        limits=StreamLimits(deadline=0.0),
    )  # fmt: skip
    await append(aredis, "job-done", b"a")
    await append(aredis, "job-done", b"b", last=True)
    assert [entry async for entry in late.entries()] == [b"a", b"b"]


async def test_a_reader_resumes_after_the_last_entry_it_yielded(aredis):
    for i in range(4):
        await append(aredis, "job-resume", b"%d" % i, last=i == 3)
    reader = StreamReader(aredis, "job-resume", first_timeout_s=2, idle_timeout_s=2)
    async for entry in reader.entries():
        assert entry == b"0"
        break  # the first consumer leaves; another one carries on
    assert [entry async for entry in reader.entries()] == [b"1", b"2", b"3"]
    assert reader.finished and reader.entries_read == 4


async def test_a_slow_consumer_is_not_an_idle_writer(aredis):
    clock = FakeClock()
    for i in range(3):
        await append(aredis, "job-slow-reader", b"%d" % i, last=i == 2)
    got = []
    async for entry in read_stream(
        aredis, "job-slow-reader", first_timeout_s=1, idle_timeout_s=1, clock=clock
    ):
        got.append(entry)
        clock.now += 10  # the consumer takes 10 s over each entry; the writer was done
    assert got == [b"0", b"1", b"2"]


# -- the bell: readers woken by Redis's keyspace events, not by polling ----------------------------


@pytest.fixture
async def bell(aredis: redis.asyncio.Redis) -> AsyncIterator[StreamBell]:
    bell = StreamBell(aredis)
    yield bell
    await bell.close()


async def test_a_reader_with_a_bell_wakes_at_each_append_without_polling(aredis, bell, monkeypatch):
    # Polling would first look again after a minute: only the bell can wake the reader in time.
    monkeypatch.setattr(streams, "POLL_MIN_S", 60.0)
    monkeypatch.setattr(streams, "POLL_MAX_S", 60.0)
    reader = StreamReader(aredis, "job-bell", first_timeout_s=120, idle_timeout_s=120, bell=bell)
    writer = write_later(aredis, "job-bell", [b"one", b"two", b"three"], every_s=0.05)
    read = [entry async for entry in reader.entries()]
    await writer
    assert read == [b"one", b"two", b"three"]
    assert bell.on and not bell._readers  # every watch was given back


async def test_with_a_bell_an_entry_over_the_limit_is_still_never_transferred(aredis, bell):
    await append(aredis, "job-big", b"x" * 100)
    await append(aredis, "job-big", b"y" * 2_000_000, last=True)
    reader = StreamReader(
        aredis,
        "job-big",
        first_timeout_s=5,
        idle_timeout_s=5,
        limits=StreamLimits(entry_bytes=1_000),
        bell=bell,
    )
    read: list[bytes] = []
    with pytest.raises(StreamOverrun) as overrun:
        async for entry in reader.entries():
            read.append(entry)
    assert read == [b"x" * 100] and overrun.value.kind == "entry_bytes"
    assert overrun.value.seen > 2_000_000
