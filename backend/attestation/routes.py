"""Onboarding over HTTP: the routes ``POST /v1/workers/nonce`` and ``POST /v1/workers/register``
(bodies and answers: :mod:`backend.attestation.onboarding`), the service's lifetime in the web
app, and its keeper task (expiry sweep, worker users restored after a Redis restart); and the
public ``GET /v1/attestation/report`` (:mod:`backend.attestation.report`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from backend import appkeys
from backend.attestation.onboarding import ONBOARDING, Onboarding, OnboardingError
from backend.attestation.report import REPORTS, ReportService, report_view
from backend.attestation.verifier import Verifier
from backend.settings import Settings
from workers import redisconn

log = logging.getLogger("cocoon.attestation")

SWEEP_EVERY_S = 30.0
USERS_CHECK_EVERY = 10
"""The keeper recreates missing worker users on every ``run_id`` change, and at least every
this many checks."""
MAX_BODY_BYTES = 256 * 1024


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.read())
    except ValueError:
        raise OnboardingError(400, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise OnboardingError(400, "the body must be a JSON object")
    return data


def _error(error: OnboardingError) -> web.Response:
    body: dict[str, Any] = {"error": str(error), "reasons": error.reasons}
    if error.status == 403:
        body["accepted"] = False
    return web.json_response(body, status=error.status)


async def _answer(
    request: web.Request, call: Callable[[Onboarding, dict[str, Any]], Awaitable[Any]]
) -> web.Response:
    """The service's answer as JSON; its refusals with their status, the backend's own faults
    as 503 (Redis) or 500 (a bug), never dressed as a refusal."""
    try:
        data = await _body(request)
        return web.json_response(await call(request.app[ONBOARDING], data))
    except OnboardingError as error:
        return _error(error)
    except RedisError as error:  # e.g. this Redis refuses ACL SETUSER to the backend's user
        log.error("onboarding failed on Redis: %s", error)
        message = f"the backend cannot register workers right now ({type(error).__name__})"
        return _error(OnboardingError(503, message))
    except Exception as error:  # a bug on this side: say so, and never as a refusal
        log.exception("onboarding failed on the backend's side")
        message = (
            f"internal error on the backend ({type(error).__name__}): nothing was decided about "
            "this worker; try again later (the nonce stays good until it expires)"
        )
        return _error(OnboardingError(500, message))


async def nonce_view(request: web.Request) -> web.Response:
    return await _answer(request, lambda service, data: service.nonce(data.get("token")))


async def register_view(request: web.Request) -> web.Response:
    return await _answer(
        request, lambda service, data: service.register(data.get("token"), data.get("evidence"))
    )


def setup(app: web.Application, settings: Settings) -> None:
    """Add the onboarding routes and service (with its expiry sweep) to ``app``."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        client = redisconn.async_client(settings.redis_url)
        service = Onboarding(
            settings, client, Verifier.from_settings(settings), db=app.get(appkeys.DATABASE)
        )
        app[ONBOARDING] = service
        app[REPORTS] = ReportService(
            settings, client, service.verifier, app[appkeys.DISPATCHER].workers
        )
        stop = asyncio.Event()
        sweeper = asyncio.create_task(_keep_forever(service, stop))
        yield
        # A flag as well as a cancel: a Redis client may turn a cancel inside a command into a
        # connection error, which the loop would log and carry on from.
        stop.set()
        sweeper.cancel()
        await asyncio.wait([sweeper], timeout=5)
        await client.aclose()

    app.cleanup_ctx.append(ctx)
    app.router.add_post("/v1/workers/nonce", nonce_view)
    app.router.add_post("/v1/workers/register", register_view)
    app.router.add_get("/v1/attestation/report", report_view)  # public (backend.attestation.report)


async def _keep_forever(service: Onboarding, stop: asyncio.Event) -> None:
    """Every ``users_check_s``: recreate missing worker users when Redis's ``run_id`` changed
    (a restart, a failover: also the first check, at start-up) or every ``USERS_CHECK_EVERY``
    checks; every ``SWEEP_EVERY_S``: revoke expired workers."""
    run_id: object = None
    checks = 0
    swept_at = -SWEEP_EVERY_S
    interval = service.att.users_check_s
    while not stop.is_set():
        try:
            now_run_id = (await service.redis.info("server")).get("run_id")
            if now_run_id != run_id or checks % USERS_CHECK_EVERY == 0:
                await service.restore_users()
                run_id = now_run_id
            checks += 1
            if time.monotonic() - swept_at >= SWEEP_EVERY_S:
                await service.sweep()
                swept_at = time.monotonic()
        except Exception as error:  # Redis down, no ACL permission: keep serving
            if stop.is_set():
                return
            log.warning("attestation upkeep failed: %s", error)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
