"""Onboarding state in Redis: registration tokens, renewal tokens and nonces.

* A registration token (``cct_...``) is issued by an operator for one provider
  (``cocoon provider token``) and is good for one successful registration.
* A reusable enrollment token (``cce_...``) is kept in the database, not here
  (:mod:`backend.attestation.enrollment`); its nonces are issued and checked here all the same.
* A renewal token is given (sealed) to a registered worker for its next attestation; each
  attestation replaces it.
* A nonce is issued to the holder of a token, lives ``nonce_ttl_s`` seconds and is consumed by the
  first registration that uses it, accepted or not (``GETDEL``): fresh and single-use. A
  registration that fails on the backend's side (it cannot verify now, or crashes) decides
  nothing and leaves the nonce (and the token) as they were.

Tokens are stored as their SHA-256 only; so is each attested worker's Redis password
(:func:`keep_acl_digest`), kept for as long as its attestation record so that the backend can
recreate the worker's ACL user after a Redis restart or failover.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from workers.redis_keys import ATTEST_NONCE, REG_TOKEN, RENEW_TOKEN, WORKER_ACL, redis_key
from workers.registry import valid_worker_id

REGISTRATION_PREFIX = "cct_"
RENEWAL_PREFIX = "ccr_"


@dataclass(frozen=True)
class TokenGrant:
    """What a token entitles to."""

    kind: str  # "registration", "renewal" or "enrollment" (a reusable one, in the database)
    token_hash: str
    provider_id: int | None
    worker_id: str | None = None
    enrollment_id: int | None = None


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _token_key(token: str) -> str | None:
    if token.startswith(REGISTRATION_PREFIX):
        return redis_key(REG_TOKEN, _hash(token))
    if token.startswith(RENEWAL_PREFIX):
        return redis_key(RENEW_TOKEN, _hash(token))
    return None


async def issue_registration_token(redis: AsyncRedis, provider_id: int | None, ttl_s: int) -> str:
    token = REGISTRATION_PREFIX + secrets.token_urlsafe(24)
    await redis.set(
        redis_key(REG_TOKEN, _hash(token)), json.dumps({"provider_id": provider_id}), ex=ttl_s
    )
    return token


async def issue_renewal_token(
    redis: AsyncRedis, worker_id: str, provider_id: int | None, ttl_s: int
) -> str:
    token = RENEWAL_PREFIX + secrets.token_urlsafe(24)
    value = json.dumps({"provider_id": provider_id, "worker_id": worker_id})
    await redis.set(redis_key(RENEW_TOKEN, _hash(token)), value, ex=ttl_s)
    return token


async def lookup_token(redis: AsyncRedis, token: str) -> TokenGrant | None:
    key = _token_key(token) if isinstance(token, str) else None
    if key is None:
        return None
    raw = await redis.get(key)
    if raw is None:
        return None
    data = json.loads(raw)
    kind = "registration" if token.startswith(REGISTRATION_PREFIX) else "renewal"
    worker_id = valid_worker_id(data.get("worker_id"))
    return TokenGrant(kind, _hash(token), data.get("provider_id"), worker_id)


async def consume_token(redis: AsyncRedis, token: str) -> bool:
    """Use the token up; False when it was already used (a concurrent registration won)."""
    key = _token_key(token)
    return key is not None and bool(await redis.delete(key))


async def token_ttl_ms(redis: AsyncRedis, token: str) -> int:
    """The token's remaining life in ms (0 when it is gone), to restore it with
    :func:`restore_token`."""
    key = _token_key(token)
    return max(0, int(await redis.pttl(key))) if key is not None else 0


async def restore_token(redis: AsyncRedis, token: str, grant: TokenGrant, ttl_ms: int) -> None:
    """Put back a token consumed by a registration that then failed on the backend's side."""
    key = _token_key(token)
    if key is None or ttl_ms <= 0:
        return
    value: dict[str, Any] = {"provider_id": grant.provider_id}
    if grant.kind == "renewal":
        value["worker_id"] = grant.worker_id
    await redis.set(key, json.dumps(value), px=ttl_ms, nx=True)


async def issue_nonce(redis: AsyncRedis, grant: TokenGrant, ttl_s: int) -> str:
    nonce = secrets.token_hex(32)
    await redis.set(redis_key(ATTEST_NONCE, nonce), grant.token_hash, ex=ttl_s)
    return nonce


def _nonce_problem(nonce: Any) -> str | None:
    if not isinstance(nonce, str) or not 16 <= len(nonce) <= 128:
        return "the nonce is malformed"
    return None


def _holder_problem(holder: Any, grant: TokenGrant) -> str | None:
    if holder is None:
        return (
            "the nonce is unknown, expired or already used (evidence must be taken for a "
            "fresh nonce from /v1/workers/nonce, once)"
        )
    if (holder.decode() if isinstance(holder, bytes) else holder) != grant.token_hash:
        return "the nonce was issued to another token"
    return None


async def check_nonce(redis: AsyncRedis, nonce: Any, grant: TokenGrant) -> str | None:
    """None when the nonce is good (and still unused: see :func:`consume_nonce`); else why it is
    refused. Verification runs between the two, so a backend fault does not spend the nonce."""
    problem = _nonce_problem(nonce)
    if problem:
        return problem
    return _holder_problem(await redis.get(redis_key(ATTEST_NONCE, nonce)), grant)


async def consume_nonce(redis: AsyncRedis, nonce: Any, grant: TokenGrant) -> str | None:
    """None when the nonce is good (and now used up); else why it is refused."""
    problem = _nonce_problem(nonce)
    if problem:
        return problem
    return _holder_problem(await redis.getdel(redis_key(ATTEST_NONCE, nonce)), grant)


async def restore_nonce(redis: AsyncRedis, nonce: str, grant: TokenGrant, ttl_s: int) -> None:
    """Put back a nonce consumed by a registration that then failed on the backend's side."""
    await redis.set(redis_key(ATTEST_NONCE, nonce), grant.token_hash, ex=ttl_s, nx=True)


# -- worker passwords (their SHA-256) -----------------------------------------------------------


def _acl_key(worker_id: str) -> str:
    return redis_key(WORKER_ACL, worker_id)


async def keep_acl_digest(
    redis: AsyncRedis, worker_id: str, digest: str, expires_at: float
) -> None:
    """Remember the SHA-256 of the worker's Redis password until its evidence expires."""
    await redis.set(_acl_key(worker_id), digest, exat=max(1, math.ceil(expires_at)))


async def acl_digests(redis: AsyncRedis, worker_ids: list[str]) -> dict[str, str]:
    """The digests kept for these workers (those that have one), in one round trip."""
    if not worker_ids:
        return {}
    values = await redis.mget([_acl_key(worker_id) for worker_id in worker_ids])
    return {
        worker_id: value.decode() if isinstance(value, bytes) else value
        for worker_id, value in zip(worker_ids, values, strict=True)
        if value is not None
    }


async def forget_acl_digest(redis: AsyncRedis, worker_id: str) -> None:
    await redis.delete(_acl_key(worker_id))
