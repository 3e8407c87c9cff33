"""One chat-turn budget per user per minute, in Redis, shared by the bot and the Mini App."""

from __future__ import annotations

import redis.asyncio as aioredis

from backend.ratelimit import RateLimiter


async def test_turns_beyond_the_budget_wait_for_the_next_minute(redis_url: str) -> None:
    now = [600.0 * 60 + 15]
    client = aioredis.Redis.from_url(redis_url)
    try:
        bot = RateLimiter(client, 3, clock=lambda: now[0])
        miniapp = RateLimiter(client, 3, clock=lambda: now[0])
        assert [await bot.allow(7), await miniapp.allow(7), await bot.allow(7)] == [0, 0, 0]
        assert await miniapp.allow(7) == 45  # the same budget, whichever client asks
        assert await bot.allow(8) == 0  # another user has a budget of its own
        now[0] += 45
        assert await bot.allow(7) == 0
    finally:
        await client.aclose()
