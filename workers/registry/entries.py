"""A worker's own entry in the registry: what it claims, the key names, and the node's writes.

Health. A worker's hash expires ``ttl_s`` seconds after its last heartbeat, by Redis's own clock,
so "healthy" means "the hash exists": no clock of the worker or the dispatcher is trusted.

A worker node writes only its entry ``cocoon:worker:<id>`` (:func:`register`, :func:`heartbeat`,
:func:`unregister`); they take a ``redis.Redis`` or a ``redis.asyncio.Redis``, and with the
asyncio client you await the result.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Awaitable
from typing import Literal, overload

from pydantic import BaseModel, Field
from redis.asyncio import Redis as AsyncRedis

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

DEFAULT_TTL_S = 10
"""A worker is dead this many seconds after its last heartbeat (the node beats every ~2 s)."""

DEFAULT_CAPACITY = 64
"""Jobs at once a worker gets when nothing else caps it (``COCOON_ATTESTATION__DEFAULT_CAPACITY``
is the backend's setting)."""


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
