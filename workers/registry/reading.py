"""Reading the registry, bounded: the index, the healthy workers, one worker, queue depths.

Reader side (the backend, ``redis.asyncio.Redis``): :func:`list_workers`, :func:`get_worker`,
:func:`pick_worker`, :class:`WorkerSnapshot`. Reading is bounded: at most ``limit`` index
entries (:data:`MAX_INDEX_ENTRIES`), read in batches, ids checked against a strict pattern
(:func:`valid_worker_id`) and each entry's fields measured (``HSTRLEN``) before they are
fetched; bogus or oversized entries are skipped and bogus index ids dropped. The dispatcher
does not read the index per turn: it keeps a :class:`WorkerSnapshot` refreshed by a background
task, so no number of index entries slows a request.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis as AsyncRedis

from workers.registry.entries import (
    DEFAULT_CAPACITY,
    INDEX_KEY,
    WorkerInfo,
    attestation_key,
    queue_name,
    slots_key,
    valid_worker_id,
    worker_key,
)
from workers.registry.records import parse_record

log = logging.getLogger(__name__)

MAX_INDEX_ENTRIES = 10_000
"""Index entries a reader looks at, at most (``COCOON_MAX_WORKERS`` is the backend's setting)."""

READ_BATCH = 500
"""Index entries read per round trip (the event loop runs between batches)."""

MAX_INFO_BYTES = 4096
"""Longest static entry (``info``) a reader fetches; a real one is about 400 bytes."""

MAX_NUMBER_BYTES = 32
"""Longest ``load`` or ``last_heartbeat`` field a reader fetches."""


# -- the index (written by the backend only) --------------------------------------------------


async def add_to_index(redis: AsyncRedis, worker_id: str, when: float) -> None:
    """Put an accepted worker in the index (onboarding does, at every acceptance)."""
    if valid_worker_id(worker_id) is None:
        raise ValueError(f"not a worker id: {worker_id!r}")
    await redis.zadd(INDEX_KEY, {worker_id: when})


async def index_ids(
    redis: AsyncRedis, limit: int = MAX_INDEX_ENTRIES
) -> tuple[list[str], list[bytes | str]]:
    """The newest ``limit`` index entries (by acceptance time): (valid worker ids, members that
    are not ids). Newest first, so that a worker accepted now is seen even behind any number of
    stale entries, which readers drop ``limit`` at a time."""
    valid: list[str] = []
    bogus: list[bytes | str] = []
    for member in _members(await redis.zrange(INDEX_KEY, 0, max(0, limit - 1), desc=True)):
        worker_id = valid_worker_id(member)
        if worker_id is None:
            bogus.append(member)
        else:
            valid.append(worker_id)
    return valid, bogus


# -- reader side (the backend) ----------------------------------------------------------------


async def _redis_now(redis: AsyncRedis) -> float:
    seconds, micros = await redis.time()
    return float(seconds) + float(micros) / 1_000_000


async def _read_entries(
    redis: AsyncRedis, ids: Sequence[str], now: float, default_capacity: int
) -> list[tuple[WorkerInfo | None, bool]]:
    """For each id: (the worker if it is healthy and readable, whether it exists at all: a
    record or an entry). Round trips that only ask more of what exists: whether there is an
    entry and a record; then the entry's sizes and live slots; then only the fields that fit.
    A worker may turn its own key into another type: such replies are errors that spoil
    nothing but its own entry."""
    pipe = redis.pipeline(transaction=False)
    for worker_id in ids:
        pipe.exists(worker_key(worker_id))
        pipe.get(attestation_key(worker_id))
    first = [_reply(r) for r in await pipe.execute(raise_on_error=False)]
    entries = [worker_id for i, worker_id in enumerate(ids) if first[2 * i]]
    sizes: dict[str, list[Any]] = {}
    if entries:
        pipe = redis.pipeline(transaction=False)
        for worker_id in entries:
            key = worker_key(worker_id)
            pipe.hstrlen(key, "info")
            pipe.hstrlen(key, "load")
            pipe.hstrlen(key, "last_heartbeat")
            pipe.zcount(slots_key(worker_id), now, "+inf")
        replies = [_reply(r) for r in await pipe.execute(raise_on_error=False)]
        sizes = {w: replies[4 * i : 4 * i + 4] for i, w in enumerate(entries)}
    readable = []
    for worker_id, (info_len, load_len, beat_len, reserved) in sizes.items():
        if info_len is None or reserved is None:
            continue
        if 0 < info_len <= MAX_INFO_BYTES and max(load_len or 0, beat_len or 0) <= MAX_NUMBER_BYTES:
            readable.append(worker_id)
        elif info_len > MAX_INFO_BYTES:
            log.warning("worker %s: its entry is %d bytes; skipped", worker_id, info_len)
    fields: dict[str, Any] = {}
    if readable:
        pipe = redis.pipeline(transaction=False)
        for worker_id in readable:
            pipe.hmget(worker_key(worker_id), ["info", "load", "last_heartbeat"])
        replies = [_reply(r) for r in await pipe.execute(raise_on_error=False)]
        fields = dict(zip(readable, replies, strict=True))
    out: list[tuple[WorkerInfo | None, bool]] = []
    for i, worker_id in enumerate(ids):
        has_entry, raw_record = first[2 * i], first[2 * i + 1]
        values = fields.get(worker_id)
        info = None
        if values is not None and values[0] is not None:
            reserved = int(sizes[worker_id][3])
            info = _parse(worker_id, values, reserved, raw_record, now, default_capacity)
        out.append((info, has_entry is None or bool(has_entry) or raw_record is not None))
    return out


async def list_workers(
    redis: AsyncRedis,
    model: str | None = None,
    *,
    default_capacity: int = DEFAULT_CAPACITY,
    limit: int = MAX_INDEX_ENTRIES,
) -> list[WorkerInfo]:
    """Healthy workers (of ``model``, if given), with live ``reserved`` counts.

    Reads at most ``limit`` index entries, the newest first, ``READ_BATCH`` per page (the event
    loop runs between pages). Index members that are not worker ids, and ids with neither a
    record nor an entry, are dropped from the index as they are read (the caller is the
    backend: only it writes the index).
    """
    now: float | None = None
    workers: dict[str, WorkerInfo] = {}
    offset = seen = 0
    while seen < limit:
        count = min(READ_BATCH, limit - seen)
        members = _members(await redis.zrange(INDEX_KEY, offset, offset + count - 1, desc=True))
        if not members:
            break
        seen += len(members)
        ids: list[str] = []
        gone: list[bytes | str] = []
        for member in members:
            worker_id = valid_worker_id(member)
            if worker_id is None:
                gone.append(member)
            else:
                ids.append(worker_id)
        if now is None:
            now = await _redis_now(redis)
        if ids:
            for worker_id, (info, exists) in zip(
                ids, await _read_entries(redis, ids, now, default_capacity), strict=True
            ):
                if not exists:
                    gone.append(worker_id)
                elif info is not None and (model is None or info.model == model):
                    workers[worker_id] = info
        if gone:
            await redis.zrem(INDEX_KEY, *gone)
        offset += len(members) - len(gone)
        if len(members) < count:
            break
    return list(workers.values())


async def get_worker(
    redis: AsyncRedis, worker_id: str, *, default_capacity: int = DEFAULT_CAPACITY
) -> WorkerInfo | None:
    """The worker if it is healthy, else None."""
    if valid_worker_id(worker_id) is None:
        return None
    now = await _redis_now(redis)
    ((info, _exists),) = await _read_entries(redis, [worker_id], now, default_capacity)
    return info


async def queued_jobs(redis: AsyncRedis, workers: list[WorkerInfo]) -> list[int]:
    """Jobs waiting in each worker's own RQ queue, in the order of ``workers`` (one round
    trip)."""
    if not workers:
        return []
    pipe = redis.pipeline(transaction=False)
    for info in workers:
        pipe.llen(f"rq:queue:{queue_name(info.worker_id)}")
    return [int(n) for n in await pipe.execute()]


# -- internals --------------------------------------------------------------------------------


def _members(reply: Iterable[object]) -> list[bytes | str]:
    """The members of a ZRANGE reply without scores (bytes, or str from a decoding client)."""
    return [member for member in reply if isinstance(member, bytes | str)]


def _reply(value: Any) -> Any:
    """A pipeline reply, or None where Redis answered an error (e.g. WRONGTYPE)."""
    return None if isinstance(value, Exception) else value


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _number(raw: Any, kind: type[int] | type[float], default: float) -> Any:
    """A worker-written number, or ``default`` when it is not a finite one."""
    try:
        value = kind(_text(raw)) if raw is not None else default
    except (ValueError, UnicodeDecodeError):
        return default
    return value if math.isfinite(value) else default


def _parse(
    worker_id: str,
    values: Sequence[Any],
    reserved: int,
    raw_record: Any,
    now: float,
    default_capacity: int,
) -> WorkerInfo | None:
    raw_info, raw_load, raw_beat = values
    try:
        info = WorkerInfo.model_validate_json(raw_info)
    except ValidationError:  # written by an incompatible version, or a bogus one
        log.warning("worker entry %s is not readable; skipped", worker_id)
        return None
    cap = default_capacity
    update: dict[str, Any] = {
        "worker_id": worker_id,  # the key's id, whatever the entry says
        "load": max(0, _number(raw_load, int, 0)),
        "last_heartbeat": _number(raw_beat, float, 0.0),
        "reserved": reserved,
        "tee": "dev",  # a worker's own claim is never trusted
        "attested": False,
        "expires_at": None,
        "image": None,
    }
    record = parse_record(worker_id, raw_record)
    if record is not None and record.expires_at > now:
        if (record.box_public_key, record.verify_key, record.model) != (
            info.box_public_key,
            info.verify_key,
            info.model,
        ):
            log.warning("worker %s: entry does not match its attested keys; skipped", worker_id)
            return None
        cap = record.capacity or default_capacity
        update.update(
            engine=record.engine,  # what its evidence bound, not what its entry says
            engine_version=record.engine_version,
            tee=record.tee,
            attested=True,
            provider_id=record.provider_id,
            expires_at=record.expires_at,
            image=record.image,
        )
    update["capacity"] = max(1, min(info.capacity, cap))
    update["load"] = min(update["load"], update["capacity"])
    return info.model_copy(update=update)
