"""Chat turns per user per minute, counted in Redis: one budget for the bot, the Mini App and the
OpenAI-compatible API, shared by every replica; and turns running at once per user or per API
key (:class:`ConcurrencyLimiter`), for the API."""

from __future__ import annotations

import time
from collections.abc import Callable

from redis.asyncio import Redis as AsyncRedis

from workers.redis_keys import redis_key

RATE = "chat:rate"  # cocoon:chat:rate:<user id>:<minute>: chat turns started in that minute
RUNNING = "chat:running"  # cocoon:chat:running:<subject>: sorted set of running turns, by expiry


WINDOW_TTL_S = 120  # a minute's count outlives its minute, then goes

_COUNT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return count
"""


class RateLimiter:
    """At most ``per_minute`` turns per user in each clock minute."""

    def __init__(
        self, redis: AsyncRedis, per_minute: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.redis = redis
        self.per_minute = per_minute
        self.clock = clock

    async def allow(self, user_id: int | str) -> int:
        """0 when allowed; else the seconds to wait. ``user_id`` is the subject of the budget:
        a user's id (the budget every client shares), or another name (an API key's)."""
        now = self.clock()
        key = redis_key(RATE, str(user_id), str(int(now // 60)))
        # One round trip: the count and, on the minute's first turn, its key's expiry, set
        # together (a crash between the two can no longer leave a key that never expires).
        count = int(await self.redis.eval(_COUNT, 1, key, str(WINDOW_TTL_S)))
        if count <= self.per_minute:
            return 0
        return max(1, int(60 - now % 60))


_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class ConcurrencyLimiter:
    """At most ``limit`` turns running at once per subject (a user, an API key). A turn's place
    is taken by :meth:`acquire` and given back by :meth:`release`; one whose process died
    expires after ``lease_s`` (the longest a turn can run), so a crash never locks a user out."""

    def __init__(
        self,
        redis: AsyncRedis,
        limit: int,
        *,
        lease_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.limit = limit
        self.lease_s = lease_s
        self.clock = clock

    async def acquire(self, subject: str, token: str) -> bool:
        """Take a place for ``token``; False when ``limit`` turns of ``subject`` are running."""
        now = self.clock()
        taken = await self.redis.eval(
            _ACQUIRE,
            1,
            redis_key(RUNNING, subject),
            str(now),
            str(now + self.lease_s),
            str(self.limit),
            token,
            str(int(self.lease_s) + 60),
        )
        return int(taken) == 1

    async def release(self, subject: str, token: str) -> None:
        await self.redis.zrem(redis_key(RUNNING, subject), token)
