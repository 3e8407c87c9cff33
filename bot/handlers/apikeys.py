"""/apikey: create, list and revoke keys of the OpenAI-compatible API."""

from __future__ import annotations

import html

from aiogram import F
from aiogram.enums import ParseMode
from aiogram.filters import Command, CommandObject
from aiogram.types import CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Message

from backend.apikeys import create_key, list_keys, revoke_key
from backend.db import Database
from backend.models import User
from backend.settings import Settings
from bot.common import Handlers
from bot.handlers.provider import backend_url
from bot.i18n import _

handlers = Handlers("apikeys")

MAX_KEYS = 20


async def _list(db: Database, user: User) -> tuple[str, InlineKeyboardMarkup]:
    keys = [key for key in await list_keys(db, user.id) if key.revoked_at is None]
    rows = [[InlineKeyboardButton(text=_("Create a key"), callback_data="apikey:new")]]
    if not keys:
        return _("You have no API keys."), InlineKeyboardMarkup(inline_keyboard=rows)
    lines = [_("Your API keys:")]
    for key in keys:
        label = f"{key.prefix}… {key.name or ''}".strip()
        lines.append(f"• {label} ({key.created_at:%Y-%m-%d})")
        rows.append(
            [
                InlineKeyboardButton(
                    text=_("Revoke {key}").format(key=key.prefix + "…"),
                    callback_data=f"apikey:revoke:{key.id}",
                )
            ]
        )
    return "\n".join(lines), InlineKeyboardMarkup(inline_keyboard=rows)


async def _create(db: Database, user: User, settings: Settings, name: str | None) -> str | None:
    active = [key for key in await list_keys(db, user.id) if key.revoked_at is None]
    if len(active) >= MAX_KEYS:
        return None
    key, _row = await create_key(db, user.id, name=(name or None) and name[:64])
    intro = _(
        "Your new API key (shown only this once; keep it secret). Use it with any OpenAI "
        "client, base URL {url}:"
    ).format(url=backend_url(settings) + "/v1")
    return f"{html.escape(intro, quote=False)}\n<code>{html.escape(key, quote=False)}</code>"


@handlers.message(Command("apikey"))
async def cmd_apikey(
    message: Message, command: CommandObject, user: User, db: Database, settings: Settings
) -> None:
    args = (command.args or "").split(maxsplit=1)
    if args and args[0].lower() in {"new", "create"}:
        text = await _create(db, user, settings, args[1] if len(args) > 1 else None)
        if text is None:
            await message.answer(_("You have too many keys: revoke one first."))
        else:
            await message.answer(text, parse_mode=ParseMode.HTML)
        return
    text, keyboard = await _list(db, user)
    await message.answer(text, reply_markup=keyboard)


@handlers.callback_query(F.data == "apikey:new")
async def on_new_key(query: CallbackQuery, user: User, db: Database, settings: Settings) -> None:
    text = await _create(db, user, settings, None)
    await query.answer()
    if query.message is None:
        return
    if text is None:
        await query.message.answer(_("You have too many keys: revoke one first."))
    else:
        await query.message.answer(text, parse_mode=ParseMode.HTML)


@handlers.callback_query(F.data.startswith("apikey:revoke:"))
async def on_revoke(query: CallbackQuery, user: User, db: Database) -> None:
    try:
        key_id = int((query.data or "").rsplit(":", 1)[1])
    except ValueError:
        key_id = 0
    # A key's id is a 32-bit row id: anything else (forged data) names no key.
    revoked = 0 < key_id < 2**31 and await revoke_key(db, user.id, key_id)
    await query.answer(_("Key revoked.") if revoked else _("This key was already revoked."))
    if isinstance(query.message, Message):
        text, keyboard = await _list(db, user)
        await query.message.edit_text(text, reply_markup=keyboard)
