"""Account commands: /start, /help, /lang, /model, /balance, /usage, /privacy, /forget."""

from __future__ import annotations

import datetime as dt

from aiogram import F
from aiogram.filters import Command, CommandObject, CommandStart
from aiogram.types import CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Message
from redis.asyncio import Redis as AsyncRedis

from backend import accounts
from backend.db import Database
from backend.i18n import LANGUAGE_NAMES, LANGUAGES
from backend.ledger import Ledger
from backend.models import User
from backend.pricing import turn_cost
from backend.settings import Settings
from bot.commands import help_text
from bot.common import Handlers, model_by_token, model_token, price_pair, ton, user_model
from bot.context import ContextStore
from bot.groups import Place
from bot.handlers.wallet import topup_keyboard
from bot.i18n import _, ngettext, use_language
from bot.tonconnect import ChatWallets
from workers import registry

handlers = Handlers("account")

MRTD_PREFIX = 16


SHORT_PROMPT_TOKENS = 100
SHORT_ANSWER_TOKENS = 300


@handlers.message(CommandStart(deep_link=True))
@handlers.message(CommandStart())
async def cmd_start(
    message: Message,
    command: CommandObject,
    user: User,
    db: Database,
    ledger: Ledger,
    settings: Settings,
    wallets: ChatWallets,
) -> None:
    """Hello, how it works, the balance and what a first answer costs; a top-up button when
    the balance does not cover one."""
    if command.args:
        await accounts.set_referrer(db, user.id, command.args.strip())
    name = message.from_user.first_name if message.from_user else ""
    model = user_model(settings, user)
    welcome = await accounts.give_welcome_credit(ledger, settings, user.id)
    balances = await ledger.balances(user.id)
    short = turn_cost(
        settings.models[model],
        prompt_tokens=SHORT_PROMPT_TOKENS,
        cached_prompt_tokens=0,
        completion_tokens=SHORT_ANSWER_TOKENS,
    )
    text = "\n\n".join(
        [
            _("Hello, {name}! I am Cocoon: private AI chat, paid in Gram (GRAM) on TON.").format(
                name=name
            ),
            _(
                "How it works: your message is sealed to a GPU worker attested inside a trusted "
                "execution environment; the GPU's owner cannot read it, and Redis, the database "
                "and the logs hold only ciphertext. You pay per token from your balance."
            ),
            bot_path_note(),
            _("Just write your question. Your model: {model}. /help lists the commands.").format(
                model=model
            ),
            _(
                "Your balance: {balance}. A short answer (about 200 words) costs about {cost}."
            ).format(balance=ton(balances.available), cost=ton(short)),
        ]
    )
    if welcome:
        text += "\n\n" + _("Welcome! {amount} was added to your balance to try Cocoon.").format(
            amount=ton(welcome)
        )
    keyboard = None
    if balances.available < short:
        text += "\n\n" + _("Top up to get your first answer: /topup, or the button below.")
        keyboard = topup_keyboard(settings, True, ton_connect=wallets.available(topup=True))
    await message.answer(text, parse_mode=None, reply_markup=keyboard)


@handlers.message(Command("help"))
async def cmd_help(message: Message, user: User, settings: Settings) -> None:
    is_admin = message.from_user is not None and message.from_user.id in settings.admin_ids
    await message.answer(
        help_text(is_provider=user.is_provider, is_admin=is_admin), parse_mode=None
    )


# ------------------------------------------------------------------------------ language


def language_keyboard(current: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        inline_keyboard=[
            [
                InlineKeyboardButton(
                    text=("✓ " if code == current else "") + LANGUAGE_NAMES[code],
                    callback_data=f"lang:{code}",
                )
            ]
            for code in LANGUAGES
        ]
    )


@handlers.message(Command("lang"))
async def cmd_lang(message: Message, lang: str) -> None:
    await message.answer(_("Choose your language:"), reply_markup=language_keyboard(lang))


@handlers.callback_query(F.data.startswith("lang:"))
async def on_lang(query: CallbackQuery, user: User, db: Database) -> None:
    code = (query.data or "").split(":", 1)[1]
    if code not in LANGUAGES:
        await query.answer(_("This language is not available."), show_alert=True)
        return
    await accounts.set_language(db, user.id, code)
    with use_language(code):
        text = _("Language set: {language}.").format(language=LANGUAGE_NAMES[code])
        await query.answer()
        if isinstance(query.message, Message):  # not one too old to edit
            await query.message.edit_text(text, reply_markup=language_keyboard(code))


# --------------------------------------------------------------------------------- model


def model_keyboard(
    settings: Settings, current: str, online: dict[str, set[str]]
) -> InlineKeyboardMarkup:
    """One button per model with a worker online: its prices and what its workers run in."""
    rows = []
    for model, price in settings.models.items():
        if model not in online:
            continue
        prompt, completion = price_pair(price)
        label = _("{model}: {prompt} in, {completion} out").format(
            model=model, prompt=prompt, completion=completion
        )
        kinds = sorted(online[model])
        tee = ", ".join(_("development TEE") if kind == "dev" else kind.upper() for kind in kinds)
        rows.append(
            [
                InlineKeyboardButton(
                    text=("✓ " if model == current else "") + label + " · " + tee,
                    callback_data=f"model:{model_token(model)}",
                )
            ]
        )
    return InlineKeyboardMarkup(inline_keyboard=rows)


async def models_online(redis: AsyncRedis, settings: Settings) -> dict[str, set[str]]:
    """The offered models with a healthy worker, and the TEE kinds their workers run in."""
    online: dict[str, set[str]] = {}
    for worker in await registry.list_workers(redis):
        if worker.model in settings.models:
            online.setdefault(worker.model, set()).add(worker.tee)
    return online


@handlers.message(Command("model"))
async def cmd_model(message: Message, user: User, settings: Settings, redis: AsyncRedis) -> None:
    """The models a turn can run on now (a worker online), with prices and TEE."""
    current = user_model(settings, user)
    online = await models_online(redis, settings)
    if not online:
        await message.answer(_("No model has a worker online right now. Try again in a while."))
        return
    text = _("Choose a model. Prices are per 1M tokens (your message in, the answer out).")
    if current not in online:
        text += "\n\n" + _("Your model {model} has no worker online right now.").format(
            model=current
        )
    await message.answer(text, reply_markup=model_keyboard(settings, current, online))


@handlers.callback_query(F.data.startswith("model:"))
async def on_model(
    query: CallbackQuery, user: User, db: Database, settings: Settings, redis: AsyncRedis
) -> None:
    model = model_by_token(settings, (query.data or "").split(":", 1)[1])
    if model is None:
        await query.answer(_("This model is not available any more."), show_alert=True)
        return
    await accounts.set_model(db, user.id, model)
    await query.answer(_("Model set: {model}.").format(model=model))
    online = await models_online(redis, settings)
    if isinstance(query.message, Message) and online:
        await query.message.edit_reply_markup(reply_markup=model_keyboard(settings, model, online))


# ------------------------------------------------------------------------------- balance


@handlers.message(Command("balance"))
async def cmd_balance(message: Message, user: User, ledger: Ledger) -> None:
    balances = await ledger.balances(user.id)
    lines = [_("Balance: {available}").format(available=ton(balances.available))]
    if balances.held:
        lines.append(_("Held for answers being written: {held}").format(held=ton(balances.held)))
    if user.is_provider:
        lines.append(_("Provider earnings: see /earnings"))
    lines.append(_("Add funds with /topup."))
    await message.answer("\n".join(lines), parse_mode=None)


@handlers.message(Command("usage"))
async def cmd_usage(message: Message, user: User, db: Database) -> None:
    summary = await accounts.usage(db, user.id, limit=10)
    if not summary.turns:
        await message.answer(_("No messages yet. Just write to me."))
        return
    lines = [_("Recent answers:")]
    for row in summary.recent:
        lines.append(
            _("{when} · {model} · {prompt} + {completion} tokens · {cost}").format(
                when=row.created_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M"),
                model=row.model,
                prompt=row.prompt_tokens,
                completion=row.completion_tokens,
                cost=ton(row.cost),
            )
        )
    lines.append("")
    lines.append(
        _("All time: {turns}, {prompt} + {completion} tokens, {cost}.").format(
            turns=ngettext("{n} answer", "{n} answers", summary.turns).format(n=summary.turns),
            prompt=summary.prompt_tokens,
            completion=summary.completion_tokens,
            cost=ton(summary.cost),
        )
    )
    await message.answer("\n".join(lines), parse_mode=None)


# ------------------------------------------------------------------------------- privacy


def bot_path_note() -> str:
    """What the operator sees on the bot path, and where to go instead (/start, /privacy)."""
    return _(
        "Telegram delivers messages to this bot in plaintext, so the operator's bot process "
        "reads yours while it seals them. For a chat the operator cannot read, open the Mini "
        "App's chat and turn on “Sealed in this page”: your device checks the worker and seals "
        "each message itself."
    )


@handlers.message(Command("privacy"))
async def cmd_privacy(
    message: Message, user: User, contexts: ContextStore, redis: AsyncRedis
) -> None:
    conversation = await contexts.load(contexts.scope_of(Place.of(message, user.telegram_id)))
    last = conversation.last
    if last is None:
        await message.answer(
            _(
                "No answer in this chat yet (or it was forgotten). After my next answer, "
                "/privacy shows which attested worker wrote it."
            )
        )
        return
    worker = last.worker
    record = await registry.read_attestation(redis, worker.worker_id)
    lines = [
        _("The last answer ({model}) was written by worker {worker}.").format(
            model=last.model, worker=worker.worker_id
        )
    ]
    if worker.tee == "dev":
        lines.append(
            _(
                "TEE: development TEE. This worker is NOT hardware-attested: its evidence is "
                "signed in software, for development only."
            )
        )
    else:
        lines.append(_("TEE: {tee} (hardware-attested)").format(tee=worker.tee.upper()))
    if record is not None:
        lines.append(_("Image: {image}").format(image=record.image or _("unknown")))
        mrtd = record.measurements.get("mrtd")
        if mrtd:
            lines.append(_("MRTD: {prefix}…").format(prefix=mrtd[:MRTD_PREFIX]))
        expires = dt.datetime.fromtimestamp(record.expires_at, dt.UTC)
        lines.append(
            _("Attestation valid until {when} UTC").format(when=expires.strftime("%Y-%m-%d %H:%M"))
        )
    else:
        lines.append(_("The worker's attestation has expired or it went offline since."))
    # The engine its evidence bound (the record), never what the worker's own entry says.
    engine, version = (
        (record.engine, record.engine_version)
        if record is not None
        else (worker.engine, worker.engine_version)
    )
    lines.append(_("Engine: {engine} {version}").format(engine=engine, version=version))
    if record is not None and record.off_machine:
        lines.append(
            _(
                "This worker's engine sends prompts off its machine, to a server outside the "
                "TEE: development only, not private."
            )
        )
    lines.append(
        _("Worker key fingerprint: {fingerprint}").format(fingerprint=worker.key_fingerprint)
    )
    # "Verified" only from the turn's receipt, checked against the worker's attested key.
    if worker.receipt_id:
        lines.append(
            _("Receipt {receipt}: signed by the worker's attested key, verified").format(
                receipt=worker.receipt_id
            )
        )
    else:
        lines.append(_("Receipt: none was verified for this answer"))
    lines.append(bot_path_note())
    await message.answer("\n".join(lines), parse_mode=None)


# -------------------------------------------------------------------------------- forget


def forget_keyboard() -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        inline_keyboard=[
            [
                InlineKeyboardButton(text=_("Yes, delete"), callback_data="forget:yes"),
                InlineKeyboardButton(text=_("Cancel"), callback_data="forget:no"),
            ]
        ]
    )


@handlers.message(Command("forget"))
async def cmd_forget(message: Message) -> None:
    await message.answer(
        _(
            "Delete your conversation context, usage history, API keys, linked wallet, "
            "language and referral? Your balance and its accounting records stay (the law "
            "requires them)."
        ),
        reply_markup=forget_keyboard(),
    )


@handlers.callback_query(F.data == "forget:no")
async def on_forget_no(query: CallbackQuery) -> None:
    await query.answer()
    if isinstance(query.message, Message):
        await query.message.edit_text(_("Nothing was deleted."))


@handlers.callback_query(F.data == "forget:yes")
async def on_forget_yes(
    query: CallbackQuery, user: User, db: Database, contexts: ContextStore
) -> None:
    await accounts.forget_user(db, user.id)
    await contexts.clear(query.from_user.id)  # the private chat
    await contexts.clear_user(query.from_user.id)  # and what they asked in groups
    await query.answer()
    if isinstance(query.message, Message):
        await query.message.edit_text(
            _("Done: your personal data is deleted. Your balance stays yours."),
        )
