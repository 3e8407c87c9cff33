"""Webhook mode: the bot inside ``cocoon web`` (``COCOON_BOT_MODE=webhook``).

Updates arrive at ``POST /telegram/webhook`` with Telegram's secret token header, checked
before anything else; the bot shares the web app's database, ledger and turn dispatcher.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiogram.webhook.aiohttp_server import SimpleRequestHandler
from aiohttp import web

from backend import appkeys
from backend.settings import Settings

if TYPE_CHECKING:
    from bot.app import BotApp

log = logging.getLogger("cocoon.bot")

WEBHOOK_PATH = "/telegram/webhook"
HANDLER = web.AppKey("bot_webhook_handler", SimpleRequestHandler)


async def webhook_view(request: web.Request) -> web.StreamResponse:
    handler = request.app.get(HANDLER)
    if handler is None:
        return web.json_response({"error": "the bot is not running"}, status=503)
    return await handler.handle(request)


def setup(app: web.Application, settings: Settings) -> None:
    """Mount the webhook on ``app`` when the bot runs in webhook mode with a token."""
    if settings.bot_mode != "webhook" or settings.bot_token is None:
        return
    from bot.app import running_bot, webhook_secret
    from bot.commands import set_commands, set_menu_button
    from bot.handlers.wallet import miniapp_url

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with running_bot(
            settings,
            db=app[appkeys.DATABASE],
            ledger=app[appkeys.LEDGER],
            turns=app[appkeys.DISPATCHER],
        ) as bot_app:
            secret = webhook_secret(settings)
            app[HANDLER] = SimpleRequestHandler(bot_app.dp, bot_app.bot, secret_token=secret)
            if settings.public_url:
                await bot_app.bot.set_webhook(
                    settings.public_url.rstrip("/") + WEBHOOK_PATH,
                    secret_token=secret,
                    allowed_updates=bot_app.dp.resolve_used_update_types(),
                )
                await set_commands(bot_app.bot)
                await set_menu_button(bot_app.bot, miniapp_url(settings))
            else:
                log.error("webhook mode needs COCOON_PUBLIC_URL: Telegram cannot reach this bot")
            yield
            await _shutdown(bot_app)

    app.cleanup_ctx.append(ctx)
    app.router.add_post(WEBHOOK_PATH, webhook_view)


async def _shutdown(bot_app: BotApp) -> None:
    await bot_app.dp.emit_shutdown(bot=bot_app.bot)
