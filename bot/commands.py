"""The bot's commands, as /help lists them and as Telegram's menu shows them (per language)."""

from __future__ import annotations

import logging

from aiogram import Bot
from aiogram.exceptions import TelegramAPIError
from aiogram.types import BotCommand, BotCommandScopeDefault, MenuButtonWebApp, WebAppInfo

from backend.i18n import LANGUAGES
from bot.i18n import N_, _, use_language

log = logging.getLogger("cocoon.bot")

USER_COMMANDS: tuple[tuple[str, str], ...] = (
    ("start", N_("welcome and how it works")),
    ("help", N_("what I can do")),
    ("new", N_("start a new conversation")),
    ("retry", N_("regenerate the last answer")),
    ("model", N_("choose the model")),
    ("balance", N_("your balance")),
    ("topup", N_("add GRAM or Stars")),
    ("usage", N_("recent messages and their cost")),
    ("privacy", N_("who answered, and the proof")),
    ("lang", N_("language")),
    ("apikey", N_("API keys for the OpenAI-compatible API")),
    ("forget", N_("delete your data")),
)
PROVIDER_COMMANDS: tuple[tuple[str, str], ...] = (
    ("provider", N_("become a provider, link a payout wallet")),
    ("addworker", N_("register a GPU worker")),
    ("workers", N_("your workers")),
    ("earnings", N_("what your workers earned")),
    ("withdraw", N_("withdraw earnings: /withdraw AMOUNT or all")),
)
ADMIN_COMMANDS: tuple[tuple[str, str], ...] = (
    ("stats", N_("users, turns, revenue, workers")),
    ("prices", N_("model prices")),
)


def help_text(*, is_provider: bool, is_admin: bool) -> str:
    lines = [_("I answer with language models running on attested GPU workers. Just write.")]
    lines.append("")
    lines += [f"/{name} — {_(text)}" for name, text in USER_COMMANDS]
    lines.append("")
    lines.append(_("For GPU owners:"))
    lines += [f"/{name} — {_(text)}" for name, text in PROVIDER_COMMANDS]
    if is_admin:
        lines.append("")
        lines.append(_("For admins:"))
        lines += [f"/{name} — {_(text)}" for name, text in ADMIN_COMMANDS]
    return "\n".join(lines)


async def set_menu_button(bot: Bot, miniapp_url: str | None) -> None:
    """The chat's menu button opens the Mini App (Telegram opens Mini Apps over https only)."""
    if not miniapp_url:
        return
    with use_language(None):
        button = MenuButtonWebApp(text=_("Wallet"), web_app=WebAppInfo(url=miniapp_url))
    try:
        await bot.set_chat_menu_button(menu_button=button)
    except TelegramAPIError as error:
        log.warning("could not set the menu button: %s", error.message)


async def set_commands(bot: Bot) -> None:
    """The command menu in every language (setMyCommands with language_code), and the default."""
    for language in (None, *LANGUAGES):
        with use_language(language):
            commands = [
                BotCommand(command=name, description=_(text))
                for name, text in (*USER_COMMANDS, *PROVIDER_COMMANDS)
            ]
        try:
            await bot.set_my_commands(
                commands, scope=BotCommandScopeDefault(), language_code=language
            )
        except TelegramAPIError as error:
            log.warning("could not set the command menu (%s): %s", language, error.message)
