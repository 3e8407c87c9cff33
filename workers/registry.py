"""The worker registry in Redis: who serves which model, how busy, and where a turn should go.

Writer side (the worker node): :func:`register`, :func:`heartbeat`, :func:`unregister`,
:func:`release_slot`. They take a ``redis.Redis`` or a ``redis.asyncio.Redis``; with the asyncio
client, await the result.

Reader side (the backend dispatcher, ``redis.asyncio.Redis``): :func:`list_workers`,
:func:`get_worker`, :func:`pick_worker`, :func:`reserve_slot`, :func:`remember_route`.

Health. A worker's hash expires ``ttl_s`` seconds after its last heartbeat, by Redis's own clock,
so "healthy" means "the hash exists": no clock of the worker or the dispatcher is trusted.
The ``cocoon:workers`` sorted set is only an index; entries whose hash has expired are dropped
lazily by readers.

Load. The node reports ``load`` (jobs running now) on every heartbeat, and sooner when it
changes, but a report is always a little stale. So a dispatcher also *reserves a slot* when it
assigns a job (:func:`reserve_slot`, or ``pick_worker(..., job_id=...)``): an atomic Lua script
that refuses when ``max(reserved slots, reported load) >= capacity``, else adds the job id to the
worker's slot set with an expiry (Redis clock). The node removes the job's slot when the job
ends, whatever the outcome (:func:`release_slot`); a slot whose job never ran (its RQ TTL passed,
or the node died) simply expires. Two dispatchers racing for the last slot cannot both win.

Attestation. The node's own entry is only its claim. What the backend verified lives in a
separate key that only the backend writes, ``cocoon:attestation:<worker_id>``
(:class:`AttestationRecord`: TEE kind, the attested keys, model, provider, expiry; it expires
with the evidence). Readers merge the two: a worker whose record exists, is unexpired (Redis
clock) and carries the same keys and model is ``attested`` with the record's ``tee`` and
``provider_id``; a worker without a record is an unattested development worker (``tee="dev"``,
``attested=False``) whatever it claims; a worker whose record disagrees with its entry is not
listed at all. ``pick_worker(..., attested_only=True)`` skips unattested workers.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError
from redis.asyncio import Redis as AsyncRedis

from workers.redis_keys import (
    ATTESTATION,
    QUEUE,
    ROUTE,
    WORKER,
    WORKER_SLOTS,
    WORKERS_INDEX,
    finish,
    redis_key,
)

__all__ = [
    "DEFAULT_TTL_S",
    "AttestationRecord",
    "WorkerInfo",
    "attestation_key",
    "get_worker",
    "heartbeat",
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
    "write_attestation",
]

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 10
"""A worker is dead this many seconds after its last heartbeat (the node beats every ~2 s)."""

WORKER_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
_DYNAMIC_FIELDS = {"load", "last_heartbeat", "reserved", "attested", "expires_at", "image"}

AnyRedis = Any  # redis.Redis | redis.asyncio.Redis: the writer side accepts either


class WorkerInfo(BaseModel):
    """One worker as the dispatcher sees it. Public keys are base64; nothing here is secret."""

    worker_id: str = Field(pattern=WORKER_ID_PATTERN)
    model: str = Field(min_length=1, max_length=200)
    engine: str
    engine_version: str
    box_public_key: str = Field(description="X25519 key that requests are sealed to (b64)")
    verify_key: str = Field(description="Ed25519 key that signs final records (b64)")
    capacity: int = Field(ge=1, description="jobs the node runs at once")
    load: int = Field(default=0, ge=0, description="jobs running, as last reported by the node")
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
        """Jobs the worker is busy with or about to receive."""
        return max(self.load, self.reserved)

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


# -- writer side (the node) -------------------------------------------------------------------


def register(redis: AnyRedis, info: WorkerInfo, ttl_s: int = DEFAULT_TTL_S) -> Any:
    """Publish ``info`` (replacing any previous entry of this worker id) with a fresh heartbeat."""
    now = time.time()
    static = info.model_dump_json(exclude=_DYNAMIC_FIELDS)
    key = worker_key(info.worker_id)
    pipe = redis.pipeline(transaction=True)
    pipe.delete(key)  # slots are kept: a node that re-registers after a stall keeps its jobs
    pipe.hset(key, mapping={"info": static, "load": info.load, "last_heartbeat": repr(now)})
    pipe.expire(key, ttl_s)
    pipe.zadd(INDEX_KEY, {info.worker_id: now})
    return finish(pipe.execute(), lambda _: None)


_HEARTBEAT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'load', ARGV[1], 'last_heartbeat', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
return 1
"""


def heartbeat(
    redis: AnyRedis, worker_id: str, load: int, ttl_s: int = DEFAULT_TTL_S
) -> bool | Awaitable[bool]:
    """Report ``load`` and extend the worker's life by ``ttl_s``.

    Returns False when the worker's entry is gone (unregistered, or expired after a stall):
    a heartbeat never resurrects a worker; the node must :func:`register` again.
    """
    now = time.time()
    result = redis.eval(
        _HEARTBEAT, 2, worker_key(worker_id), INDEX_KEY, load, repr(now), ttl_s, worker_id
    )
    return finish(result, lambda value: bool(int(value)))


def unregister(redis: AnyRedis, worker_id: str) -> Any:
    """Remove the worker at once: no dispatcher picks it after this returns."""
    pipe = redis.pipeline(transaction=True)
    pipe.delete(worker_key(worker_id), slots_key(worker_id))
    pipe.zrem(INDEX_KEY, worker_id)
    return finish(pipe.execute(), lambda _: None)


def release_slot(redis: AnyRedis, worker_id: str, job_id: str) -> Any:
    """Free the slot a dispatcher reserved for ``job_id`` (no-op when there is none)."""
    return finish(redis.zrem(slots_key(worker_id), job_id), lambda _: None)


# -- attestation records (the backend) --------------------------------------------------------


async def write_attestation(redis: AsyncRedis, record: AttestationRecord) -> None:
    """Record verified evidence; the key expires with it (Redis clock)."""
    await redis.set(
        attestation_key(record.worker_id),
        record.model_dump_json(),
        exat=max(1, math.ceil(record.expires_at)),
    )


async def read_attestation(redis: AsyncRedis, worker_id: str) -> AttestationRecord | None:
    raw = await redis.get(attestation_key(worker_id))
    return _record(worker_id, raw)


async def revoke_attestation(redis: AsyncRedis, worker_id: str) -> None:
    """Take the worker out of dispatch at once: its record and its registry entry go."""
    pipe = redis.pipeline(transaction=True)
    pipe.delete(attestation_key(worker_id), worker_key(worker_id))
    pipe.zrem(INDEX_KEY, worker_id)
    await pipe.execute()


# -- reader side (the dispatcher) -------------------------------------------------------------

_RESERVE = """
local info = redis.call('HMGET', KEYS[1], 'info', 'load')
if not info[1] then return -1 end
local capacity = tonumber(cjson.decode(info[1])['capacity'])
local load = tonumber(info[2]) or 0
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  local used = math.max(redis.call('ZCARD', KEYS[2]), load)
  if used >= capacity then return 0 end
end
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('EXPIRE', KEYS[2], math.ceil(ttl) + 60)
return 1
"""


async def reserve_slot(redis: AsyncRedis, worker_id: str, job_id: str, *, ttl_s: float) -> bool:
    """Atomically take one of the worker's free slots for ``job_id`` for ``ttl_s`` seconds.

    False when the worker is full or gone. Reserving the same job twice refreshes its slot.
    ``ttl_s`` should cover the job's queue TTL plus its timeout.
    """
    result = await redis.eval(
        _RESERVE, 2, worker_key(worker_id), slots_key(worker_id), job_id, ttl_s
    )
    return int(result) == 1


async def list_workers(redis: AsyncRedis, model: str | None = None) -> list[WorkerInfo]:
    """Healthy workers (of ``model``, if given), with live ``reserved`` counts."""
    ids = [_text(member) for member in await redis.zrange(INDEX_KEY, 0, -1)]
    if not ids:
        return []
    seconds, micros = await redis.time()
    now = seconds + micros / 1_000_000
    pipe = redis.pipeline(transaction=False)
    for worker_id in ids:
        pipe.hgetall(worker_key(worker_id))
        pipe.zcount(slots_key(worker_id), now, "+inf")
        pipe.get(attestation_key(worker_id))
    replies = await pipe.execute()
    workers: list[WorkerInfo] = []
    gone: list[str] = []
    rows = zip(ids, replies[::3], replies[1::3], replies[2::3], strict=True)
    for worker_id, fields, reserved, record in rows:
        info = _parse(worker_id, fields, reserved, record, now)
        if info is None:
            gone.append(worker_id)
        elif model is None or info.model == model:
            workers.append(info)
    if gone:
        await redis.zrem(INDEX_KEY, *gone)
    return workers


async def get_worker(redis: AsyncRedis, worker_id: str) -> WorkerInfo | None:
    """The worker if it is healthy, else None."""
    seconds, micros = await redis.time()
    now = seconds + micros / 1_000_000
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(worker_key(worker_id))
    pipe.zcount(slots_key(worker_id), now, "+inf")
    pipe.get(attestation_key(worker_id))
    fields, reserved, record = await pipe.execute()
    return _parse(worker_id, fields, reserved, record, now)


async def queued_jobs(redis: AsyncRedis, workers: list[WorkerInfo]) -> list[int]:
    """Jobs waiting in each worker's own RQ queue, in the order of ``workers`` (one round
    trip)."""
    if not workers:
        return []
    pipe = redis.pipeline(transaction=False)
    for info in workers:
        pipe.llen(f"rq:queue:{queue_name(info.worker_id)}")
    return [int(n) for n in await pipe.execute()]


async def pick_worker(
    redis: AsyncRedis,
    model: str,
    *,
    conversation_id: str | None = None,
    exclude: Iterable[str] = (),
    job_id: str | Callable[[str], str] | None = None,
    slot_ttl_s: float = 900.0,
    attested_only: bool = False,
) -> WorkerInfo | None:
    """The worker that should run the next turn, or None when none is healthy and has room.

    Preference: the conversation's previous worker (:func:`remember_route`) when it is healthy,
    not excluded and has room, so the engine's prefix cache hits; otherwise the least loaded
    (by ``effective_load / capacity``, ties broken at random to spread dispatchers apart).

    With ``job_id``, a slot is reserved atomically on the chosen worker (see the module doc);
    if another dispatcher took the last slot meanwhile, the next candidate is tried.
    ``job_id`` may be a function of the worker id (job ids carry their worker's id).
    With ``attested_only``, workers the backend has not attested are skipped.
    """
    excluded = set(exclude)
    candidates = [
        w
        for w in await list_workers(redis, model)
        if w.worker_id not in excluded and w.has_room and (w.attested or not attested_only)
    ]
    random.shuffle(candidates)
    candidates.sort(key=lambda w: w.effective_load / w.capacity)
    if conversation_id is not None:
        sticky = await redis.get(route_key(conversation_id))
        if sticky is not None:
            sticky_id = _text(sticky)
            candidates.sort(key=lambda w: w.worker_id != sticky_id)  # stable: sticky first
    for worker in candidates:
        if job_id is None:
            return worker
        slot = job_id(worker.worker_id) if callable(job_id) else job_id
        if await reserve_slot(redis, worker.worker_id, slot, ttl_s=slot_ttl_s):
            return worker.model_copy(update={"reserved": worker.reserved + 1})
    return None


async def remember_route(
    redis: AsyncRedis, conversation_id: str, worker_id: str, ttl_s: int
) -> None:
    """Send the conversation's next turns to ``worker_id`` while it is healthy and has room."""
    await redis.set(route_key(conversation_id), worker_id, ex=ttl_s)


# -- internals --------------------------------------------------------------------------------


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _record(worker_id: str, raw: Any) -> AttestationRecord | None:
    if raw is None:
        return None
    try:
        return AttestationRecord.model_validate_json(raw)
    except ValidationError:
        log.warning("attestation record of %s is not readable; ignored", worker_id)
        return None


def _parse(
    worker_id: str, fields: dict[Any, Any], reserved: int, raw_record: Any = None, now: float = 0.0
) -> WorkerInfo | None:
    if not fields:
        return None
    data = {_text(k): _text(v) for k, v in fields.items()}
    if "info" not in data:  # a partial hash: never written by register()
        return None
    try:
        info = WorkerInfo.model_validate_json(data["info"])
    except ValidationError:  # written by an incompatible version: not dispatchable
        log.warning("worker entry %s is not readable; skipped", worker_id)
        return None
    update: dict[str, Any] = {
        "load": int(data.get("load", 0)),
        "last_heartbeat": float(data.get("last_heartbeat", 0.0)),
        "reserved": int(reserved),
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
        update.update(
            tee=record.tee,
            attested=True,
            provider_id=record.provider_id,
            expires_at=record.expires_at,
            image=record.image,
        )
    return info.model_copy(update=update)
