"""Where a turn goes: slot reservations (an atomic Lua script), sticky routes, :func:`pick_worker`
(the route read and the reservation one script, one round trip).

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
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import overload

from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ResponseError

from workers.redis_keys import AnyRedis, SyncRedis, finish
from workers.registry.entries import (
    DEFAULT_CAPACITY,
    WorkerInfo,
    attestation_key,
    route_key,
    slots_key,
    valid_worker_id,
    worker_key,
)
from workers.registry.reading import get_worker, list_workers
from workers.registry.snapshot import WorkerSnapshot

log = logging.getLogger(__name__)


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


_PICK = """
local ttl = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local order = {}
for i = 1, n do order[i] = i end
if ARGV[3] == '1' then
  local sticky = redis.call('GET', KEYS[1])
  if sticky then
    for position = 1, n do
      if ARGV[3 + (order[position] - 1) * 4 + 1] == sticky then
        table.insert(order, 1, table.remove(order, position))
        break
      end
    end
  end
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local gone = {}
for _, i in ipairs(order) do
  local k = 1 + (i - 1) * 3
  local a = 3 + (i - 1) * 4
  local entry = redis.pcall('HEXISTS', KEYS[k + 1], 'info')
  if type(entry) ~= 'number' or entry == 0
      or (ARGV[a + 4] == '1' and redis.call('EXISTS', KEYS[k + 3]) == 0) then
    table.insert(gone, i)
  else
    local slots = KEYS[k + 2]
    local job = ARGV[a + 2]
    redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
    if redis.call('ZSCORE', slots, job) or redis.call('ZCARD', slots) < tonumber(ARGV[a + 3]) then
      redis.call('ZADD', slots, now + ttl, job)
      redis.call('EXPIRE', slots, math.ceil(ttl) + 60)
      table.insert(gone, 1, i)
      return gone
    end
  end
end
table.insert(gone, 1, 0)
return gone
"""

PICK_IN_ONE_STEP = 64
"""Up to this many candidates, picking and reserving is one script (one round trip): the
conversation's route read, then each candidate in order tried as :data:`_RESERVE` does."""


async def _pick(
    redis: AsyncRedis,
    found: list[WorkerInfo],
    job_id: str | Callable[[str], str],
    ttl_s: float,
    conversation_id: str | None,
) -> tuple[int, list[int]]:
    """(1-based index of the worker reserved, 0 if none; indices of the workers gone)."""
    keys = [route_key(conversation_id) if conversation_id is not None else "-"]
    args: list[str | int | float] = [ttl_s, len(found), "1" if conversation_id is not None else "0"]
    for worker in found:
        keys += [
            worker_key(worker.worker_id),
            slots_key(worker.worker_id),
            attestation_key(worker.worker_id),
        ]
        slot = job_id(worker.worker_id) if callable(job_id) else job_id
        args += [worker.worker_id, slot, worker.capacity, "1" if worker.attested else "0"]
    result = await redis.eval(_PICK, len(keys), *keys, *args)
    return int(result[0]), [int(index) for index in result[1:]]


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
    if job_id is not None and 0 < len(found) <= PICK_IN_ONE_STEP:
        try:
            chosen, gone = await _pick(redis, found, job_id, slot_ttl_s, conversation_id)
        except ResponseError as error:  # e.g. a slot set that is not one: one by one, below
            log.warning("no slot reserved in one step: %s", error)
        else:
            if snapshot is not None:
                for index in gone:
                    snapshot.forget(found[index - 1].worker_id)
            if not chosen:
                return None
            worker = found[chosen - 1]
            if snapshot is not None:
                snapshot.reserved(worker.worker_id)
            return worker.model_copy(update={"reserved": worker.reserved + 1})
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
