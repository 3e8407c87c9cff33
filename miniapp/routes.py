"""The Mini App's HTTP side: pages (Jinja2), the JSON API under ``/app/api``, the TON Connect
manifest, and the static files. Thin: parse, call :class:`miniapp.service.MiniApp`, render."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiohttp_jinja2
import jinja2
from aiohttp import web
from pydantic import BaseModel, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from backend import appkeys
from backend.errors import CocoonError, ErrorCode
from backend.i18n import LANGUAGES
from backend.money import decimal_comma, format_gram
from backend.settings import Settings
from miniapp import chat, sealed, texts
from miniapp import protocol as p
from miniapp.assets import STATIC_ROUTE, VENDOR_ROUTE, Assets, find_assets, report
from miniapp.auth import InitDataError, InitDataVerifier, init_data_from_header
from miniapp.service import Caller, MiniApp, MiniAppError

log = logging.getLogger("cocoon.miniapp")

MINIAPP = web.AppKey("miniapp", MiniApp)
VERIFIER = web.AppKey("miniapp_verifier", InitDataVerifier)
ASSETS = web.AppKey("miniapp_assets", Assets)
JINJA = web.AppKey("miniapp_jinja", jinja2.Environment)

API_PREFIX = "/app/api/"
PAGES = {
    "wallet": "/app",
    "history": "/app/history",
    "provider": "/app/provider",
    "chat": "/app/chat",
}
# The HTTP status of every refusal of the Mini App's API (its words: miniapp.texts.ERRORS).
STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.INVALID_JSON: 400,
    ErrorCode.INVALID_AMOUNT: 400,
    ErrorCode.INVALID_PAGE: 400,
    ErrorCode.MESSAGE_TOO_LONG: 400,
    ErrorCode.BELOW_MINIMUM: 400,
    ErrorCode.PROOF_REFUSED: 400,
    ErrorCode.INIT_DATA_MISSING: 401,
    ErrorCode.INIT_DATA_INVALID: 401,
    ErrorCode.INIT_DATA_EXPIRED: 401,
    ErrorCode.INSUFFICIENT_BALANCE: 402,
    ErrorCode.NOT_PROVIDER: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNKNOWN_MODEL: 404,
    ErrorCode.NO_PAYOUT_WALLET: 409,
    ErrorCode.INSUFFICIENT_FUNDS: 409,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.CANCELLED: 499,
    ErrorCode.INTERNAL: 500,
    ErrorCode.WORKER_ERROR: 502,
    ErrorCode.WORKER_MISBEHAVED: 502,
    ErrorCode.STARS_FAILED: 502,
    ErrorCode.NO_WORKER: 503,
    ErrorCode.PROOF_UNAVAILABLE: 503,
    ErrorCode.TOPUP_UNAVAILABLE: 503,
    ErrorCode.STARS_UNAVAILABLE: 503,
    ErrorCode.TIMEOUT: 504,
}
PAGE_PATHS = frozenset(PAGES.values()) | {"/app/"}
TITLES = {
    "wallet": texts.N_("Wallet"),
    "history": texts.N_("History"),
    "provider": texts.N_("Provider"),
    "chat": texts.N_("Chat"),
}
# aiohttp's own refusals under /app/api/ (unknown path, wrong method, body too large).
HTTP_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.NOT_FOUND}

Body = TypeVar("Body", bound=BaseModel)
Handler = Callable[[web.Request, Caller], Awaitable[web.StreamResponse]]


# ---------------------------------------------------------------------- errors


LANGUAGE_HEADER = "X-Cocoon-Language"  # the page's language: the API answers in it


def _request_language(request: web.Request) -> str:
    return texts.page_language(request.query.get("lang"), request.headers.get("Accept-Language"))


def _answer_language(request: web.Request, saved: str) -> str:
    """The page's language when it names one, else the one saved at the user's first contact."""
    wanted = request.headers.get(LANGUAGE_HEADER, "")
    return wanted if wanted in LANGUAGES else saved


AMOUNTS = ("minimum", "available", "needed")  # nano units, shown in GRAM
NUMBERS = ("limit", "retry_after")
WORDS = ("problem",)  # a stable code of its own (an amount's: backend.money.AmountProblem)


def error_body(language: str, code: ErrorCode, **values: object) -> dict[str, Any]:
    """``{"error": {"code", "message", "details"}}``: the stable code, the sentence in
    ``language`` (amounts in GRAM) and the values a page needs to say it in its own words
    (amounts as nano strings, limits as numbers); never an exception's text."""
    details: dict[str, str | int] = {}
    for name in AMOUNTS:
        value = values.get(name)
        if isinstance(value, int):
            details[name] = str(value)
            values[name] = format_gram(value)
    for name in NUMBERS:
        value = values.get(name)
        if isinstance(value, int):
            details[name] = value
    for name in WORDS:
        value = values.get(name)
        if isinstance(value, str):
            details[name] = value
    if code is ErrorCode.INVALID_AMOUNT and isinstance(values.get("problem"), str):
        values["detail"] = texts.amount_problem(language, str(values["problem"]))
    message = texts.error_message(language, code, **values)
    detail = p.ErrorDetail(code=code.value, message=message, details=details)
    return p.ErrorBody(error=detail).model_dump()


def error_response(
    language: str,
    code: ErrorCode,
    values: Mapping[str, object] | None = None,
    *,
    status: int | None = None,
) -> web.Response:
    body = error_body(language, code, **(values or {}))
    return web.json_response(body, status=status or STATUS.get(code, 500))


def refusal(language: str, error: CocoonError) -> web.Response:
    """Any refusal (the Mini App's, the account's, a turn's): its message fills ``{detail}``."""
    return error_response(language, error.code, _values(error))


def _values(error: CocoonError) -> dict[str, object]:
    return {"detail": str(error), **error.details}


async def _body(request: web.Request, model: type[Body]) -> Body:
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MiniAppError(ErrorCode.INVALID_JSON) from None
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        # The field's name only: pydantic's own words are English developer text.
        where = ".".join(str(part) for part in first["loc"])
        raise MiniAppError(ErrorCode.INVALID_REQUEST, where or "body") from None


@web.middleware
async def api_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Under ``/app/api/`` even aiohttp's own refusals (unknown path, wrong method, body too
    large) are JSON errors; other paths are left alone."""
    if not request.path.startswith(API_PREFIX):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = HTTP_CODES.get(error.status, ErrorCode.INVALID_REQUEST)
        values = {"detail": error.reason}
        return error_response(_request_language(request), code, values, status=error.status)
    except ConnectionResetError:
        raise  # the client went away: nobody to answer
    except (RedisConnectionError, RedisTimeoutError) as error:
        # Redis restarting or failing over: nothing was done, try again (503, never 500).
        log.warning(
            "mini app API: %s %s: Redis unreachable (%s)", request.method, request.path, error
        )
        return error_response(_request_language(request), ErrorCode.INTERNAL, status=503)
    except Exception:
        # A bug or an outage (database down): a readable JSON error, the details in the log
        # (never a request body: it may hold a chat message).
        log.exception("mini app API: %s %s failed", request.method, request.path)
        return error_response(_request_language(request), ErrorCode.INTERNAL)


def api(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Verify ``initData``, find the user, run the handler; every refusal is a JSON error."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        language = _answer_language(request, _request_language(request))
        try:
            header = request.headers.get("Authorization")
            telegram = request.app[VERIFIER].verify(init_data_from_header(header))
        except InitDataError as error:
            return refusal(language, error)
        service = request.app[MINIAPP]
        caller = await service.caller(telegram, _answer_language(request, ""))
        try:
            return await handler(request, caller)
        except CocoonError as error:  # MiniAppError, AccountError, TurnError
            return refusal(caller.language, error)

    return wrapped


def _json(model: BaseModel, *, exclude_none: bool = False) -> web.Response:
    return web.json_response(model.model_dump(mode="json", exclude_none=exclude_none))


# ----------------------------------------------------------------------- pages


def _page(name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    @aiohttp_jinja2.template("base.html", app_key=JINJA)
    async def view(request: web.Request) -> dict[str, Any]:
        settings = request.app[appkeys.SETTINGS]
        verifier = request.app[VERIFIER]
        assets = request.app[ASSETS]
        lang = _request_language(request)
        base = (settings.public_url or "").rstrip("/")
        config = {
            "page": name,
            "lang": lang,
            "languages": list(LANGUAGES),
            "langFixed": "lang" in request.query,
            "api": "/app/api",
            "pages": PAGES,
            "manifestUrl": f"{base}/tonconnect-manifest.json" if base else None,
            "tonconnect": assets.tonconnect_url is not None,
            "tonconnectUrl": assets.tonconnect_url,
            "qrcodeUrl": assets.qrcode_url,
            "decimalComma": decimal_comma(lang),
            "dev": verifier.dev,
            "devInitData": verifier.dev_init_data(lang) if verifier.dev else None,
            "devUser": settings.local_telegram_id if verifier.dev else None,
        }
        return {
            "lang": lang,
            "page": name,
            "config": config,
            "assets": assets,
            "pages": PAGES,
            "page_errors": texts.page_errors(lang),
            "page_title": texts.translate(lang, TITLES[name]),
        }

    return view


async def manifest(request: web.Request) -> web.Response:
    """``/tonconnect-manifest.json``: what wallets show about the app (public, no auth)."""
    settings = request.app[appkeys.SETTINGS]
    base = (settings.public_url or f"{request.scheme}://{request.host}").rstrip("/")
    return web.json_response(
        {"url": base, "name": settings.app_name, "iconUrl": f"{base}/app/static/icon.png"},
        headers={"Access-Control-Allow-Origin": "*"},
    )


@web.middleware
async def pages(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The pages are compressed and revalidated on every open (their assets are versioned)."""
    response = await handler(request)
    if request.path in PAGE_PATHS and isinstance(response, web.Response):
        response.headers["Cache-Control"] = "no-cache"
        response.enable_compression()
    return response


# ------------------------------------------------------------------------- API


@api
async def get_me(request: web.Request, caller: Caller) -> web.Response:
    return _json(await request.app[MINIAPP].me(caller))


@api
async def post_model(request: web.Request, caller: Caller) -> web.Response:
    body = await _body(request, p.ModelChoice)
    await request.app[MINIAPP].choose_model(caller, body.model)
    return _json(await request.app[MINIAPP].me(caller))


@api
async def post_proof_payload(request: web.Request, caller: Caller) -> web.Response:
    return _json(await request.app[MINIAPP].proof_payload())


@api
async def post_wallet(request: web.Request, caller: Caller) -> web.Response:
    body = await _body(request, p.LinkWalletRequest)
    return _json(await request.app[MINIAPP].link_wallet(caller, body, request.host))


@api
async def delete_wallet(request: web.Request, caller: Caller) -> web.Response:
    await request.app[MINIAPP].unlink_wallet(caller)
    return _json(await request.app[MINIAPP].me(caller))


@api
async def post_topup(request: web.Request, caller: Caller) -> web.Response:
    body = await _body(request, p.TopUpRequest)
    # TON Connect refuses unknown and null keys: leave out "network" unless it is set.
    return _json(request.app[MINIAPP].top_up(caller, body.amount), exclude_none=True)


@api
async def post_topup_usdt(request: web.Request, caller: Caller) -> web.Response:
    body = await _body(request, p.UsdtTopUpRequest)
    service = request.app[MINIAPP]
    return _json(await service.top_up_usdt(caller, body.amount), exclude_none=True)


@api
async def post_stars(request: web.Request, caller: Caller) -> web.Response:
    body = await _body(request, p.StarsRequest)
    service = request.app[MINIAPP]
    amount = body.stars * service.settings.stars_nano_per_star
    title = texts.translate(caller.language, texts.N_("Cocoon balance top-up"))
    label = texts.translate(
        caller.language,
        texts.N_("{amount} on your Cocoon balance"),
        amount=format_gram(amount),
    )
    url = await service.stars_invoice(caller, body.stars, title, label)
    return _json(p.StarsInvoice(invoice_url=url, stars=body.stars, amount=str(amount)))


@api
async def get_history(request: web.Request, caller: Caller) -> web.Response:
    kind = request.query.get("kind") or None
    try:
        page = int(request.query.get("page", "1"))
    except ValueError:
        raise MiniAppError(ErrorCode.INVALID_PAGE) from None
    cursor = request.query.get("cursor")
    return _json(await request.app[MINIAPP].history(caller, kind, page, cursor))


@api
async def get_provider(request: web.Request, caller: Caller) -> web.Response:
    return _json(await request.app[MINIAPP].provider(caller))


@api
async def post_withdraw(request: web.Request, caller: Caller) -> web.Response:
    body = await _body(request, p.WithdrawRequest)
    return _json(await request.app[MINIAPP].withdraw(caller, body))


@api
async def post_chat(request: web.Request, caller: Caller) -> web.StreamResponse:
    """A chat turn, streamed as NDJSON lines (:mod:`miniapp.chat`). Errors before the first
    line are plain JSON errors with their HTTP status."""
    body = await _body(request, p.ChatRequest)
    service = request.app[MINIAPP]
    turn = await service.chat(caller, body)
    return await chat.stream_turn(
        request,
        service,
        caller,
        turn,
        lambda error: error_body(caller.language, error.code, **_values(error)),
    )


@api
async def post_sealed_chat(request: web.Request, caller: Caller) -> web.StreamResponse:
    """A turn the page sealed itself (:mod:`miniapp.sealed`)."""
    body = await _body(request, sealed.SealedCompletionRequest)
    return await sealed.post_sealed_chat(request, caller, body)


@api
async def post_chat_stop(request: web.Request, caller: Caller) -> web.Response:
    body = await _body(request, p.StopRequest)
    await request.app[MINIAPP].stop(caller, body.turn)
    return web.json_response({"stopping": True})


# ----------------------------------------------------------------------- setup


def _service_ctx(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        bot = None
        if settings.bot_token is not None:  # for Stars invoices
            from backend.telegram import create_bot

            bot = create_bot(settings)
        app[MINIAPP] = MiniApp(
            settings,
            app[appkeys.DATABASE],
            app[appkeys.LEDGER],
            app[appkeys.DISPATCHER],
            bot,
        )
        yield
        if bot is not None:
            await bot.session.close()

    return ctx


def setup(app: web.Application, settings: Settings) -> None:
    """Mount the Mini App on ``cocoon web``'s application (after its database context)."""
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("miniapp", "templates"),
        app_key=JINJA,
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
    )
    texts.install(env)
    app[VERIFIER] = InitDataVerifier(
        settings.bot_token.get_secret_value() if settings.bot_token else None,
        max_age_s=settings.initdata_max_age_s,
        dev_telegram_id=settings.local_telegram_id if settings.miniapp_dev else None,
    )
    if settings.miniapp_dev:
        log.warning(
            "Mini App development mode is on: anyone who can open the page acts as "
            "Telegram user %d (COCOON_MINIAPP_DEV)",
            settings.local_telegram_id,
        )
    assets = find_assets(settings)
    report(assets)
    app[ASSETS] = assets
    env.globals["static"] = assets.static.url
    app.cleanup_ctx.append(_service_ctx(settings))
    app.middlewares.append(api_errors)
    app.middlewares.append(pages)

    router = app.router
    for name, path in PAGES.items():
        router.add_get(path, _page(name))
    router.add_get("/app/", _page("wallet"))
    router.add_get("/tonconnect-manifest.json", manifest)
    router.add_get(STATIC_ROUTE + "{name}", assets.static.handle)
    router.add_get(VENDOR_ROUTE + "{name:.+}", assets.vendor.handle)
    router.add_get("/app/api/me", get_me)
    router.add_post("/app/api/model", post_model)
    router.add_post("/app/api/wallet/payload", post_proof_payload)
    router.add_post("/app/api/wallet", post_wallet)
    router.add_delete("/app/api/wallet", delete_wallet)
    router.add_post("/app/api/topup", post_topup)
    router.add_post("/app/api/topup/usdt", post_topup_usdt)
    router.add_post("/app/api/stars", post_stars)
    router.add_get("/app/api/history", get_history)
    router.add_get("/app/api/provider", get_provider)
    router.add_post("/app/api/provider/withdraw", post_withdraw)
    router.add_post("/app/api/chat", post_chat)
    router.add_post("/app/api/chat/stop", post_chat_stop)
    router.add_post("/app/api/sealed/chat", post_sealed_chat)
