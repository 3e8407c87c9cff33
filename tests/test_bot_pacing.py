"""The bot's pacing of new messages (bot/pacing.py) on a real Redis: only IN_FLIGHT of them are
on their way at once, so that late ones cannot bunch past Telegram's limit; the others wait for
a place, then go; what is not a new message is never held."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from aiogram import Bot
from aiogram.methods import SendMessage, SendMessageDraft

from bot.pacing import IN_FLIGHT, SendPacer


class Telegram:
    """A make_request that keeps every request on its way until it is let go."""

    def __init__(self) -> None:
        self.on_the_way = 0
        self.most = 0
        self.answered = 0
        self.go = asyncio.Event()
        self.arrived = asyncio.Event()

    async def __call__(self, _bot: Bot, method: Any) -> str:
        self.on_the_way += 1
        self.most = max(self.most, self.on_the_way)
        self.arrived.set()
        try:
            await self.go.wait()
            self.answered += 1
            return "ok"
        finally:
            self.on_the_way -= 1


class Pacer(SendPacer):
    """Tells when so many messages have had their moment (and now ask for a place)."""

    def __init__(self, redis: aioredis.Redis, expected: int) -> None:
        super().__init__(redis)
        self.asked = 0
        self.expected = expected
        self.all_asked = asyncio.Event()

    async def on_its_way(self) -> float:
        self.asked += 1
        if self.asked == self.expected:
            self.all_asked.set()
        return await super().on_its_way()


async def test_only_so_many_new_messages_are_on_their_way_at_once(redis_url: str) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    count = IN_FLIGHT * 2
    pacer = Pacer(redis, count)
    telegram = Telegram()
    bot = Bot("42:TEST-pacing")
    try:
        sends = [
            asyncio.create_task(pacer(telegram, bot, SendMessage(chat_id=1000 + n, text="hi")))
            for n in range(count)
        ]
        # Every message's moment comes (24 a second): then IN_FLIGHT are on their way and the
        # rest wait for a place, however long Telegram takes.
        await asyncio.wait_for(pacer.all_asked.wait(), 60)
        for _ in range(50):
            await asyncio.sleep(0)
        assert telegram.on_the_way == IN_FLIGHT
        # A draft is no new message: it goes at once.
        draft = SendMessageDraft(chat_id=1, draft_id=1, text="…")
        other = asyncio.create_task(pacer(telegram, bot, draft))
        async with asyncio.timeout(60):
            while telegram.on_the_way <= IN_FLIGHT:
                telegram.arrived.clear()
                await telegram.arrived.wait()
        telegram.go.set()
        assert await asyncio.gather(*sends, other) == ["ok"] * (count + 1)
        assert telegram.most == IN_FLIGHT + 1
        assert telegram.answered == count + 1
    finally:
        await bot.session.close()
        await redis.aclose()
