"""The worker registry in Redis: who serves which model, how busy, and where a turn should go.

Who writes what. A worker node writes only a key of its own, its entry ``cocoon:worker:<id>``
(:func:`register`, :func:`heartbeat`, :func:`unregister`; they take a ``redis.Redis`` or a
``redis.asyncio.Redis``, and with the asyncio client you await the result). Everything shared
is the backend's: the index ``cocoon:workers`` (:func:`add_to_index` when onboarding accepts a
worker; an id leaves it when the worker is revoked, or when neither its record nor its entry
exists any more), slot reservations (:func:`reserve_slot`, :func:`release_slot`), routes and
attestation records. Only a development node registered directly, with the operator's own
credentials, indexes itself (``register(..., shared=True)``).

Reader side (the backend, ``redis.asyncio.Redis``): :func:`list_workers`, :func:`get_worker`,
:func:`pick_worker`, :class:`WorkerSnapshot`. Reading is bounded: at most ``limit`` index
entries (:data:`MAX_INDEX_ENTRIES`), read in batches, ids checked against a strict pattern
(:func:`valid_worker_id`) and each entry's fields measured (``HSTRLEN``) before they are
fetched; bogus or oversized entries are skipped and bogus index ids dropped. The dispatcher
does not read the index per turn: it keeps a :class:`WorkerSnapshot` refreshed by a background
task, so no number of index entries slows a request.

Health. A worker's hash expires ``ttl_s`` seconds after its last heartbeat, by Redis's own clock,
so "healthy" means "the hash exists": no clock of the worker or the dispatcher is trusted.

Capacity and load. A worker's claimed capacity is capped by the backend's attestation record
(``AttestationRecord.capacity``: the policy's value for its image, or the operator's default);
an unattested development worker is capped by the default. Load is the backend's own count:
a dispatcher *reserves a slot* when it assigns a job (:func:`reserve_slot`, or
``pick_worker(..., job_id=...)``), an atomic Lua script run with the backend's credentials that
refuses when the worker's live reserved slots reach its capacity, else adds the job id to the
slot set with an expiry (Redis clock). The dispatcher releases the slot when the turn ends
(:func:`release_slot`); a slot whose turn never ended (its dispatcher died) simply expires. Two
dispatchers racing for the last slot cannot both win. The ``load`` a node reports in its entry
is shown (metrics) but never decides where a job goes.

Attestation. The node's own entry is only its claim. What the backend verified lives in a
separate key that only the backend writes, ``cocoon:attestation:<worker_id>``
(:class:`AttestationRecord`: TEE kind, the attested keys, model, provider, capacity, expiry; it
expires with the evidence). Readers merge the two: a worker whose record exists, is unexpired
(Redis clock) and carries the same keys and model is ``attested`` with the record's ``tee`` and
``provider_id``; a worker without a record is an unattested development worker (``tee="dev"``,
``attested=False``) whatever it claims; a worker whose record disagrees with its entry is not
listed at all. ``pick_worker(..., attested_only=True)`` skips unattested workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal, overload

from pydantic import BaseModel, Field, ValidationError
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ResponseError

from workers.redis_keys import (
    ATTESTATION,
    QUEUE,
    ROUTE,
    WORKER,
    WORKER_SLOTS,
    WORKERS_INDEX,
    AnyRedis,
    SyncRedis,
    finish,
    redis_key,
)

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_TTL_S",
    "MAX_INDEX_ENTRIES",
    "AttestationRecord",
    "WorkerInfo",
    "WorkerSnapshot",
    "add_to_index",
    "attestation_key",
    "get_worker",
    "heartbeat",
    "index_ids",
    "list_workers",
    "pick_worker",
    "queue_name",
    "read_attestation",
    "register",
    "release_slot",
    "remember_route",
    "reserve_slot",
    "revoke_attestation",
    "unregister",
    "valid_worker_id",
    "write_attestation",
]

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 10
"""A worker is dead this many seconds after its last heartbeat (the node beats every ~2 s)."""

DEFAULT_CAPACITY = 64
"""Jobs at once a worker gets when nothing else caps it (``COCOON_ATTESTATION__DEFAULT_CAPACITY``
is the backend's setting)."""

MAX_INDEX_ENTRIES = 10_000
"""Index entries a reader looks at, at most (``COCOON_MAX_WORKERS`` is the backend's setting)."""

READ_BATCH = 500
"""Index entries read per round trip (the event loop runs between batches)."""

MAX_INFO_BYTES = 4096
"""Longest static entry (``info``) a reader fetches; a real one is about 400 bytes."""

MAX_NUMBER_BYTES = 32
"""Longest ``load`` or ``last_heartbeat`` field a reader fetches."""

WORKER_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
_WORKER_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DYNAMIC_FIELDS = {"load", "last_heartbeat", "reserved", "attested", "expires_at", "image"}


def valid_worker_id(value: object) -> str | None:
    """``value`` (str or bytes) when it is a worker id (1-64 of ``A-Z a-z 0-9 _ . -``), else None.

    Every worker id read from Redis or from a request goes through here before it names a key.
    """
    if isinstance(value, bytes):
        if len(value) > 64:
            return None
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str) and _WORKER_ID.fullmatch(value):
        return value
    return None


class WorkerInfo(BaseModel):
    """One worker as the dispatcher sees it. Public keys are base64; nothing here is secret."""

    worker_id: str = Field(pattern=WORKER_ID_PATTERN)
    model: str = Field(min_length=1, max_length=200)
    engine: str = Field(max_length=200)
    engine_version: str = Field(max_length=200)
    box_public_key: str = Field(
        max_length=200, description="X25519 key that requests are sealed to (b64)"
    )
    verify_key: str = Field(
        max_length=200, description="Ed25519 key that signs final records (b64)"
    )
    capacity: int = Field(ge=1, description="jobs at once: the node's claim, capped by the backend")
    load: int = Field(default=0, ge=0, description="jobs running, as the node reports (shown only)")
    tee: Literal["dev", "tdx"] = Field(
        default="dev", description="'tdx' only from a backend's attestation record"
    )
    provider_id: int | None = Field(default=None, description="Cocoon user id to credit")
    attested: bool = Field(default=False, description="the backend verified its evidence")
    expires_at: float | None = Field(default=None, description="evidence expiry, epoch s")
    image: str | None = Field(default=None, description="released image, 'name version'")
    last_heartbeat: float = Field(default=0.0, description="epoch seconds, the node's clock")
    reserved: int = Field(default=0, ge=0, description="live slots reserved by dispatchers")

    @property
    def effective_load(self) -> int:
        """Jobs the backend has given the worker and not yet seen end (its own count)."""
        return self.reserved

    @property
    def has_room(self) -> bool:
        return self.effective_load < self.capacity


class AttestationRecord(BaseModel):
    """What the backend verified about a worker. Written by the backend only."""

    worker_id: str = Field(pattern=WORKER_ID_PATTERN)
    tee: Literal["dev", "tdx"]
    box_public_key: str
    verify_key: str
    model: str
    provider_id: int | None = None
    attested_at: float
    expires_at: float
    image: str | None = None
    measurements: dict[str, str] = Field(default_factory=dict)
    nvidia: bool = False
    capacity: int | None = Field(
        default=None, ge=1, description="most jobs at once dispatched to it (the policy's cap)"
    )
    # What its evidence bound, checked against the policy: what users are shown.
    engine: str = Field(default="unknown", max_length=64)
    engine_version: str = Field(default="", max_length=64)
    model_sha256: str = Field(default="", description="digest of the weights it loaded (hex)")
    engine_config_sha256: str = Field(default="", description="its attested engine config")
    off_machine: bool = Field(
        default=False, description="its engine sends prompts off the machine (dev TEE only)"
    )


def queue_name(worker_id: str) -> str:
    """Name of the worker's own RQ queue (RQ stores it under ``rq:queue:<name>``)."""
    return redis_key(QUEUE, worker_id)


def worker_key(worker_id: str) -> str:
    return redis_key(WORKER, worker_id)


def slots_key(worker_id: str) -> str:
    return redis_key(WORKER_SLOTS, worker_id)


def attestation_key(worker_id: str) -> str:
    return redis_key(ATTESTATION, worker_id)


def route_key(conversation_id: str) -> str:
    return redis_key(ROUTE, conversation_id)


INDEX_KEY = redis_key(WORKERS_INDEX)


# -- writer side (the node: its own entry) ----------------------------------------------------


@overload
def register(
    redis: SyncRedis, info: WorkerInfo, ttl_s: int = ..., *, shared: bool = ...
) -> None: ...
@overload
def register(
    redis: AsyncRedis, info: WorkerInfo, ttl_s: int = ..., *, shared: bool = ...
) -> Awaitable[None]: ...
def register(
    redis: AnyRedis, info: WorkerInfo, ttl_s: int = DEFAULT_TTL_S, *, shared: bool = True
) -> Awaitable[None] | None:
    """Publish ``info`` (replacing any previous entry of this worker id) with a fresh heartbeat.

    ``shared``: also put the id in the index. Only a development node registered directly, with
    the operator's credentials, does that; an attested node (``shared=False``) may write no
    shared key: the backend indexed it when it accepted its evidence.
    """
    now = time.time()
    static = info.model_dump_json(exclude=_DYNAMIC_FIELDS)
    key = worker_key(info.worker_id)
    pipe = redis.pipeline(transaction=True)
    pipe.delete(key)  # slots are kept: a node that re-registers after a stall keeps its jobs
    pipe.hset(key, mapping={"info": static, "load": info.load, "last_heartbeat": repr(now)})
    pipe.expire(key, ttl_s)
    if shared:
        pipe.zadd(INDEX_KEY, {info.worker_id: now})
    return finish(pipe.execute(), lambda _: None)


@overload
def heartbeat(redis: SyncRedis, worker_id: str, load: int, ttl_s: int = ...) -> bool: ...
@overload
def heartbeat(
    redis: AsyncRedis, worker_id: str, load: int, ttl_s: int = ...
) -> Awaitable[bool]: ...
def heartbeat(
    redis: AnyRedis, worker_id: str, load: int, ttl_s: int = DEFAULT_TTL_S
) -> bool | Awaitable[bool]:
    """Report ``load`` and extend the worker's life by ``ttl_s``: its own entry, nothing else.

    Returns (or, with the asyncio client, resolves to) False when the worker's entry is gone
    (unregistered, or expired after a stall): a heartbeat never resurrects a worker; the node
    must :func:`register` again. One MULTI, no script: a worker may run no Lua.
    """
    key = worker_key(worker_id)
    pipe = redis.pipeline(transaction=True)
    pipe.hexists(key, "info")
    pipe.hset(key, mapping={"load": load, "last_heartbeat": repr(time.time())})
    pipe.expire(key, ttl_s)
    result = pipe.execute()
    if inspect.isawaitable(result):

        async def _later() -> bool:
            alive = bool((await result)[0])
            if not alive:  # the MULTI made a partial hash: take it away again
                deleted = redis.delete(key)
                if inspect.isawaitable(deleted):  # it is: the client that answered `result`
                    await deleted
            return alive

        return _later()
    alive = bool(result[0])
    if not alive:
        redis.delete(key)
    return alive


@overload
def unregister(redis: SyncRedis, worker_id: str, *, shared: bool = ...) -> None: ...
@overload
def unregister(redis: AsyncRedis, worker_id: str, *, shared: bool = ...) -> Awaitable[None]: ...
def unregister(redis: AnyRedis, worker_id: str, *, shared: bool = True) -> Awaitable[None] | None:
    """Remove the worker's entry at once: no dispatcher picks it after this returns.

    ``shared`` (operator credentials only): also its slots and its index entry.
    """
    pipe = redis.pipeline(transaction=True)
    pipe.delete(worker_key(worker_id))
    if shared:
        pipe.delete(slots_key(worker_id))
        pipe.zrem(INDEX_KEY, worker_id)
    return finish(pipe.execute(), lambda _: None)


# -- the backend: index, attestation records, slots -------------------------------------------


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


async def write_attestation(redis: AsyncRedis, record: AttestationRecord) -> None:
    """Record verified evidence; the key expires with it (Redis clock)."""
    await redis.set(
        attestation_key(record.worker_id),
        record.model_dump_json(),
        exat=max(1, math.ceil(record.expires_at)),
    )


async def read_attestation(redis: AsyncRedis, worker_id: str) -> AttestationRecord | None:
    if valid_worker_id(worker_id) is None:
        return None
    raw = await redis.get(attestation_key(worker_id))
    return _record(worker_id, raw)


async def revoke_attestation(redis: AsyncRedis, worker_id: str) -> None:
    """Take the worker out of dispatch at once: its record, its entry and its index id go."""
    pipe = redis.pipeline(transaction=True)
    pipe.delete(attestation_key(worker_id), worker_key(worker_id), slots_key(worker_id))
    pipe.zrem(INDEX_KEY, worker_id)
    await pipe.execute()


@overload
def release_slot(redis: SyncRedis, worker_id: str, job_id: str) -> None: ...
@overload
def release_slot(redis: AsyncRedis, worker_id: str, job_id: str) -> Awaitable[None]: ...
def release_slot(redis: AnyRedis, worker_id: str, job_id: str) -> Awaitable[None] | None:
    """Free the slot a dispatcher reserved for ``job_id`` (no-op when there is none)."""
    return finish(redis.zrem(slots_key(worker_id), job_id), lambda _: None)


_RESERVE = """
if redis.call('HEXISTS', KEYS[1], 'info') == 0 then return -1 end
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[3]) == 0 then return -1 end
local capacity = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  if redis.call('ZCARD', KEYS[2]) >= capacity then return 0 end
end
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('EXPIRE', KEYS[2], math.ceil(ttl) + 60)
return 1
"""


async def _reserve(
    redis: AsyncRedis, worker: WorkerInfo, job_id: str, ttl_s: float, *, attested: bool
) -> int:
    """1: reserved; 0: the worker is full; -1: the worker (or its record) is gone."""
    result = await redis.eval(
        _RESERVE,
        3,
        worker_key(worker.worker_id),
        slots_key(worker.worker_id),
        attestation_key(worker.worker_id),
        job_id,
        ttl_s,
        worker.capacity,
        "1" if attested else "0",
    )
    return int(result)


async def reserve_slot(
    redis: AsyncRedis,
    worker_id: str,
    job_id: str,
    *,
    ttl_s: float,
    default_capacity: int = DEFAULT_CAPACITY,
) -> bool:
    """Atomically take one of the worker's free slots for ``job_id`` for ``ttl_s`` seconds.

    False when the worker is full or gone. Reserving the same job twice refreshes its slot.
    ``ttl_s`` should cover the job's queue TTL plus its timeout. The capacity is the one
    :func:`get_worker` reads (the claim capped by the record, or by ``default_capacity``).
    """
    worker = await get_worker(redis, worker_id, default_capacity=default_capacity)
    if worker is None:
        return False
    return await _reserve(redis, worker, job_id, ttl_s, attested=worker.attested) == 1


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


class WorkerSnapshot:
    """The dispatcher's copy of the healthy workers, read off the request path.

    :meth:`start` runs a background task that re-reads the registry every ``refresh_s``
    seconds (:func:`list_workers`: bounded, batched). :meth:`workers` answers from memory; only
    the very first call, before any copy exists, waits for a read. A process that never calls
    :meth:`start` (a CLI, a test) gets a refresh kicked off in the background whenever its copy
    is older than ``refresh_s``. The copy may be a refresh old: a slot reservation checks, in
    Redis, that the worker still exists and has room.
    """

    def __init__(
        self,
        redis: AsyncRedis,
        *,
        refresh_s: float = 1.0,
        default_capacity: int = DEFAULT_CAPACITY,
        limit: int = MAX_INDEX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.refresh_s = refresh_s
        self.default_capacity = default_capacity
        self.limit = limit
        self.clock = clock
        self._workers: dict[str, WorkerInfo] | None = None
        self._taken_at = -math.inf
        self._reading: asyncio.Future[None] | None = None
        self._loop: asyncio.Task[None] | None = None

    @property
    def age_s(self) -> float:
        """Seconds since the copy was read (infinite before the first read)."""
        return self.clock() - self._taken_at

    async def refresh(self) -> None:
        """Read the registry now (concurrent callers share one read)."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read())
        await asyncio.shield(self._reading)

    async def _read(self) -> None:
        workers = await list_workers(
            self.redis, default_capacity=self.default_capacity, limit=self.limit
        )
        self._workers = {w.worker_id: w for w in workers}
        self._taken_at = self.clock()

    async def workers(self, model: str | None = None) -> list[WorkerInfo]:
        """The healthy workers (of ``model``) as of the last read."""
        if self._workers is None:
            await self.refresh()
        elif self._loop is None and self.age_s > self.refresh_s:
            self._refresh_later()
        assert self._workers is not None
        return [w for w in self._workers.values() if model is None or w.model == model]

    def _refresh_later(self) -> None:
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read())
            self._reading.add_done_callback(_log_failure)

    def reserved(self, worker_id: str) -> None:
        """This process reserved a slot on the worker: count it until the next read."""
        if self._workers and (worker := self._workers.get(worker_id)) is not None:
            self._workers[worker_id] = worker.model_copy(update={"reserved": worker.reserved + 1})

    def forget(self, worker_id: str) -> None:
        """The worker is gone (found so by a reservation): drop it until the next read."""
        if self._workers:
            self._workers.pop(worker_id, None)

    def start(self) -> None:
        """Refresh in the background from now on (call from the running event loop)."""
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Redis down: keep the last copy, try again
                log.warning("worker snapshot not refreshed: %s", error)
            await asyncio.sleep(self.refresh_s)

    async def close(self) -> None:
        tasks = [t for t in (self._loop, self._reading) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
        self._loop = None


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("worker snapshot not refreshed: %s", future.exception())


async def pick_worker(
    redis: AsyncRedis,
    model: str,
    *,
    conversation_id: str | None = None,
    exclude: Iterable[str] = (),
    job_id: str | Callable[[str], str] | None = None,
    slot_ttl_s: float = 900.0,
    attested_only: bool = False,
    snapshot: WorkerSnapshot | None = None,
    default_capacity: int = DEFAULT_CAPACITY,
) -> WorkerInfo | None:
    """The worker that should run the next turn, or None when none is healthy and has room.

    Preference: the conversation's previous worker (:func:`remember_route`) when it is healthy,
    not excluded and has room, so the engine's prefix cache hits; otherwise the least loaded
    (by ``reserved / capacity``, ties broken at random to spread dispatchers apart).

    With ``snapshot``, candidates come from it (no index read on this path); without, from
    :func:`list_workers`. When the snapshot offers no candidate and is older than a tenth of
    its refresh period, it is read once more before answering None (a worker that just came).

    With ``job_id``, a slot is reserved atomically on the chosen worker (see the module doc);
    if another dispatcher took the last slot meanwhile, the next candidate is tried.
    ``job_id`` may be a function of the worker id (job ids carry their worker's id).
    With ``attested_only``, workers the backend has not attested are skipped, and a worker
    whose record vanished since the snapshot was read is not reserved.
    """
    excluded = set(exclude)

    async def candidates() -> list[WorkerInfo]:
        if snapshot is not None:
            pool = await snapshot.workers(model)
        else:
            pool = await list_workers(redis, model, default_capacity=default_capacity)
        return [
            w
            for w in pool
            if w.worker_id not in excluded and w.has_room and (w.attested or not attested_only)
        ]

    found = await candidates()
    if not found and snapshot is not None and snapshot.age_s > snapshot.refresh_s / 10:
        await snapshot.refresh()
        found = await candidates()
    random.shuffle(found)
    found.sort(key=lambda w: w.effective_load / w.capacity)
    if conversation_id is not None:
        sticky_id = valid_worker_id(await redis.get(route_key(conversation_id)))
        if sticky_id is not None:
            found.sort(key=lambda w: w.worker_id != sticky_id)  # stable: sticky first
    for worker in found:
        if job_id is None:
            return worker
        slot = job_id(worker.worker_id) if callable(job_id) else job_id
        try:
            outcome = await _reserve(redis, worker, slot, slot_ttl_s, attested=worker.attested)
        except ResponseError as error:  # e.g. its entry is no longer a hash
            log.warning("worker %s: no slot reserved: %s", worker.worker_id, error)
            outcome = -1
        if outcome == 1:
            if snapshot is not None:
                snapshot.reserved(worker.worker_id)
            return worker.model_copy(update={"reserved": worker.reserved + 1})
        if outcome < 0 and snapshot is not None:
            snapshot.forget(worker.worker_id)
    return None


async def remember_route(
    redis: AsyncRedis, conversation_id: str, worker_id: str, ttl_s: int
) -> None:
    """Send the conversation's next turns to ``worker_id`` while it is healthy and has room."""
    await redis.set(route_key(conversation_id), worker_id, ex=ttl_s)


# -- internals --------------------------------------------------------------------------------


def _members(reply: Iterable[object]) -> list[bytes | str]:
    """The members of a ZRANGE reply without scores (bytes, or str from a decoding client)."""
    return [member for member in reply if isinstance(member, bytes | str)]


def _reply(value: Any) -> Any:
    """A pipeline reply, or None where Redis answered an error (e.g. WRONGTYPE)."""
    return None if isinstance(value, Exception) else value


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _record(worker_id: str, raw: Any) -> AttestationRecord | None:
    if raw is None:
        return None
    try:
        record = AttestationRecord.model_validate_json(raw)
    except ValidationError:
        log.warning("attestation record of %s is not readable; ignored", worker_id)
        return None
    return record if record.worker_id == worker_id else None


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
    record = _record(worker_id, raw_record)
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
