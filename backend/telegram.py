"""The Telegram Bot API client: :func:`create_bot`, the one factory of an aiogram ``Bot`` (the
bot's, and the Mini App's for Stars invoices), on the configured Bot API server.

:class:`FloodWait` is its session middleware: a 429 with ``retry_after`` is waited out and the
request sent again (a few times, up to a bound), for every method except drafts, which are
throw-away previews (the streamer skips a beat instead).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiogram import Bot
from aiogram.client.default import DefaultBotProperties
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.session.base import BaseSession
from aiogram.client.session.middlewares.base import BaseRequestMiddleware, NextRequestMiddlewareType
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import TelegramRetryAfter
from aiogram.methods import SendMessageDraft, TelegramMethod

from backend.settings import Settings

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


class BotNotConfigured(RuntimeError):
    pass


def create_bot(settings: Settings, session: BaseSession | None = None) -> Bot:
    """The Bot on the configured Bot API server, with flood waits honoured."""
    if settings.bot_token is None:
        raise BotNotConfigured("COCOON_BOT_TOKEN is not set")
    if session is None:
        if settings.telegram_api_url:
            api = TelegramAPIServer.from_base(settings.telegram_api_url.rstrip("/"))
            session = AiohttpSession(api=api)
        else:
            session = AiohttpSession()
    session.middleware(FloodWait())
    return Bot(
        settings.bot_token.get_secret_value(),
        session=session,
        default=DefaultBotProperties(parse_mode=None, link_preview_is_disabled=True),
    )
