"""``cocoon web``: the aiohttp application factory and its runner."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

import miniapp
from backend import appkeys, metrics, openai_api, sweeper
from backend.attestation import onboarding
from backend.db import Database
from backend.dispatch import Dispatcher
from backend.ledger import Ledger
from backend.settings import Settings
from bot import webhook as bot_webhook


async def healthz(request: web.Request) -> web.Response:
    """Liveness and database reachability, for load balancers and compose health checks."""
    from sqlalchemy import text

    db = request.app[appkeys.DATABASE]
    try:
        async with db.session() as session:
            await session.execute(text("SELECT 1"))
    except Exception as error:  # the database is down: say so, do not crash
        return web.json_response({"status": "error", "database": type(error).__name__}, status=503)
    return web.json_response({"status": "ok"})


def _database_ctx(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        db = Database.from_settings(settings)
        ledger = Ledger(db, min_withdrawal=settings.min_withdrawal_nano)
        dispatcher = Dispatcher.from_settings(settings, ledger)
        app[appkeys.DATABASE] = db
        app[appkeys.LEDGER] = ledger
        app[appkeys.DISPATCHER] = dispatcher
        yield
        await dispatcher.close()
        await db.close()

    return ctx


def create_app(settings: Settings) -> web.Application:
    app = web.Application()
    app[appkeys.SETTINGS] = settings
    app.cleanup_ctx.append(_database_ctx(settings))
    app.cleanup_ctx.append(sweeper.sweeper_ctx(settings))  # releases holds of dead turns
    app.router.add_get("/healthz", healthz)
    openai_api.setup_routes(app)
    onboarding.setup(app, settings)
    miniapp.setup(app, settings)
    bot_webhook.setup(app, settings)  # the Telegram bot, when COCOON_BOT_MODE=webhook
    metrics.setup(app)  # GET /metrics (Prometheus)
    return app


def run_web(settings: Settings, *, host: str | None = None, port: int | None = None) -> None:
    web.run_app(
        create_app(settings),
        host=host or settings.web_host,
        port=port or settings.web_port,
        print=lambda line: print(line, flush=True),
    )
