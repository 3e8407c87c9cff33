"""What peers offer beyond plain text: a system prompt per chat (``/system``, with presets from
the operator's settings), a photo's caption read as the question, an edited question answered
again. Registered before chat, whose last handler answers other content."""

from __future__ import annotations

from aiogram import Bot, F
from aiogram.enums import ChatType
from aiogram.filters import Command, CommandObject
from aiogram.types import Message

from backend.dispatch import Dispatcher as TurnDispatcher
from backend.models import User
from backend.ratelimit import RateLimiter
from backend.settings import Settings
from bot.common import Handlers
from bot.context import ContextStore
from bot.groups import Place
from bot.handlers.chat import reply_to
from bot.i18n import _
from bot.services import RunningTurns

handlers = Handlers("persona")

MAX_SYSTEM_CHARS = 2000
OFF = {"off", "none", "clear", "reset"}


@handlers.message(Command("system"))
async def cmd_system(
    message: Message, command: CommandObject, user: User, contexts: ContextStore
) -> None:
    """``/system`` shows this chat's system prompt; ``/system TEXT`` sets it; ``/system off``
    clears it. In a group it is the caller's own, like their context."""
    scope = Place.of(message, user.telegram_id).scope
    conversation = await contexts.load(scope)
    text = (command.args or "").strip()
    if not text:
        if conversation.system:
            await message.answer(
                _("System prompt here: {system}\n/system off clears it.").format(
                    system=conversation.system
                ),
                parse_mode=None,
            )
        else:
            await message.answer(
                _("No system prompt here. Set one: /system You are a concise tutor."),
                parse_mode=None,
            )
        return
    if text.lower() in OFF:
        conversation.system = ""
        await contexts.save(scope, conversation)
        await message.answer(_("System prompt cleared."))
        return
    if len(text) > MAX_SYSTEM_CHARS:
        await message.answer(
            _("A system prompt is at most {limit} characters.").format(limit=MAX_SYSTEM_CHARS)
        )
        return
    conversation.system = text
    await contexts.save(scope, conversation)
    await message.answer(_("System prompt set: my next answers here follow it."))


@handlers.message(F.caption, F.chat.type == ChatType.PRIVATE)
async def on_caption(
    message: Message,
    bot: Bot,
    user: User,
    settings: Settings,
    turns: TurnDispatcher,
    contexts: ContextStore,
    running: RunningTurns,
    limiter: RateLimiter,
) -> None:
    """A photo, document or other media with a caption: the caption is the question (the
    attachment itself is not sent to the model, and the user is told)."""
    await message.answer(_("I read your caption; the attachment itself is not sent to the model."))
    prompt = (message.caption or "").strip()
    await reply_to(message, bot, user, prompt, settings, turns, contexts, running, limiter)


@handlers.edited_message(F.text, F.chat.type == ChatType.PRIVATE)
async def on_edited(
    message: Message,
    bot: Bot,
    user: User,
    settings: Settings,
    turns: TurnDispatcher,
    contexts: ContextStore,
    running: RunningTurns,
    limiter: RateLimiter,
) -> None:
    """An edited question is answered again, as asked now."""
    prompt = (message.text or "").strip()
    if prompt and not prompt.startswith("/"):
        await reply_to(message, bot, user, prompt, settings, turns, contexts, running, limiter)
