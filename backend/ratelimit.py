"""Chat turns per user per minute, counted in Redis: one budget for the bot and the Mini App,
shared by every replica."""

from __future__ import annotations

import time
from collections.abc import Callable

from redis.asyncio import Redis as AsyncRedis

from workers.redis_keys import redis_key

RATE = "chat:rate"  # cocoon:chat:rate:<user id>:<minute>: chat turns started in that minute


class RateLimiter:
    """At most ``per_minute`` turns per user in each clock minute."""

    def __init__(
        self, redis: AsyncRedis, per_minute: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.redis = redis
        self.per_minute = per_minute
        self.clock = clock

    async def allow(self, user_id: int) -> int:
        """0 when allowed; else the seconds to wait."""
        now = self.clock()
        key = redis_key(RATE, str(user_id), str(int(now // 60)))
        count = await self.redis.incr(key)
        if count == 1:
            await self.redis.expire(key, 120)
        if count <= self.per_minute:
            return 0
        return max(1, int(60 - now % 60))
