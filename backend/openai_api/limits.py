"""How much one user and one API key may ask of the API, answered with 429 and ``Retry-After``.

* Turns per user per minute: ``COCOON_RATE_LIMIT_PER_MINUTE``, the one budget the bot and the
  Mini App count too (:class:`backend.ratelimit.RateLimiter`).
* Turns per API key per minute: ``COCOON_API_RATE_LIMIT_PER_KEY_PER_MINUTE``.
* Turns running at once per user and per key: ``COCOON_API_MAX_CONCURRENT_PER_USER`` and
  ``..._PER_KEY`` (:class:`backend.ratelimit.ConcurrencyLimiter`), so one key cannot take every
  worker slot and shut other users out.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator

from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError

from backend.errors import ErrorCode
from backend.openai_api.protocol import ApiError
from backend.ratelimit import ConcurrencyLimiter, RateLimiter
from backend.settings import Settings

CONCURRENCY_RETRY_S = 1

log = logging.getLogger("cocoon.openai_api")


def key_subject(api_key: str) -> str:
    """An API key's name in the limits' Redis keys: a digest, never the key."""
    return "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:32]


def _too_many(message: str, retry_after: int) -> ApiError:
    return ApiError(ErrorCode.RATE_LIMITED, message, retry_after=retry_after)


@contextlib.asynccontextmanager
async def turn_limits(
    redis: AsyncRedis, settings: Settings, user_id: int, api_key: str, *, lease_s: float
) -> AsyncIterator[None]:
    """A place for one turn of ``user_id`` through ``api_key``, held until the block ends; an
    ApiError (429, ``retry_after``) when a limit is reached (then nothing was taken)."""
    key = key_subject(api_key)
    user = f"user-{user_id}"
    token = uuid.uuid4().hex
    per_user = ConcurrencyLimiter(redis, settings.api_max_concurrent_per_user, lease_s=lease_s)
    per_key = ConcurrencyLimiter(redis, settings.api_max_concurrent_per_key, lease_s=lease_s)
    if not await per_key.acquire(key, token):
        raise _too_many(
            f"this API key already runs {per_key.limit} requests at once; wait for one to end",
            CONCURRENCY_RETRY_S,
        )
    try:
        if not await per_user.acquire(user, token):
            raise _too_many(
                f"your account already runs {per_user.limit} requests at once; wait for one to end",
                CONCURRENCY_RETRY_S,
            )
        try:
            wait = await RateLimiter(redis, settings.api_rate_limit_per_key_per_minute).allow(key)
            if wait:
                raise _too_many(
                    f"this API key has used its {settings.api_rate_limit_per_key_per_minute} "
                    "requests of this minute",
                    wait,
                )
            wait = await RateLimiter(redis, settings.rate_limit_per_minute).allow(user_id)
            if wait:
                raise _too_many(
                    f"your account has used its {settings.rate_limit_per_minute} turns of this "
                    "minute (shared by the bot, the Mini App and the API)",
                    wait,
                )
            yield
        finally:
            await _release(per_user, user, token)
    finally:
        await _release(per_key, key, token)


async def _release(limiter: ConcurrencyLimiter, subject: str, token: str) -> None:
    """Give the place back. Redis away (a failover) at the end of a turn that was answered and
    billed must not turn the answer into a 503 that says nothing was charged: the place then
    goes back when its lease ends."""
    try:
        await limiter.release(subject, token)
    except RedisError as error:
        log.warning("a turn's place is left to its lease (Redis unreachable: %s)", error)
