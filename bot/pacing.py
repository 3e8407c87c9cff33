"""Keeping to Telegram's flood limits before sending, instead of learning them from 429s.

Telegram refuses a bot that sends more than about 30 messages a second in all, more than about
one a second in one chat, or more than 20 a minute in one group (core.telegram.org/bots/faq),
and aiogram does not pace anything. :class:`SendPacer`, a session middleware, reserves each new
message a moment to go out at, in one Redis script (so every replica of the bot shares the same
budget, on Redis's clock), and waits for it: a burst of answers is spread out, not refused.

The budgets are generic cell rate algorithm buckets (an interval and a burst), set under
Telegram's numbers so that a little jitter between here and Telegram breaks nothing: a bucket of
burst ``b`` and interval ``T`` lets at most ``b + W / T`` messages through in any window ``W``.
A busy process wakes late, and late messages would bunch with the punctual ones after them; so
at its moment each message is also counted in the bot's sliding window of the last second
(:data:`ALL_IN_A_SECOND`), and waits again while that window is full; and only a few
(:data:`IN_FLIGHT`) are on their way at once, so that a late few cannot bunch into a breach.
Edits, drafts and answers to button presses are not new messages: they are not paced here (the
reply's stream keeps its own pace for those, :mod:`bot.streaming`). A 429 that still comes is
waited out by :class:`backend.telegram.FloodWait`. When Redis cannot be reached, messages go out
unpaced (a reply is worth more than a pause).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiogram import Bot
from aiogram.client.session.middlewares.base import BaseRequestMiddleware, NextRequestMiddlewareType
from aiogram.methods import (
    CopyMessage,
    ForwardMessage,
    SendAnimation,
    SendAudio,
    SendContact,
    SendDice,
    SendDocument,
    SendInvoice,
    SendLocation,
    SendMediaGroup,
    SendMessage,
    SendPhoto,
    SendPoll,
    SendSticker,
    SendVenue,
    SendVideo,
    SendVideoNote,
    SendVoice,
    TelegramMethod,
)
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError

from workers.redis_keys import redis_key

log = logging.getLogger("cocoon.bot")

# cocoon:bot:pace:<all | chat id>: the bucket's next free moment (µs, on Redis's clock)
PACE = "bot:pace"

NEW_MESSAGES = (
    SendMessage,
    SendPhoto,
    SendDocument,
    SendInvoice,
    SendAudio,
    SendVoice,
    SendVideo,
    SendVideoNote,
    SendAnimation,
    SendSticker,
    SendMediaGroup,
    SendDice,
    SendLocation,
    SendContact,
    SendVenue,
    SendPoll,
    CopyMessage,
    ForwardMessage,
)


@dataclass(frozen=True)
class Budget:
    """One message per ``interval_s``, after a burst of ``burst``."""

    interval_s: float
    burst: int


ALL = Budget(1 / 24, 1)
"""Telegram's 30 a second in all: 24, evenly (measured on a loaded machine, the stand-in Bot API
saw up to 27 of them in one second: requests bunch on their way)."""
PRIVATE = Budget(1.0, 4)
"""Telegram's "about one a second" in a chat, after a burst of four."""
GROUP = Budget(4.0, 4)
"""Telegram's 20 a minute in a group: one every 4 s after a burst of four (19 a minute)."""
ALL_IN_A_SECOND = 24
"""At most this many messages sent in any second, in all (Telegram's 30, less the margin of
:data:`ALL`)."""
IN_FLIGHT = 6
"""At most this many new messages on their way at once (from their moment in the bot's last
second to Telegram's answer): on a busy machine, messages let out on time can still reach
Telegram together (late for the event loop or a connection); with at most this many late, any
second sees at most :data:`ALL_IN_A_SECOND` + :data:`IN_FLIGHT` (30) of them."""

# Room in the bot's sliding window of messages sent in the last second (W, a sorted set of
# moments in µs; N numbers its members), for LIMIT messages: 0 and one more in it; else the µs
# until its oldest leaves it.
_WINDOW = """
local function room(W, N, LIMIT, now)
  redis.call('ZREMRANGEBYSCORE', W, '-inf', string.format('%d', now - 1000000))
  if redis.call('ZCARD', W) >= LIMIT then
    local oldest = redis.call('ZRANGE', W, 0, 0, 'WITHSCORES')
    return math.max(1, tonumber(oldest[2]) + 1000000 - now)
  end
  local n = redis.call('INCR', N)
  redis.call('PEXPIRE', N, 2000)
  redis.call('ZADD', W, string.format('%d', now), string.format('%d', n))
  redis.call('PEXPIRE', W, 2000)
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""

# The buckets are KEYS[3..], each with its interval ARGV[2i] and burst ARGV[2i+1] (µs,
# messages); KEYS[1..2] and ARGV[1] are the window's. The earliest moment every bucket allows a
# message is taken in all of them; the µs until it, or, when it is now, the window's answer.
_RESERVE = (
    _WINDOW
    + """
local at = now
for i = 3, #KEYS do
  local interval = tonumber(ARGV[2 * i - 4])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  local allowed = tat - interval * (tonumber(ARGV[2 * i - 3]) - 1)
  if allowed > at then at = allowed end
end
for i = 3, #KEYS do
  local interval = tonumber(ARGV[2 * i - 4])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < at then tat = at end
  tat = tat + interval
  redis.call('SET', KEYS[i], string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
end
if at > now then return at - now end
return room(KEYS[1], KEYS[2], tonumber(ARGV[1]), now)
"""
)

_ROOM = _WINDOW + "return room(KEYS[1], KEYS[2], tonumber(ARGV[1]), now)"


def _chat(method: TelegramMethod[Any]) -> int | None:
    chat_id = getattr(method, "chat_id", None)
    if isinstance(chat_id, int):
        return chat_id
    if isinstance(chat_id, str) and chat_id.lstrip("-").isdigit():
        return int(chat_id)
    return None  # an @channel name: only the bot's budget in all


class SendPacer(BaseRequestMiddleware):
    """Waits, before each new message, for the moment the bot's and the chat's budgets allow."""

    def __init__(self, redis: AsyncRedis) -> None:
        self.redis = redis
        self._warned = False
        self._in_flight = asyncio.Semaphore(IN_FLIGHT)

    @staticmethod
    def _window() -> list[str]:
        return [redis_key(PACE, "sent"), redis_key(PACE, "sent-n")]

    async def reserve(self, chat: int | None) -> float:
        """Seconds to wait before a new message to ``chat`` goes out (its moment is taken);
        0 when it may go now (it is counted in the bot's last second)."""
        budgets = [(redis_key(PACE, "all"), ALL)]
        if chat is not None:
            budgets.append((redis_key(PACE, str(chat)), GROUP if chat < 0 else PRIVATE))
        keys = self._window() + [key for key, _budget in budgets]
        args = [ALL_IN_A_SECOND]
        for _key, budget in budgets:
            args += [round(budget.interval_s * 1_000_000), budget.burst]
        waited = await self.redis.eval(_RESERVE, len(keys), *keys, *args)
        return max(0, int(waited)) / 1_000_000

    async def room(self) -> float:
        """0 once this message is counted in the bot's last second; else seconds to wait."""
        waited = await self.redis.eval(_ROOM, 2, *self._window(), ALL_IN_A_SECOND)
        return max(0, int(waited)) / 1_000_000

    async def pace(self, chat: int | None) -> float:
        """Wait for the message's moment, then for room in the bot's last second; the seconds
        slept."""
        slept = 0.0
        wait = await self.reserve(chat)
        while wait > 0:
            await asyncio.sleep(wait)
            slept += wait
            wait = await self.room()
        return slept

    async def __call__(
        self,
        make_request: NextRequestMiddlewareType[Any],
        bot: Bot,
        method: TelegramMethod[Any],
    ) -> Any:
        if not isinstance(method, NEW_MESSAGES):
            return await make_request(bot, method)
        try:
            await self.pace(_chat(method))
        except RedisError as error:
            self._unpaced(error)
        await self.on_its_way()
        try:
            return await make_request(bot, method)
        finally:
            self._in_flight.release()

    async def on_its_way(self) -> float:
        """Take a place among the new messages on their way (:data:`IN_FLIGHT`); one that had
        to wait for it waits again, as at its moment, for room in the bot's last second. The
        seconds waited."""
        started = time.monotonic()
        queued = self._in_flight.locked()
        await self._in_flight.acquire()
        try:
            wait = await self.room() if queued else 0.0
            while wait > 0:
                await asyncio.sleep(wait)
                wait = await self.room()
        except RedisError as error:
            self._unpaced(error)
        except BaseException:
            self._in_flight.release()
            raise
        return time.monotonic() - started

    def _unpaced(self, error: RedisError) -> None:
        if not self._warned:
            log.warning("messages go out unpaced: Redis failed (%s)", type(error).__name__)
            self._warned = True
