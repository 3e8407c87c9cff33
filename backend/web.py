"""``cocoon web``: the aiohttp application factory and its runner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

import miniapp
from backend import appkeys, metrics, openai_api, sealed_api, sweeper
from backend.accounts.economics import run_online_counter
from backend.attestation import routes as onboarding_routes
from backend.db import Database
from backend.dispatch import Dispatcher
from backend.errors import CocoonError, ErrorCode
from backend.ledger import Ledger
from backend.openai_api import protocol as openai_protocol
from backend.settings import Settings
from backend.sites import start_site
from bot import webhook as bot_webhook
from workers.lifecycle import (
    REQUESTS_SHARE,
    SETTLE_SHARE,
    Shutdown,
    cancel_and_wait,
    run_command,
)

log = logging.getLogger("cocoon.web")

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


@web.middleware
async def redis_unavailable(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A request that meets Redis unreachable (a restart, a failover, a network cut) is a 503
    with a JSON error, never a 500: nothing was done, and the client may try again. (The Mini
    App's API and onboarding answer the same in their own shapes.)"""
    try:
        return await handler(request)
    except REDIS_DOWN as error:
        log.warning("%s %s: Redis unreachable (%s)", request.method, request.path, error)
        refusal = CocoonError(
            ErrorCode.INTERNAL,
            "Redis cannot be reached right now (restarting or failing over): nothing was done "
            "and nothing was charged; try again in a few seconds",
        )
        return web.json_response(
            openai_protocol.error_body(refusal), status=503, headers={"Retry-After": "2"}
        )


def body_deadline(timeout_s: float, max_bytes: int) -> Middleware:
    """A middleware that reads each request's body (at most ``max_bytes``, the application's
    ``client_max_size``) before its handler runs, within ``timeout_s``
    (``COCOON_HTTP_BODY_TIMEOUT_S``): a client that trickles its body (slowloris) gets a 408 and
    its connection is closed, instead of holding a handler and a connection open for ever.
    Handlers then read the body aiohttp keeps. A body announced over ``max_bytes`` is left to
    the handler, which refuses it unread; one that grows past it (chunked) is a 413 here."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        announced = request.content_length
        if request.body_exists and (announced is None or announced <= max_bytes):
            try:
                async with asyncio.timeout(timeout_s):
                    await request.read()
            except web.HTTPRequestEntityTooLarge:
                # Never let the handler read on: what is left of the body is not the body.
                refusal = CocoonError(ErrorCode.BODY_TOO_LARGE, "request body too large")
                response = web.json_response(openai_protocol.error_body(refusal), status=413)
                response.force_close()
                return response
            except TimeoutError:
                log.warning(
                    "%s %s: body not in within %gs", request.method, request.path, timeout_s
                )
                response = web.json_response(
                    {"error": {"message": "request body too slow", "type": "timeout"}}, status=408
                )
                response.force_close()
                return response
        return await handler(request)

    return middleware


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
        # Turns are counted on the process's metrics (metrics.setup, when it was called).
        dispatcher = Dispatcher.from_settings(
            settings, ledger, metrics=app.get(metrics.TURN_METRICS)
        )
        app[appkeys.DATABASE] = db
        app[appkeys.LEDGER] = ledger
        app[appkeys.DISPATCHER] = dispatcher
        dispatcher.workers.start()  # the registry is read here, never on a request's path
        yield
        # Stopping: turns whose client left (cancelled handlers) settle, or their holds are
        # released, within their share of the grace period.
        await dispatcher.wind_down(settings.stop_grace_s * SETTLE_SHARE)
        await dispatcher.close()
        await db.close()

    return ctx


def _metrics_port_ctx(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        if settings.metrics_port is None:
            yield
            return
        # GET /metrics alone on COCOON_METRICS_PORT, as long as the application runs.
        endpoint = await metrics.start_endpoint(app, settings.web_host, settings.metrics_port)
        try:
            yield
        finally:
            await endpoint.cleanup()

    return ctx


async def _online_counter_ctx(app: web.Application) -> AsyncIterator[None]:
    """Providers' online time (their earnings per hour), counted by every web process, so a
    stack without the bot counts it too (backend.accounts.economics)."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_online_counter(app[appkeys.DISPATCHER].redis, stop))
    yield
    stop.set()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(settings: Settings) -> web.Application:
    # One body limit, the OpenAI-compatible API's documented 4 MiB (aiohttp's default is 1 MiB).
    app = web.Application(
        middlewares=[
            body_deadline(settings.http_body_timeout_s, openai_protocol.MAX_BODY_BYTES),
            redis_unavailable,
        ],
        client_max_size=openai_protocol.MAX_BODY_BYTES,
    )
    app[appkeys.SETTINGS] = settings
    app.cleanup_ctx.append(_database_ctx(settings))
    app.cleanup_ctx.append(sweeper.sweeper_ctx(settings))  # releases holds of dead turns
    app.cleanup_ctx.append(_online_counter_ctx)  # providers' online time
    app.router.add_get("/healthz", healthz)
    openai_api.setup_routes(app)
    sealed_api.setup_routes(app)  # sealed turns, receipts (backend.sealed_api)
    onboarding_routes.setup(app, settings)
    miniapp.setup(app, settings)
    bot_webhook.setup(app, settings)  # the Telegram bot, when COCOON_BOT_MODE=webhook
    metrics.setup(app)  # GET /metrics (Prometheus): behind a token, or on its own port
    app.cleanup_ctx.append(_metrics_port_ctx(settings))
    return app


LINGER_MAX_S = 10.0  # aiohttp's own default lingering time


async def start_web(settings: Settings, host: str, port: int) -> web.AppRunner:
    """``create_app`` listening on ``host:port``. Stop it with :func:`stop_web`."""
    # At a stop, requests in flight get their share of the grace period, then are cancelled:
    # aiohttp waits shutdown_timeout for them to end, then as long again once cancelled.
    # A connection must have sent a whole request line and headers within
    # COCOON_HTTP_HEADER_TIMEOUT_S of its start (or of its last response): aiohttp's keep-alive
    # timer runs from the connection's start and is not put off by bytes trickling in, so a
    # slowloris client is cut off by it (tests/test_operations.py).
    return await start_site(
        create_app(settings),
        host,
        port,
        shutdown_timeout=settings.stop_grace_s * REQUESTS_SHARE / 2,
        keepalive_timeout=settings.http_header_timeout_s,
        # After a 408 or 413 the rest of a refused body is read and dropped (so the client reads
        # the answer before the connection closes) for at most as long as a body may take, and
        # never aiohttp's 10 s: a refused client holds its connection no longer than that.
        lingering_time=min(settings.http_body_timeout_s, LINGER_MAX_S),
    )


async def stop_web(runner: web.AppRunner, shutdown: Shutdown) -> None:
    """Stop listening, let requests in flight finish (then cancel them), settle or give back
    their turns, close the connections; all within the grace period, at once when forced."""
    cleanup = asyncio.ensure_future(runner.cleanup())
    if await shutdown.wait({cleanup}, shutdown.left() + 1):
        await cancel_and_wait({cleanup})


async def serve_web(settings: Settings, shutdown: Shutdown, host: str, port: int) -> None:
    """``cocoon web``: serve until ``shutdown`` asks to stop, then stop within its grace."""
    runner = await start_web(settings, host, port)
    log.info("cocoon web: serving on http://%s:%d", host, port)
    try:
        await shutdown.stop.wait()
    finally:
        await stop_web(runner, shutdown)


def run_web(settings: Settings, *, host: str | None = None, port: int | None = None) -> int:
    host, port = host or settings.web_host, port or settings.web_port
    settings = settings.model_copy(update={"web_host": host, "web_port": port})  # the bot's URLs
    return run_command(
        lambda shutdown: serve_web(settings, shutdown, host, port), settings.stop_grace_s
    )
