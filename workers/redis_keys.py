"""Redis key names of the worker side, and the one bridge between sync and asyncio clients.

Every key Cocoon's worker modules use is built by :func:`redis_key` from a named namespace
below, so the layout can be read (and audited for plaintext) in one place:

========================================  ==========================================================
``cocoon:workers``                        sorted set: the index of worker ids, written by the
                                          backend only (at acceptance; dropped at revocation
                                          or expiry), and by a directly registered dev worker
``cocoon:worker:<worker_id>``             hash: one worker's :class:`~workers.registry.WorkerInfo`
                                          and live load; expires ``ttl_s`` after its last
                                          heartbeat; the only key of the registry a worker writes
``cocoon:worker-slots:<worker_id>``       sorted set: job ids assigned to the worker by a
                                          dispatcher, scored by their expiry (Redis clock);
                                          written by the backend only
``cocoon:route:<route id>``               string: worker id of the conversation's last turn; the
                                          backend names it ``r-`` + HMAC of the conversation id
                                          (``backend.serverkeys``)
``cocoon:queue:<worker_id>``              name (not key) of the worker's own RQ queue
``cocoon:stream:<job_id>``                stream: the job's sealed reply events (its last entry
                                          also carries the worker's signed receipt in the clear:
                                          digests and counts); a challenge job's one entry is
                                          the worker's signature of a client's nonce
``cocoon:cancel:<job_id>``                string: set when the job's cancellation was requested
``cocoon:cancel``                         pub/sub channel: job ids whose cancellation was requested
``cocoon:attestation:<worker_id>``        string: the backend's record of the worker's verified
                                          evidence (TEE kind, keys, provider, expiry); written
                                          only by the backend, expires with the evidence
``cocoon:evidence:<worker_id>``           string: the evidence the backend accepted, as the
                                          worker sent it, for the public attestation report
                                          (``backend.attestation.report``); backend only, expires
                                          with the attestation record
``cocoon:sealed-job:<job_id>``            string: a sealed turn's job id, used once (a week)
``cocoon:worker-acl:<worker_id>``         string: SHA-256 of the worker's Redis password, so the
                                          backend can recreate its ACL user after a Redis restart
                                          or failover; expires with the attestation record
``cocoon:reg-token:<sha256 of token>``    string: a provider's one-time registration token
``cocoon:renew-token:<sha256 of token>``  string: a worker's token for its next attestation
``cocoon:attest-nonce:<nonce>``           string: a nonce the backend issued, single-use
``cocoon:stars-pending``                  hash: Stars payments not credited yet (the database was
                                          down), charge id → JSON record (charge id, Telegram id,
                                          Stars, invoice payload, why it was refused: nothing
                                          secret); written by the bot, each field deleted once
                                          credited (``backend.accounts.stars_pending``)
========================================  ==========================================================
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import redis
import redis.asyncio

PREFIX = "cocoon:"

WORKERS_INDEX = "workers"
WORKER = "worker"
WORKER_SLOTS = "worker-slots"
ROUTE = "route"
QUEUE = "queue"
STREAM = "stream"
CANCEL = "cancel"
ATTESTATION = "attestation"
WORKER_ACL = "worker-acl"
REG_TOKEN = "reg-token"
RENEW_TOKEN = "renew-token"
ATTEST_NONCE = "attest-nonce"

T = TypeVar("T")

SyncRedis: TypeAlias = redis.Redis
AsyncRedis: TypeAlias = redis.asyncio.Redis
AnyRedis: TypeAlias = redis.Redis | redis.asyncio.Redis
"""Either client: the functions that take one (a node's own entry, its stream, its cancel flag)
return the value with ``redis.Redis`` and an awaitable of it with ``redis.asyncio.Redis``, as
redis-py's commands do; their overloads say which."""


def redis_key(namespace: str, *parts: str) -> str:
    """``cocoon:<namespace>[:<part>...]``; parts must not be empty."""
    for part in parts:
        if not part:
            raise ValueError(f"empty part in a {namespace!r} key")
    return ":".join((PREFIX + namespace, *parts))


def finish(result: Any, transform: Callable[[Any], T]) -> T | Awaitable[T]:
    """Apply ``transform`` to a redis-py result, awaiting it first if the client is asyncio.

    This lets one function serve both ``redis.Redis`` (returns the value) and
    ``redis.asyncio.Redis`` (returns an awaitable of the value), as redis-py's own commands do.
    """
    if inspect.isawaitable(result):

        async def _later() -> T:
            return transform(await result)

        return _later()
    return transform(result)
