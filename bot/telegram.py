"""Living with the Bot API's limits: flood waits honoured, harmless errors kept quiet.

* :class:`FloodWait` is a session middleware: a 429 with ``retry_after`` is waited out and the
  request sent again (a few times, up to a bound), for every method except drafts, which are
  throw-away previews (the streamer skips a beat instead).
* "message is not modified" (an edit with the same text) is not an error.
* "bot was blocked by the user" (403) ends what the bot was doing for that user, logged at
  INFO without the message's content.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from typing import Any

from aiogram import Bot
from aiogram.client.session.middlewares.base import BaseRequestMiddleware, NextRequestMiddlewareType
from aiogram.exceptions import (
    TelegramBadRequest,
    TelegramForbiddenError,
    TelegramRetryAfter,
)
from aiogram.methods import SendMessageDraft, TelegramMethod
from aiogram.types import ErrorEvent

log = logging.getLogger("cocoon.bot")

MAX_FLOOD_WAIT_S = 60
MAX_FLOOD_RETRIES = 3


class FloodWait(BaseRequestMiddleware):
    """Wait ``retry_after`` seconds and send again when Telegram says 429."""

    def __init__(
        self, max_wait_s: float = MAX_FLOOD_WAIT_S, retries: int = MAX_FLOOD_RETRIES
    ) -> None:
        self.max_wait_s = max_wait_s
        self.retries = retries

    async def __call__(
        self,
        make_request: NextRequestMiddlewareType[Any],
        bot: Bot,
        method: TelegramMethod[Any],
    ) -> Any:
        attempt = 0
        while True:
            try:
                return await make_request(bot, method)
            except TelegramRetryAfter as error:
                attempt += 1
                if (
                    isinstance(method, SendMessageDraft)
                    or attempt > self.retries
                    or error.retry_after > self.max_wait_s
                ):
                    raise
                log.info(
                    "flood control on %s: waiting %s s", type(method).__name__, error.retry_after
                )
                await asyncio.sleep(error.retry_after)


def not_modified(error: BaseException) -> bool:
    return isinstance(error, TelegramBadRequest) and "message is not modified" in error.message


def cannot_parse(error: BaseException) -> bool:
    return isinstance(error, TelegramBadRequest) and "can't parse entities" in error.message.lower()


async def on_error(event: ErrorEvent) -> bool:
    """The dispatcher's last resort: quiet for the harmless Telegram errors, logged for the
    rest (the update's type only: never its text)."""
    error = event.exception
    if not_modified(error):
        return True
    if isinstance(error, TelegramForbiddenError):
        log.info("a user blocked the bot or left the chat: %s", error.message)
        return True
    # The traceback's frames, never the exception's message: a message can quote user input.
    frames = "".join(traceback.format_tb(error.__traceback__))
    log.error(
        "update %s (%s) failed: %s\n%s",
        event.update.update_id,
        event.update.event_type,
        type(error).__name__,
        frames,
    )
    return True
