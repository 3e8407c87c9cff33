"""Provider commands: /provider, /addworker, /workers (and, from :mod:`bot.handlers.earnings`,
/earnings and /withdraw)."""

from __future__ import annotations

import datetime as dt
import html

from aiogram import F
from aiogram.enums import ChatType, ParseMode
from aiogram.filters import Command, CommandObject
from aiogram.types import (
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    WebAppInfo,
)
from redis.asyncio import Redis as AsyncRedis

from backend import accounts
from backend.attestation import enrollment
from backend.attestation.store import issue_registration_token
from backend.db import Database
from backend.models import User
from backend.settings import Settings
from backend.ton.comment import friendly_address
from backend.ton.proof import linked_wallet
from bot.common import Handlers, model_by_token, model_token, require_provider, state_name, ton
from bot.handlers import earnings
from bot.handlers.wallet import miniapp_url
from bot.i18n import _, ngettext
from bot.tonconnect import ChatWallets

handlers = Handlers("provider", earnings.handlers)

TOKEN_TTL_S = 3600
REUSABLE = "reusable"  # /addworker reusable [MODEL]
MAX_TOKEN_BUTTONS = 50


def backend_url(settings: Settings) -> str:
    """Where ``cocoon web`` is reached: the public URL, else the address and port it serves
    (``cocoon up --port`` and ``cocoon web --port`` put theirs in the settings; a wildcard
    address is reached on loopback)."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host = settings.web_host
    if host in {"0.0.0.0", "::", ""}:
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.web_port}"


@handlers.message(Command("provider"))
async def cmd_provider(
    message: Message, user: User, db: Database, settings: Settings, wallets: ChatWallets
) -> None:
    if not user.is_provider:
        await accounts.become_provider(db, user.id)
    wallet = await linked_wallet(db, user.id, "payout")
    lines = [
        _(
            "You are a provider: your GPU workers serve attested requests and earn {share}% of "
            "what users pay."
        ).format(share=settings.provider_share_bps // 100)
    ]
    if wallet is not None:
        address = friendly_address(
            wallet.address, bounceable=False, testnet=settings.ton.is_testnet
        )
        lines.append(_("Payout wallet: {address}").format(address=address))
    else:
        lines.append(
            _(
                "No payout wallet yet. Link one with TON Connect: your wallet signs a proof "
                "that it is yours."
            )
        )
    lines.append(_("Next: /addworker gives the command to run on your GPU machine."))
    rows = []
    url = miniapp_url(settings, "/provider")
    if url and message.chat.type == ChatType.PRIVATE:
        rows.append(
            [InlineKeyboardButton(text=_("Link a payout wallet"), web_app=WebAppInfo(url=url))]
        )
    if wallets.available(topup=False) and message.chat.type == ChatType.PRIVATE:
        rows.append(
            [InlineKeyboardButton(text=_("Connect a wallet from the chat"), callback_data="tcw:p")]
        )
    await message.answer(
        "\n\n".join(lines),
        reply_markup=InlineKeyboardMarkup(inline_keyboard=rows) if rows else None,
    )


@handlers.message(Command("addworker"))
async def cmd_addworker(
    message: Message,
    command: CommandObject,
    user: User,
    settings: Settings,
    redis: AsyncRedis,
    db: Database,
) -> None:
    """``/addworker MODEL``: a one-time token and the command; without MODEL, where several
    models are offered, it asks which one the worker will serve. ``/addworker reusable
    [MODEL]``: a reusable enrollment token instead (also a button under the one-time one)."""
    if not await require_provider(message, user):
        return
    model = (command.args or "").strip()
    reusable = model.split(maxsplit=1)[:1] == [REUSABLE]
    if reusable:
        model = model.removeprefix(REUSABLE).strip()
    prefix = "awr" if reusable else "aw"
    if not model and len(settings.models) > 1:
        rows = [
            [InlineKeyboardButton(text=name, callback_data=f"{prefix}:{model_token(name)}")]
            for name in settings.models
        ]
        await message.answer(
            _("Which model will this worker serve?"),
            reply_markup=InlineKeyboardMarkup(inline_keyboard=rows),
        )
        return
    model = model or settings.default_model()
    if model not in settings.models:
        await message.answer(
            _("Unknown model {model}. Models: {models}").format(
                model=model, models=", ".join(settings.models)
            )
        )
        return
    if reusable:
        await message.answer(
            await reusable_command(settings, db, user, model), parse_mode=ParseMode.HTML
        )
        return
    await message.answer(
        await worker_command(settings, redis, user, model),
        parse_mode=ParseMode.HTML,
        reply_markup=reusable_keyboard(model),
    )


def reusable_keyboard(model: str) -> InlineKeyboardMarkup:
    """The button under a one-time token that gives a reusable one instead."""
    button = InlineKeyboardButton(
        text=_("Reusable token (fleets, restarts)"), callback_data=f"awr:{model_token(model)}"
    )
    return InlineKeyboardMarkup(inline_keyboard=[[button]])


@handlers.callback_query(F.data.startswith(("aw:", "awr:")))
async def on_addworker_button(
    query: CallbackQuery, user: User, settings: Settings, db: Database, redis: AsyncRedis
) -> None:
    """A model's button: a one-time token (``aw:``) or a reusable one (``awr:``) and the
    ``cocoon worker`` command that uses it."""
    kind, _sep, token = (query.data or "").partition(":")
    model = model_by_token(settings, token)
    if model is None or not user.is_provider:
        await query.answer(_("This button is not valid any more."), show_alert=True)
        return
    await query.answer()
    if query.message is None:
        return
    keyboard: InlineKeyboardMarkup | None = None
    if kind == "awr":
        text = await reusable_command(settings, db, user, model)
    else:
        text = await worker_command(settings, redis, user, model)
        keyboard = reusable_keyboard(model)
    await query.message.answer(text, parse_mode=ParseMode.HTML, reply_markup=keyboard)


async def reusable_command(settings: Settings, db: Database, user: User, model: str) -> str:
    """A new reusable enrollment token and the ``cocoon worker`` command (HTML)."""
    att = settings.attestation
    token, record = await enrollment.issue(db, user.id, att.enrollment_ttl_days)
    line = (
        f"cocoon worker --model {model} --engine vllm "
        f"--register-url {backend_url(settings)} --token {token}"
    )
    intro = ngettext(
        "Reusable token #{id}: run this on each of your GPU machines, inside the TDX "
        "confidential VM, and again after a restart. Each worker is attested on its own. The "
        "token works for {days} day, for at most {per_hour} new workers an hour.",
        "Reusable token #{id}: run this on each of your GPU machines, inside the TDX "
        "confidential VM, and again after a restart. Each worker is attested on its own. The "
        "token works for {days} days, for at most {per_hour} new workers an hour.",
        att.enrollment_ttl_days,
    ).format(id=record.id, days=att.enrollment_ttl_days, per_hour=att.enrollment_per_hour)
    warning = _(
        "Keep it secret: whoever has it can add workers that earn for you. Revoke it in "
        "/workers; the workers it added keep serving."
    )
    return "\n\n".join(
        [
            html.escape(intro, quote=False),
            f"<pre>{html.escape(line, quote=False)}</pre>",
            html.escape(warning, quote=False),
        ]
    )


async def worker_command(settings: Settings, redis: AsyncRedis, user: User, model: str) -> str:
    """A one-time registration token and the exact ``cocoon worker`` command (HTML)."""
    token = await issue_registration_token(redis, user.id, TOKEN_TTL_S)
    line = (
        f"cocoon worker --model {model} --engine vllm "
        f"--register-url {backend_url(settings)} --token {token}"
    )
    return "\n\n".join(
        [
            html.escape(
                _(
                    "Run this on your GPU machine, inside the TDX confidential VM. The token "
                    "works once, for {minutes} minutes:"
                ).format(minutes=TOKEN_TTL_S // 60),
                quote=False,
            ),
            f"<pre>{html.escape(line, quote=False)}</pre>",
            html.escape(
                _("I will tell you when the worker is attested. Then see /workers."), quote=False
            ),
        ]
    )


@handlers.message(Command("workers"))
async def cmd_workers(message: Message, user: User, db: Database, redis: AsyncRedis) -> None:
    if not await require_provider(message, user):
        return
    views = await accounts.provider_workers(db, redis, user.id)
    tokens = await enrollment.active(db, user.id)
    keyboard = enrollment_keyboard(tokens)
    if not views:
        lines = [_("No workers yet. /addworker registers one.")]
        lines += enrollment_lines(tokens)
        await message.answer("\n".join(lines), parse_mode=None, reply_markup=keyboard)
        return
    lines = [_("Your workers:")]
    for view in views:
        tee = _("development TEE") if view.tee == "dev" else (view.tee or "?").upper()
        expires = (
            view.expires_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M")
            if view.expires_at
            else "—"
        )
        lines.append(
            _(
                "{worker}: {model}, {tee}, {state}, attested until {expires} UTC, {online}; "
                "{jobs}, earned {earned}"
            ).format(
                worker=view.worker_id,
                model=view.model or "?",
                tee=tee,
                state=state_name(view.state),
                expires=expires,
                online=_("online") if view.online else _("offline"),
                jobs=ngettext("{n} job", "{n} jobs", view.jobs).format(n=view.jobs),
                earned=ton(view.earned),
            )
        )
    lines += enrollment_lines(tokens)
    await message.answer("\n".join(lines), parse_mode=None, reply_markup=keyboard)


def enrollment_lines(tokens: list[enrollment.Enrollment]) -> list[str]:
    if not tokens:
        return []
    lines = ["", _("Reusable tokens:")]
    for token in tokens:
        lines.append(
            _("#{id}: until {expires} UTC, {workers} added").format(
                id=token.id,
                expires=token.expires_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M"),
                workers=ngettext("{n} worker", "{n} workers", token.onboarded).format(
                    n=token.onboarded
                ),
            )
        )
    return lines


def enrollment_keyboard(tokens: list[enrollment.Enrollment]) -> InlineKeyboardMarkup | None:
    """A revoke button per reusable token (Telegram's limit: a hundred buttons)."""
    rows = [
        [
            InlineKeyboardButton(
                text=_("Revoke token #{id}").format(id=token.id), callback_data=f"ewr:{token.id}"
            )
        ]
        for token in tokens[:MAX_TOKEN_BUTTONS]
    ]
    return InlineKeyboardMarkup(inline_keyboard=rows) if rows else None


@handlers.callback_query(F.data.startswith("ewr:"))
async def on_revoke_enrollment(query: CallbackQuery, user: User, db: Database) -> None:
    raw = (query.data or "").split(":", 1)[1]
    revoked = raw.isdigit() and len(raw) <= 12 and await enrollment.revoke(db, user.id, int(raw))
    if not revoked:
        await query.answer(_("This button is not valid any more."), show_alert=True)
        return
    await query.answer()
    if query.message is not None:
        await query.message.answer(
            _(
                "Token #{id} revoked: it adds no more workers. The workers it added keep serving."
            ).format(id=int(raw))
        )
