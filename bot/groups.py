"""The bot in groups and forum topics: where a turn lives, what a group may see, who may press.

* **Where.** A :class:`Place` is the chat, the forum topic and the asker. Its :attr:`Place.scope`
  names the running turn and, by default, the context: the chat itself in a private chat; in a
  group, the asker in that topic (``<chat>:<topic>:<user>``), so topics never share a context.
  Where the operator chooses one context per topic (``COCOON_GROUP_CONTEXT=topic``), its
  members share ``<chat>:<topic>`` (:meth:`Place.context_scope`); either way one member's
  ``/new`` or ``/retry`` touches only their own questions. Answers go to the asker's topic, as
  replies to the asker's message.
* **What a group may see.** Money, keys and personal data are for the private chat only: in a
  group those commands (and their buttons) get a button that opens the private chat.
* **When it answers in a group:** ``/ask``, an @mention of the bot, or a reply to one of *its*
  messages; group admins turn it off and on with ``/bot off`` and ``/bot on``.
* **Who may press.** Every button the bot posts in a group belongs to the person whose update it
  answered (:class:`ButtonOwners`, recorded as the message is sent); anyone else is told so.
"""

from __future__ import annotations

import contextvars
import logging
import re
from dataclasses import dataclass
from typing import Any

from aiogram import BaseMiddleware, Bot, F
from aiogram.client.session.middlewares.base import BaseRequestMiddleware, NextRequestMiddlewareType
from aiogram.enums import ChatMemberStatus, ChatType
from aiogram.filters import Command, CommandObject
from aiogram.methods import EditMessageReplyMarkup, EditMessageText, SendMessage, TelegramMethod
from aiogram.methods.base import Response, TelegramType
from aiogram.types import (
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    MessageEntity,
    ReplyParameters,
    TelegramObject,
)
from redis.asyncio import Redis as AsyncRedis

from bot.common import Handlers, NextHandler
from bot.i18n import _
from workers.redis_keys import redis_key

log = logging.getLogger("cocoon.bot.groups")

handlers = Handlers("groups")

PRIVATE_COMMANDS = (
    "start",
    "balance",
    "usage",
    "topup",
    "forget",
    "apikey",
    "provider",
    "addworker",
    "workers",
    "earnings",
    "withdraw",
)
"""Commands about money, keys or personal data: answered in the private chat only."""

PRIVATE_BUTTONS = (
    "topup:",
    "stars:",
    "tonamt:",
    "tcw:",
    "tcx",
    "wd:",
    "forget:",
    "apikey:",
    "aw:",
    "again",
)
"""Callback data of those commands' buttons (an old message, a forged update)."""

OWNER = "bot:button"
OWNER_TTL_S = 30 * 86400
GROUP_OFF = "bot:group-off"

_asker: contextvars.ContextVar[int | None] = contextvars.ContextVar("cocoon_asker", default=None)


def set_asker(telegram_id: int | None) -> contextvars.Token[int | None]:
    """The person whose update is being handled (buttons sent meanwhile are theirs)."""
    return _asker.set(telegram_id)


def reset_asker(token: contextvars.Token[int | None]) -> None:
    _asker.reset(token)


def private(chat_type: str | None) -> bool:
    return chat_type == ChatType.PRIVATE


@dataclass(frozen=True)
class Place:
    """Where a turn lives and where its answer goes."""

    chat_id: int
    private: bool
    user_id: int  # the asker's Telegram id
    thread_id: int | None = None  # the forum topic
    reply_to: int | None = None  # the asker's message

    @property
    def scope(self) -> int | str:
        if self.private:
            return self.chat_id
        return f"{self.chat_id}:{self.thread_id or 0}:{self.user_id}"

    def context_scope(self, shared_topics: bool) -> int | str:
        """The context's name: :attr:`scope`, or in a group the topic's own when its members
        share one (``shared_topics``)."""
        if shared_topics and not self.private:
            return f"{self.chat_id}:{self.thread_id or 0}"
        return self.scope

    @classmethod
    def of(cls, message: Message, user_id: int) -> Place:
        is_private = private(message.chat.type)
        return cls(
            chat_id=message.chat.id,
            private=is_private,
            user_id=user_id,
            thread_id=message.message_thread_id if message.is_topic_message else None,
            reply_to=None if is_private else message.message_id,
        )

    def send_options(self) -> dict[str, Any]:
        """``send_message`` options: the topic, and a reply to the asker."""
        options: dict[str, Any] = {}
        if self.thread_id is not None:
            options["message_thread_id"] = self.thread_id
        if self.reply_to is not None:
            options["reply_parameters"] = ReplyParameters(
                message_id=self.reply_to, allow_sending_without_reply=True
            )
        return options


# ---------------------------------------------------------------------- group triggers


def _mentions(message: Message, username: str, bot_id: int) -> list[MessageEntity]:
    text = message.text or message.caption or ""
    found = []
    for entity in message.entities or message.caption_entities or []:
        if entity.type == "mention":
            if entity.extract_from(text).lower() == "@" + username.lower():
                found.append(entity)
        elif entity.type == "text_mention" and entity.user is not None:
            if entity.user.id == bot_id:
                found.append(entity)
    return found


def _without(text: str, entities: list[MessageEntity]) -> str:
    """``text`` with the entities cut out (offsets in UTF-16 code units, as Telegram's)."""
    encoded = text.encode("utf-16-le")
    for entity in sorted(entities, key=lambda e: e.offset, reverse=True):
        start, end = entity.offset * 2, (entity.offset + entity.length) * 2
        encoded = encoded[:start] + encoded[end:]
    return " ".join(encoded.decode("utf-16-le").split())


def replies_to_this_bot(message: Message, bot_id: int) -> bool:
    """A reply to one of this bot's messages (not another bot's, not a topic's first message,
    which every message of a forum topic points at)."""
    replied = message.reply_to_message
    if replied is None or replied.forum_topic_created is not None:
        return False
    return replied.from_user is not None and replied.from_user.id == bot_id


async def group_prompt(message: Message, bot: Bot) -> dict[str, str] | bool:
    """A filter for group messages meant for the bot: an @mention of it (the mention cut
    out) or a reply to one of its messages, in the text or a media's caption. Gives the
    handler ``prompt``."""
    text = message.text if message.text is not None else message.caption
    if private(message.chat.type) or text is None:
        return False
    me = await bot.me()
    mentions = _mentions(message, me.username or "", me.id)
    if mentions:
        return {"prompt": _without(text, mentions)}
    if replies_to_this_bot(message, me.id):
        return {"prompt": text.strip()}
    return False


async def group_is_on(redis: AsyncRedis, chat_id: int) -> bool:
    return not await redis.exists(redis_key(GROUP_OFF, str(chat_id)))


# ------------------------------------------------------------------- buttons and owners


class ButtonOwners(BaseRequestMiddleware):
    """A session middleware: each message with buttons the bot sends (or edits) in a group is
    recorded as its asker's; :class:`OwnedButtons` lets only them press."""

    def __init__(self, redis: AsyncRedis) -> None:
        self.redis = redis

    async def __call__(
        self,
        make_request: NextRequestMiddlewareType[TelegramType],
        bot: Bot,
        method: TelegramMethod[TelegramType],
    ) -> Response[TelegramType]:
        response = await make_request(bot, method)
        asker = _asker.get()
        if asker is None or not isinstance(
            method, SendMessage | EditMessageText | EditMessageReplyMarkup
        ):
            return response
        if not isinstance(method.reply_markup, InlineKeyboardMarkup):
            return response
        # aiogram types the chain as Response, but hands back the method's result itself.
        result: Any = response.result if isinstance(response, Response) else response
        if isinstance(result, Message) and not private(result.chat.type):
            key = owner_key(result.chat.id, result.message_id)
            try:
                await self.redis.set(key, str(asker), ex=OWNER_TTL_S)
            except Exception as error:  # the button then answers "not yours": safe side
                log.warning("a button's owner was not recorded: %s", type(error).__name__)
        return response


def owner_key(chat_id: int, message_id: int) -> str:
    return redis_key(OWNER, str(chat_id), str(message_id))


class OwnedButtons(BaseMiddleware):
    """Callback queries from groups: only the button's owner passes; the rest are answered
    (never a spinner left turning)."""

    async def __call__(
        self, handler: NextHandler, event: TelegramObject, data: dict[str, Any]
    ) -> Any:
        assert isinstance(event, CallbackQuery)
        message = event.message
        if message is None or private(message.chat.type):
            return await handler(event, data)
        if (event.data or "").startswith(PRIVATE_BUTTONS):
            await event.answer(_("This is for our private chat."), show_alert=True)
            return None
        redis: AsyncRedis = data["redis"]
        owner = await redis.get(owner_key(message.chat.id, message.message_id))
        if owner is None or int(owner) != event.from_user.id:
            await event.answer(_("This button is for the person who asked."), show_alert=True)
            return None
        return await handler(event, data)


# ---------------------------------------------------------------------------- handlers


async def private_chat_keyboard(bot: Bot, start: str = "") -> InlineKeyboardMarkup:
    me = await bot.me()
    url = f"https://t.me/{me.username}" + (f"?start={start}" if start else "")
    button = InlineKeyboardButton(text=_("Open the private chat"), url=url)
    return InlineKeyboardMarkup(inline_keyboard=[[button]])


@handlers.message(Command(*PRIVATE_COMMANDS), ~F.chat.type.in_({ChatType.PRIVATE}))
async def private_only(message: Message, bot: Bot) -> None:
    await message.reply(
        _("That is between you and me: ask me in our private chat."),
        reply_markup=await private_chat_keyboard(bot),
    )


async def is_group_admin(bot: Bot, message: Message) -> bool:
    """Whether the message's sender is an admin (or the creator) of its group."""
    sender = message.from_user
    assert sender is not None  # the user middleware serves people only
    member = await bot.get_chat_member(message.chat.id, sender.id)
    return member.status in {ChatMemberStatus.CREATOR, ChatMemberStatus.ADMINISTRATOR}


BOT_SWITCH = re.compile(r"^(on|off)$")


@handlers.message(Command("bot"), ~F.chat.type.in_({ChatType.PRIVATE}))
async def cmd_bot_switch(
    message: Message, command: CommandObject, bot: Bot, redis: AsyncRedis
) -> None:
    """``/bot on`` or ``/bot off``: a group admin turns the bot's answers on or off."""
    choice = (command.args or "").strip().lower()
    if not BOT_SWITCH.match(choice):
        await message.reply(
            _("Group admins: /bot off stops my answers here, /bot on resumes them.")
        )
        return
    if not await is_group_admin(bot, message):
        await message.reply(_("Only the group's admins can turn me on or off."))
        return
    key = redis_key(GROUP_OFF, str(message.chat.id))
    if choice == "off":
        await redis.set(key, "1")
        await message.reply(
            _("I am off in this group: I answer nothing until an admin says /bot on.")
        )
    else:
        await redis.delete(key)
        await message.reply(_("I am on in this group: ask with /ask, a mention or a reply to me."))
