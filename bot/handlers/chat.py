"""Chat: a plain message starts a turn on the user's model; the reply streams; /new, /retry and
the stop button. Registered last: it takes every text that no command took."""

from __future__ import annotations

import re

from aiogram import Bot, F
from aiogram.enums import ChatType
from aiogram.filters import Command, CommandObject
from aiogram.types import CallbackQuery, Message, MessageGenerationStopped
from redis.asyncio import Redis as AsyncRedis

from backend.models import User
from bot.common import Handlers
from bot.context import ContextStore
from bot.groups import Place, group_is_on, group_prompt
from bot.i18n import _
from bot.services import RunningTurns
from bot.streaming import STOP
from bot.turn_runner import TurnRunner

handlers = Handlers("chat")


@handlers.message(Command("new"))
async def cmd_new(message: Message, user: User, contexts: ContextStore) -> None:
    place = Place.of(message, user.telegram_id)
    if contexts.shared(place):  # the topic's context: only the caller's questions go
        scope = contexts.scope_of(place)
        conversation = await contexts.load(scope)
        if conversation.without_asker(user.telegram_id):
            await contexts.save(scope, conversation)
    else:
        await contexts.clear(place.scope)
    if place.private:
        await message.answer(_("Started over: I forgot this chat's earlier messages."))
    else:
        await message.reply(_("Started over: I forgot our earlier messages here."))


@handlers.message(Command("retry"))
async def cmd_retry(message: Message, bot: Bot, user: User, runner: TurnRunner) -> None:
    await runner.retry(message, bot, user)


@handlers.callback_query(F.data == STOP)
async def on_stop_button(query: CallbackQuery, running: RunningTurns) -> None:
    message = query.message
    if isinstance(message, Message):
        scope = Place.of(message, query.from_user.id).scope
    else:
        scope = message.chat.id if message is not None else query.from_user.id
    stopped = await running.stop(scope, by=query.from_user.id)
    await query.answer(_("Stopping…") if stopped else _("Nothing is running."))


@handlers.callback_query()
async def stale_button(query: CallbackQuery) -> None:
    """A button no handler knows (an old message's, a forged one): answered, so the user's
    app stops its spinner."""
    await query.answer(_("This button is not valid any more."), show_alert=True)


@handlers.stopped_message_generation()
async def on_draft_stopped(event: MessageGenerationStopped, running: RunningTurns) -> None:
    await running.stop(event.chat.id, draft_id=event.draft_id)


COMMAND = re.compile(r"^/[A-Za-z0-9_]{1,32}(@[A-Za-z0-9_]{3,64})?$")


def looks_like_command(text: str | None) -> bool:
    """ "/help" or "/help@bot", not "/etc/hosts — what is this?"."""
    words = (text or "").split(maxsplit=1)
    return bool(words) and COMMAND.match(words[0]) is not None


@handlers.message(F.text.func(looks_like_command), F.chat.type == ChatType.PRIVATE)
async def unknown_command(message: Message) -> None:
    await message.answer(_("I do not know that command. /help lists what I can do."))


@handlers.message(Command("ask"))
async def cmd_ask(
    message: Message,
    command: CommandObject,
    bot: Bot,
    user: User,
    runner: TurnRunner,
    redis: AsyncRedis,
) -> None:
    """``/ask QUESTION``: a turn in any chat (in a group, the way to ask without a mention)."""
    if message.chat.type != ChatType.PRIVATE and not await group_is_on(redis, message.chat.id):
        return
    prompt = (command.args or "").strip()
    if not prompt:
        await message.reply(_("Ask like this: /ask what is 2+2?"))
        return
    await runner.reply(message, bot, user, prompt)


@handlers.message(F.text, F.chat.type == ChatType.PRIVATE)
async def on_text(message: Message, bot: Bot, user: User, runner: TurnRunner) -> None:
    await runner.reply(message, bot, user, (message.text or "").strip())


@handlers.message(F.text, group_prompt)
async def on_group_text(
    message: Message,
    prompt: str,
    bot: Bot,
    user: User,
    runner: TurnRunner,
    redis: AsyncRedis,
) -> None:
    """A group message meant for the bot (a mention of it, a reply to it), while it is on."""
    if not await group_is_on(redis, message.chat.id):
        return
    if not prompt:
        await message.reply(_("Yes? Ask me something: /ask what is 2+2?"))
        return
    await runner.reply(message, bot, user, prompt)


@handlers.message(F.voice | F.video_note | F.audio, F.chat.type == ChatType.PRIVATE)
async def voice(message: Message) -> None:
    """Speech is not transcribed (no speech model runs on the network yet): said plainly."""
    await message.answer(_("I cannot listen to voice or audio yet: please type your question."))


@handlers.message(F.chat.type == ChatType.PRIVATE)
async def other_content(message: Message) -> None:
    await message.answer(_("I can read text only: send your question as a message."))
