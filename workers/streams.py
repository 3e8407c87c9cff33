"""The per-job reply stream in Redis, and the job's cancel signal.

The worker appends each sealed reply event (see :mod:`workers.wire`) to ``cocoon:stream:<job_id>``
as one stream entry; the last event of a job (its final or error record) is appended with
``last=True``, which marks the entry so :func:`read_stream` knows to stop without decrypting.
Entries are opaque sealed bytes: nothing here ever sees plaintext.

Bounds: each stream is trimmed to about :data:`STREAM_MAXLEN` entries and expires
:data:`STREAM_TTL_S` seconds after its last append (every append refreshes the TTL).

Cancel: :func:`request_cancel` sets ``cocoon:cancel:<job_id>`` (short TTL) *and* publishes the
job id on the ``cocoon:cancel`` channel. The node listens on the channel
(:func:`watch_cancels`) to stop generation at once, checks the key when a job starts (a cancel
that came before the job did), and sweeps the keys of its running jobs every few seconds
(:func:`cancelled_among`) in case a message was lost while its subscription reconnected.

Reading. The writer is not trusted, so the reader never asks Redis for more than it accepts:
:class:`StreamReader` (and :func:`read_stream`) pulls entries through a small Lua script that
measures each entry inside Redis and hands back only those within the reader's
:class:`StreamLimits` (bytes of one entry, bytes and entries of the whole job, an absolute
deadline). The first entry past a limit is never transferred: the reader raises
:class:`StreamOverrun` instead, so a 300 MB reply costs the reader nothing. A blocking ``XREAD``
would hand over whatever the writer put there, so a reader with a
:class:`~workers.stream_bell.StreamBell` waits for Redis's keyspace event of the stream's next
append (a few bytes, whatever the entry holds) and then reads, one bounded read per wake-up;
without a bell (or while it is off) it polls, every few milliseconds while entries flow, backing
off to :data:`POLL_MAX_S` while it waits.

Clients: the writer functions take ``redis.Redis`` or ``redis.asyncio.Redis`` (await the result
with the latter). The reader needs an asyncio client created with the default
``decode_responses=False``: entries are binary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, overload

from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, FieldT

from workers.redis_keys import CANCEL, STREAM, AnyRedis, SyncRedis, finish, redis_key
from workers.stream_bell import StreamBell

__all__ = [
    "CANCEL_CHANNEL",
    "CANCEL_TTL_S",
    "MAX_CHUNK_CHARS",
    "STREAM_MAXLEN",
    "STREAM_TTL_S",
    "StreamLimits",
    "StreamOverrun",
    "StreamReader",
    "StreamTimeout",
    "append",
    "cancel_key",
    "cancelled_among",
    "delete_stream",
    "is_cancel_requested",
    "read_stream",
    "request_cancel",
    "stream_key",
    "watch_cancels",
]

log = logging.getLogger(__name__)

STREAM_MAXLEN = 20_000
"""Approximate bound on entries per job: one per generated text delta, plus the last record."""

MAX_CHUNK_CHARS = 65_536
"""A writer splits the reply's text into chunks of at most this many characters (readers bound
a chunk by it)."""

STREAM_TTL_S = 600
"""A stream lives this long after its last append: time enough for a slow reader to finish."""

CANCEL_TTL_S = 900
"""A cancel request outlives any job that could still be waiting for it."""

CANCEL_CHANNEL = redis_key(CANCEL)

DATA_FIELD = b"d"
LAST_FIELD = b"last"
RECEIPT_FIELD = b"r"
"""A job's last entry may carry the worker's signed receipt (:mod:`workers.receipts`) in the
clear next to its sealed record: digests and counts only, never text."""

MAX_BLOCK_S = 2.0
"""One blocking wait (the cancel subscription) lasts at most this long: under redis-py's default
socket timeout (5 s)."""

POLL_MIN_S = 0.005
POLL_MAX_S = 0.05
"""The reader polls again after ``POLL_MIN_S`` when nothing was there, doubling the wait up to
``POLL_MAX_S`` while the stream stays quiet, and at once after an entry."""

BELL_FALLBACK_S = 1.0
"""A reader with a bell that is on looks again this often even when not rung (a ring lost while
the bell reconnected); its first wait is only :data:`POLL_MAX_S` long (its subscription may not
have been in place yet)."""

READ_BATCH = 256
"""Entries one read asks for, at most."""

MAX_ENTRY_BYTES = 64 * 1024 * 1024
"""One entry a reader without limits of its own accepts, at most (the wire's sealed maximum)."""

# Entries after ARGV[1] (exclusive), at most ARGV[2] of them, as XRANGE gives them, stopping
# before the first entry larger than ARGV[4] bytes or than what is left of ARGV[3] bytes: that
# entry's id and size come back instead of its data. Sizes count every field name and value.
# One entry at a time, so that no more than one entry past the bounds is ever loaded.
_BOUNDED_READ = """
local last = ARGV[1]
local budget = tonumber(ARGV[3])
local entry_max = tonumber(ARGV[4])
local out = {}
for _ = 1, tonumber(ARGV[2]) do
  local entry = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)[1]
  if not entry then
    break
  end
  local size = 0
  for _, part in ipairs(entry[2]) do
    size = size + string.len(part)
  end
  if size > entry_max or size > budget then
    return {out, entry[1], size}
  end
  budget = budget - size
  out[#out + 1] = entry
  last = entry[1]
end
return {out, '', 0}
"""


class StreamTimeout(TimeoutError):
    """Nothing arrived on the job's stream in time.

    ``first_token`` is True when nothing at all arrived (the job may never have started: the
    dispatcher can retry elsewhere), False when the stream stalled after some entries.
    """

    def __init__(self, job_id: str, *, first_token: bool, waited_s: float) -> None:
        self.job_id = job_id
        self.first_token = first_token
        self.waited_s = waited_s
        what = "first entry" if first_token else "next entry"
        super().__init__(f"job {job_id}: no {what} after {waited_s:.1f} s")


@dataclass(frozen=True)
class StreamLimits:
    """What a reader accepts from one job's stream. ``total_bytes`` and ``entry_bytes`` count
    the sealed entries as stored (field names and values); ``entries`` counts them all, the last
    one included; ``deadline`` is a time on the reader's clock by which the last entry must have
    been read (None: no deadline)."""

    total_bytes: int = sys.maxsize
    entry_bytes: int = MAX_ENTRY_BYTES
    entries: int = sys.maxsize
    deadline: float | None = None


OverrunKind = Literal["total_bytes", "entry_bytes", "entries", "deadline"]


class StreamOverrun(Exception):
    """The writer crossed one of the reader's :class:`StreamLimits`; the entry that would have
    crossed it was not read. ``seen`` is what the writer reached (bytes or entries), ``limit``
    the bound it crossed; for ``"deadline"``, ``seen`` is how many seconds late the reader
    gave up waiting (entries already written are read first, whatever the time)."""

    def __init__(self, job_id: str, kind: OverrunKind, *, seen: int, limit: int) -> None:
        self.job_id = job_id
        self.kind = kind
        self.seen = seen
        self.limit = limit
        if kind == "deadline":
            message = f"job {job_id}: no last entry by the deadline ({seen} s late)"
        else:
            message = f"job {job_id}: the stream crossed its {kind} bound ({seen} > {limit})"
        super().__init__(message)


def stream_key(job_id: str) -> str:
    return redis_key(STREAM, job_id)


def cancel_key(job_id: str) -> str:
    return redis_key(CANCEL, job_id)


# -- writer side --------------------------------------------------------------------------------


@overload
def append(
    redis: SyncRedis,
    job_id: str,
    sealed: bytes,
    *,
    last: bool = ...,
    ttl_s: int | None = ...,
    receipt: bytes | None = ...,
) -> str: ...
@overload
def append(
    redis: AsyncRedis,
    job_id: str,
    sealed: bytes,
    *,
    last: bool = ...,
    ttl_s: int | None = ...,
    receipt: bytes | None = ...,
) -> Awaitable[str]: ...
def append(
    redis: AnyRedis,
    job_id: str,
    sealed: bytes,
    *,
    last: bool = False,
    ttl_s: int | None = STREAM_TTL_S,
    receipt: bytes | None = None,
) -> str | Awaitable[str]:
    """Append one sealed event to the job's stream; returns the entry id.

    ``last=True`` marks the job's final entry (its final or error record). The stream expires
    ``ttl_s`` after this append; a writer that set the TTL moments ago may pass ``ttl_s=None``
    to skip refreshing it (one command instead of two, for a busy stream). ``receipt``: the
    worker's signed receipt (JSON, :mod:`workers.receipts`), kept with the last entry.
    """
    key = stream_key(job_id)
    fields: dict[FieldT, EncodableT] = {DATA_FIELD: sealed}
    if last:
        fields[LAST_FIELD] = b"1"
        if receipt is not None:
            fields[RECEIPT_FIELD] = receipt
    if ttl_s is None:
        return finish(redis.xadd(key, fields, maxlen=STREAM_MAXLEN, approximate=True), _text)
    pipe = redis.pipeline(transaction=False)
    pipe.xadd(key, fields, maxlen=STREAM_MAXLEN, approximate=True)
    pipe.expire(key, ttl_s)
    return finish(pipe.execute(), lambda replies: _text(replies[0]))


@overload
def delete_stream(redis: SyncRedis, job_id: str) -> None: ...
@overload
def delete_stream(redis: AsyncRedis, job_id: str) -> Awaitable[None]: ...
def delete_stream(redis: AnyRedis, job_id: str) -> Awaitable[None] | None:
    """Drop the job's stream now (a reader that has everything need not wait for the TTL)."""
    return finish(redis.delete(stream_key(job_id)), lambda _: None)


@overload
def request_cancel(redis: SyncRedis, job_id: str, *, ttl_s: int = ...) -> None: ...
@overload
def request_cancel(redis: AsyncRedis, job_id: str, *, ttl_s: int = ...) -> Awaitable[None]: ...
def request_cancel(
    redis: AnyRedis, job_id: str, *, ttl_s: int = CANCEL_TTL_S
) -> Awaitable[None] | None:
    """Ask whichever node runs (or will run) ``job_id`` to stop it."""
    pipe = redis.pipeline(transaction=False)
    pipe.set(cancel_key(job_id), b"1", ex=ttl_s)
    pipe.publish(CANCEL_CHANNEL, job_id)
    return finish(pipe.execute(), lambda _: None)


@overload
def is_cancel_requested(redis: SyncRedis, job_id: str) -> bool: ...
@overload
def is_cancel_requested(redis: AsyncRedis, job_id: str) -> Awaitable[bool]: ...
def is_cancel_requested(redis: AnyRedis, job_id: str) -> bool | Awaitable[bool]:
    return finish(redis.exists(cancel_key(job_id)), lambda n: bool(n))


async def cancelled_among(redis: AsyncRedis, job_ids: Iterable[str]) -> set[str]:
    """Those of ``job_ids`` whose cancellation was requested (one round trip)."""
    ids = list(job_ids)
    if not ids:
        return set()
    values = await redis.mget([cancel_key(job_id) for job_id in ids])
    return {job_id for job_id, value in zip(ids, values, strict=True) if value}


async def watch_cancels(
    redis: AsyncRedis,
    on_cancel: Callable[[str], None],
    *,
    ready: asyncio.Event | None = None,
) -> None:
    """Call ``on_cancel(job_id)`` for each cancel request published, until cancelled.

    Reconnects after a Redis error (callers sweep with :func:`cancelled_among` to cover the
    gap). ``ready`` is set once the first subscription is in place.
    """
    while True:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(CANCEL_CHANNEL)
            if ready is not None:
                ready.set()
            while True:
                message = await pubsub.get_message(timeout=MAX_BLOCK_S)
                if message is not None and message.get("type") == "message":
                    on_cancel(_text(message["data"]))
        except (RedisConnectionError, RedisTimeoutError) as error:
            log.warning("cancel subscription lost (%s); resubscribing", type(error).__name__)
            await asyncio.sleep(0.5)
        finally:
            await pubsub.aclose()


# -- reader side --------------------------------------------------------------------------------


class StreamReader:
    """Reads one job's stream, in order, within ``limits``; keeps its place between reads.

    :meth:`entries` yields the sealed data of each entry until the job's last entry. It raises
    :class:`StreamTimeout` (``first_token=True``) when no entry arrives within
    ``first_timeout_s``, or (``first_token=False``) when ``idle_timeout_s`` passes between two
    entries, and :class:`StreamOverrun` when the writer crosses a limit (checked before the
    entry is transferred). Iterating again after an interruption resumes after the last entry
    yielded. Entries already in the stream are read first, so a reader that starts late loses
    nothing (within :data:`STREAM_TTL_S`). Times are read from ``clock`` (seconds).
    """

    def __init__(
        self,
        redis: AsyncRedis,
        job_id: str,
        *,
        first_timeout_s: float,
        idle_timeout_s: float,
        limits: StreamLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        last_id: str = "0-0",
        bell: StreamBell | None = None,
    ) -> None:
        self.redis = redis
        self.bell = bell
        self.job_id = job_id
        self.first_timeout_s = first_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.limits = limits or StreamLimits()
        self.clock = clock
        self.last_id = last_id
        self.bytes_read = 0  # sealed bytes of the entries yielded
        self.entries_read = 0
        self.finished = False  # the job's last entry was yielded
        self.receipt: bytes | None = None  # the last entry's receipt, once it was read
        self._script = redis.register_script(_BOUNDED_READ)

    async def entries(self) -> AsyncIterator[bytes]:
        key = stream_key(self.job_id)
        limits = self.limits
        started = self.clock()
        wait = self.first_timeout_s if self.entries_read == 0 else self.idle_timeout_s
        poll_s = POLL_MIN_S
        bell = self.bell
        rung = await bell.watch(self.job_id) if bell is not None else None
        unrung_s = POLL_MAX_S
        try:
            while not self.finished:
                if rung is not None:
                    rung.clear()  # an append from now on rings again
                entries, over_id, over_size = await self._read(key)
                for entry_id, fields in entries:
                    if self.entries_read >= limits.entries:
                        raise StreamOverrun(
                            self.job_id, "entries", seen=self.entries_read + 1, limit=limits.entries
                        )
                    self.last_id = _text(entry_id)
                    self.entries_read += 1
                    self.bytes_read += sum(len(k) + len(v) for k, v in fields.items())
                    self.finished = bool(fields.get(LAST_FIELD))
                    if self.finished:
                        self.receipt = fields.get(RECEIPT_FIELD)
                    data = fields.get(DATA_FIELD)
                    if data is not None:
                        yield data
                    if self.finished:
                        return
                if over_id:
                    if over_size > limits.entry_bytes:
                        raise StreamOverrun(
                            self.job_id, "entry_bytes", seen=over_size, limit=limits.entry_bytes
                        )
                    raise StreamOverrun(
                        self.job_id,
                        "total_bytes",
                        seen=self.bytes_read + over_size,
                        limit=limits.total_bytes,
                    )
                ringing = rung is not None and bell is not None and bell.on
                if entries:
                    # Timers run while the reader waits for the writer, not while its own
                    # consumer takes its time over what was read.
                    started = self.clock()
                    wait = self.idle_timeout_s
                    poll_s = POLL_MIN_S
                    if not ringing or len(entries) == READ_BATCH:
                        continue  # (with a bell: no read until the next append rings)
                else:
                    now = self.clock()
                    if limits.deadline is not None and now > limits.deadline:
                        late = math.ceil(now - limits.deadline)
                        raise StreamOverrun(self.job_id, "deadline", seen=late, limit=0)
                    if now - started > wait:
                        raise StreamTimeout(
                            self.job_id, first_token=self.entries_read == 0, waited_s=now - started
                        )
                if ringing:
                    assert rung is not None
                    # Woken by the next append; a ring missed costs one unrung_s at most.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(rung.wait(), unrung_s)
                    unrung_s = BELL_FALLBACK_S
                    continue
                await asyncio.sleep(poll_s)
                poll_s = min(poll_s * 2, POLL_MAX_S)
        finally:
            if bell is not None:
                bell.unwatch(self.job_id)

    async def _read(self, key: str) -> tuple[list[tuple[Any, dict[bytes, bytes]]], str, int]:
        budget = max(0, self.limits.total_bytes - self.bytes_read)
        reply = await self._script(
            keys=[key], args=[self.last_id, READ_BATCH, budget, self.limits.entry_bytes]
        )
        raw_entries, over_id, over_size = reply
        entries = [(entry_id, _pairs(fields)) for entry_id, fields in raw_entries]
        return entries, _text(over_id or b""), int(over_size or 0)


async def read_stream(
    redis: AsyncRedis,
    job_id: str,
    *,
    first_timeout_s: float,
    idle_timeout_s: float,
    last_id: str = "0-0",
    limits: StreamLimits | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[bytes]:
    """Yield the job's sealed entries in order, from ``last_id`` on, until its last entry:
    one pass of a :class:`StreamReader` (its timeouts, limits and errors)."""
    reader = StreamReader(
        redis,
        job_id,
        first_timeout_s=first_timeout_s,
        idle_timeout_s=idle_timeout_s,
        limits=limits,
        clock=clock,
        last_id=last_id,
    )
    async for data in reader.entries():
        yield data


# -- internals --------------------------------------------------------------------------------


def _pairs(fields: Any) -> dict[bytes, bytes]:
    """An entry's fields, from the flat ``[name, value, ...]`` list a script returns."""
    if isinstance(fields, dict):
        return dict(fields)
    return dict(zip(fields[::2], fields[1::2], strict=True))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
