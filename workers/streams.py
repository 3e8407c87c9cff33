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

Clients: the writer functions take ``redis.Redis`` or ``redis.asyncio.Redis`` (await the result
with the latter). :func:`read_stream` needs an asyncio client created with the default
``decode_responses=False``: entries are binary.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from workers.redis_keys import CANCEL, STREAM, finish, redis_key

__all__ = [
    "CANCEL_CHANNEL",
    "CANCEL_TTL_S",
    "STREAM_MAXLEN",
    "STREAM_TTL_S",
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

STREAM_TTL_S = 600
"""A stream lives this long after its last append: time enough for a slow reader to finish."""

CANCEL_TTL_S = 900
"""A cancel request outlives any job that could still be waiting for it."""

CANCEL_CHANNEL = redis_key(CANCEL)

DATA_FIELD = b"d"
LAST_FIELD = b"last"

MAX_BLOCK_S = 2.0
"""One blocking XREAD waits at most this long: under redis-py's default socket timeout (5 s)."""

AnyRedis = Any  # redis.Redis | redis.asyncio.Redis


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


def stream_key(job_id: str) -> str:
    return redis_key(STREAM, job_id)


def cancel_key(job_id: str) -> str:
    return redis_key(CANCEL, job_id)


# -- writer side --------------------------------------------------------------------------------


def append(
    redis: AnyRedis,
    job_id: str,
    sealed: bytes,
    *,
    last: bool = False,
    ttl_s: int | None = STREAM_TTL_S,
) -> str | Awaitable[str]:
    """Append one sealed event to the job's stream; returns the entry id.

    ``last=True`` marks the job's final entry (its final or error record). The stream expires
    ``ttl_s`` after this append; a writer that set the TTL moments ago may pass ``ttl_s=None``
    to skip refreshing it (one command instead of two, for a busy stream).
    """
    key = stream_key(job_id)
    fields: dict[bytes, bytes] = {DATA_FIELD: sealed}
    if last:
        fields[LAST_FIELD] = b"1"
    if ttl_s is None:
        return finish(redis.xadd(key, fields, maxlen=STREAM_MAXLEN, approximate=True), _text)
    pipe = redis.pipeline(transaction=False)
    pipe.xadd(key, fields, maxlen=STREAM_MAXLEN, approximate=True)
    pipe.expire(key, ttl_s)
    return finish(pipe.execute(), lambda replies: _text(replies[0]))


def delete_stream(redis: AnyRedis, job_id: str) -> Any:
    """Drop the job's stream now (a reader that has everything need not wait for the TTL)."""
    return finish(redis.delete(stream_key(job_id)), lambda _: None)


def request_cancel(redis: AnyRedis, job_id: str, *, ttl_s: int = CANCEL_TTL_S) -> Any:
    """Ask whichever node runs (or will run) ``job_id`` to stop it."""
    pipe = redis.pipeline(transaction=False)
    pipe.set(cancel_key(job_id), b"1", ex=ttl_s)
    pipe.publish(CANCEL_CHANNEL, job_id)
    return finish(pipe.execute(), lambda _: None)


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


async def read_stream(
    redis: AsyncRedis,
    job_id: str,
    *,
    first_timeout_s: float,
    idle_timeout_s: float,
    last_id: str = "0-0",
) -> AsyncIterator[bytes]:
    """Yield the job's sealed entries in order, from ``last_id`` on, until its last entry.

    Raises :class:`StreamTimeout` (``first_token=True``) when no entry arrives within
    ``first_timeout_s``, or (``first_token=False``) when ``idle_timeout_s`` passes between two
    entries. Entries already in the stream are read first, so a reader that starts late loses
    nothing (within :data:`STREAM_TTL_S`).
    """
    key = stream_key(job_id)
    got_any = False
    started = time.monotonic()
    deadline = started + first_timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            waited = time.monotonic() - started
            raise StreamTimeout(job_id, first_token=not got_any, waited_s=waited)
        block_ms = max(1, int(min(remaining, MAX_BLOCK_S) * 1000))
        reply = await redis.xread({key: last_id}, count=256, block=block_ms)
        entries = _entries(reply)
        if entries:
            started = time.monotonic()
            deadline = started + idle_timeout_s
        for entry_id, fields in entries:
            last_id = _text(entry_id)
            data = fields.get(DATA_FIELD)
            if data is None:
                continue
            got_any = True
            yield data
            if fields.get(LAST_FIELD):
                return


# -- internals --------------------------------------------------------------------------------


def _entries(reply: Any) -> list[tuple[Any, dict[bytes, bytes]]]:
    """Entries of a one-stream XREAD reply, RESP2 (list) or RESP3 (dict)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [entry for entries in reply.values() for entry in _flatten(entries)]
    return [entry for _key, entries in reply for entry in entries]


def _flatten(entries: Any) -> list[Any]:
    # RESP3 may nest the entries list one level deeper: {key: [[entries]]}
    if entries and isinstance(entries[0], list):
        return [entry for group in entries for entry in group]
    return list(entries)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
