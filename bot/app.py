"""The bot's factories: ``build_dispatcher``, and :func:`running_bot`, which holds everything
with a lifetime (the ``Bot`` of :func:`backend.telegram.create_bot`, services, the outbox task)
for polling and webhook alike.

Router order (first match wins): groups (what a group may not ask, and its admins' switch),
account, wallet (Stars payments must be seen before chat
takes messages), API keys, provider, admin (only for admin ids), persona (/system, captions,
edits), then chat last, since it takes
every text no command took.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiogram import Bot, Dispatcher, F
from aiogram.client.session.base import BaseSession

from backend.accounts import stars_pending
from backend.db import Database
from backend.dispatch import Dispatcher as TurnDispatcher
from backend.ledger import Ledger
from backend.metrics import TurnMetrics, TurnsEndpoint, serve_turns
from backend.settings import Settings
from backend.telegram import create_bot
from bot import groups
from bot.admission import InFlight
from bot.commands import set_commands, set_menu_button
from bot.groups import ButtonOwners, OwnedButtons
from bot.handlers import account, admin, apikeys, chat, persona, provider, wallet
from bot.handlers.wallet import miniapp_url
from bot.middlewares import UserMiddleware
from bot.outbox import Outbox
from bot.pacing import SendPacer
from bot.services import Services, open_services
from bot.telegram import on_error
from bot.tonconnect import ConnectorFactory
from bot.turn_runner import TurnRunner
from workers.lifecycle import REQUESTS_SHARE, SETTLE_SHARE, Shutdown

log = logging.getLogger("cocoon.bot")


def build_dispatcher(
    settings: Settings, services: Services, outbox: Outbox, in_flight: InFlight
) -> Dispatcher:
    runner = TurnRunner(
        services.settings, services.turns, services.contexts, services.running, services.limiter
    )
    dp = Dispatcher(**services.workflow_data(), outbox=outbox, runner=runner)
    dp.update.outer_middleware(in_flight)  # outermost: admitted before any work
    dp.update.outer_middleware(UserMiddleware())
    dp.callback_query.outer_middleware(OwnedButtons())
    dp.errors.register(on_error)
    dp.include_routers(
        groups.handlers.router(),
        account.handlers.router(),
        wallet.handlers.router(),
        apikeys.handlers.router(),
        provider.handlers.router(),
        admin.handlers.router(F.from_user.id.in_(set(settings.admin_ids))),
        persona.handlers.router(),
        chat.handlers.router(),
    )
    return dp


def webhook_secret(settings: Settings) -> str:
    """The secret Telegram sends with each webhook update: the setting, else one derived from
    the bot token (the same on every replica, unguessable without the token)."""
    if settings.webhook_secret is not None:
        return settings.webhook_secret.get_secret_value()
    assert settings.bot_token is not None
    token = settings.bot_token.get_secret_value()
    return hashlib.sha256(b"cocoon-webhook:" + token.encode()).hexdigest()


@dataclass
class BotApp:
    bot: Bot
    dp: Dispatcher
    services: Services
    outbox: Outbox


@contextlib.asynccontextmanager
async def running_bot(
    settings: Settings,
    *,
    session: BaseSession | None = None,
    db: Database | None = None,
    ledger: Ledger | None = None,
    turns: TurnDispatcher | None = None,
    outbox_interval_s: float | None = 2.0,
    tonconnect: ConnectorFactory | None = None,
    metrics: TurnMetrics | None = None,
) -> AsyncIterator[BotApp]:
    """The bot with its services; the outbox is drained in the background every
    ``outbox_interval_s`` (None: not at all, tests drain it by hand), and Stars payments that
    could not be credited are retried (``backend.accounts.stars_pending``). Without ``turns``, the
    bot's own turn dispatcher counts its turns on ``metrics``."""
    bot = create_bot(settings, session)
    try:
        async with open_services(
            settings, db=db, ledger=ledger, turns=turns, tonconnect=tonconnect, metrics=metrics
        ) as services:
            bot.session.middleware(ButtonOwners(services.redis))
            # Innermost: every try of a message (FloodWait's again too) waits for its moment.
            bot.session.middleware(SendPacer(services.redis))
            outbox = Outbox(bot, services.db, services.ledger, services.redis, services.contexts)
            in_flight = InFlight()
            dp = build_dispatcher(settings, services, outbox, in_flight)
            stop = asyncio.Event()
            tasks = (
                [
                    asyncio.create_task(outbox.run(stop, outbox_interval_s)),
                    asyncio.create_task(
                        stars_pending.retry_loop(
                            stop, services.db, services.ledger, settings, services.redis
                        )
                    ),
                ]
                if outbox_interval_s
                else []
            )
            try:
                yield BotApp(bot, dp, services, outbox)
            finally:
                # Stopping: updates being handled get their share of the grace period, then are
                # cancelled (a turn cut short is billed for what was generated, or given back);
                # turns still settling get theirs (then their holds are released).
                stop.set()
                grace = settings.stop_grace_s
                await in_flight.finish(grace * REQUESTS_SHARE)
                if turns is None:  # the bot's own turn dispatcher (not the web app's)
                    await services.turns.wind_down(grace * SETTLE_SHARE)
                if tasks:
                    await asyncio.wait(tasks, timeout=grace * SETTLE_SHARE)
    finally:
        await bot.session.close()


async def run_polling(
    settings: Settings, shutdown: Shutdown, *, metrics: TurnMetrics | None = None
) -> None:
    """``cocoon bot``: long polling until ``shutdown`` asks to stop; then no update is taken any
    more, and :func:`running_bot` lets those being handled finish.

    Its turns are counted on ``metrics`` (``cocoon up`` hands the web server's), else on
    ``GET /metrics`` on port ``COCOON_BOT_METRICS_PORT`` (all interfaces, as a worker's) when
    that is set."""
    endpoint: TurnsEndpoint | None = None
    if metrics is None and settings.bot_metrics_port is not None:
        endpoint = serve_turns("0.0.0.0", settings.bot_metrics_port)
        metrics = endpoint.metrics
        log.info("the bot's turn metrics are on port %d: GET /metrics", endpoint.port)
    try:
        await _poll(settings, shutdown, metrics)
    finally:
        if endpoint is not None:
            endpoint.close()


async def _poll(settings: Settings, shutdown: Shutdown, metrics: TurnMetrics | None) -> None:
    async with running_bot(settings, metrics=metrics) as app:
        await app.bot.delete_webhook(drop_pending_updates=False)
        await set_commands(app.bot)
        await set_menu_button(app.bot, miniapp_url(settings))
        me = await app.bot.get_me()
        log.info("bot @%s is polling for updates", me.username)
        polling = asyncio.create_task(
            app.dp.start_polling(
                app.bot,
                allowed_updates=app.dp.resolve_used_update_types(),
                handle_signals=False,  # the process's own handlers (workers.lifecycle) stop it
                close_bot_session=False,
            )
        )
        stopping = asyncio.create_task(shutdown.stop.wait())
        try:
            await asyncio.wait([polling, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            await _stop_polling(app.dp, polling)


async def _stop_polling(dp: Dispatcher, polling: asyncio.Task[None]) -> None:
    """Stop taking updates; raise what ended polling if it ended by itself."""
    if not polling.done():
        try:
            await dp.stop_polling()
        except RuntimeError:  # polling has not started yet: it never will
            polling.cancel()
            await asyncio.gather(polling, return_exceptions=True)
            return
    await polling
