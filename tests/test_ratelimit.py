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


async def test_a_minutes_count_expires_with_its_first_turn_and_only_then(redis_url: str) -> None:
    from backend.ratelimit import RATE, WINDOW_TTL_S
    from workers.redis_keys import redis_key

    now = [700.0 * 60 + 5]
    client = aioredis.Redis.from_url(redis_url)
    key = redis_key(RATE, "9", "700")
    try:
        await client.delete(key)
        limiter = RateLimiter(client, 2, clock=lambda: now[0])
        assert await limiter.allow(9) == 0
        assert await client.get(key) == b"1"
        assert 0 < await client.ttl(key) <= WINDOW_TTL_S  # set with the first turn
        await client.expire(key, 30)
        assert await limiter.allow(9) == 0
        assert 0 < await client.ttl(key) <= 30  # later turns leave the expiry as it is
        assert await limiter.allow(9) == 55
        await client.pexpire(key, 1)  # the window's key goes: Redis drops it
        while await client.exists(key):
            await client.execute_command("PING")
        assert await limiter.allow(9) == 0  # a fresh count, with an expiry of its own again
        assert await client.get(key) == b"1"
        assert 0 < await client.ttl(key) <= WINDOW_TTL_S
    finally:
        await client.delete(key)
        await client.aclose()


async def test_a_turn_is_counted_in_one_round_trip(redis_url: str) -> None:
    sent: list[object] = []

    class Counting(aioredis.Connection):
        async def send_packed_command(self, command: object, check_health: bool = True) -> None:
            sent.append(command)  # one call per socket write: a command or a whole pipeline
            await super().send_packed_command(command, check_health)  # type: ignore[arg-type]

    pool = aioredis.ConnectionPool.from_url(redis_url, connection_class=Counting)
    client = aioredis.Redis.from_pool(pool)  # closed with the client
    try:
        await client.ping()  # the connection's own set-up is not the limiter's
        limiter = RateLimiter(client, 5, clock=lambda: 800.0 * 60)
        await client.delete("cocoon:chat:rate:10:800")
        sent.clear()
        assert await limiter.allow(10) == 0  # the minute's first turn: count and expiry
        assert await limiter.allow(10) == 0
        assert len(sent) == 2
    finally:
        await client.aclose()
