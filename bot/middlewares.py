"""Per-update middleware: the user's database row and language."""

from __future__ import annotations

from typing import Any

from aiogram import BaseMiddleware
from aiogram.types import TelegramObject, Update
from aiogram.types import User as TelegramUser

from backend import accounts
from backend.users import get_or_create_user
from bot.common import NextHandler
from bot.groups import reset_asker, set_asker
from bot.i18n import use_language
from workers.logcontext import bound


class UserMiddleware(BaseMiddleware):
    """Adds ``user`` (created on first contact) and ``lang`` to the handler's data, and
    translates the handler's replies into that language: the user's ``/lang`` choice, else
    their Telegram app's language as of this update (kept for their notifications), else
    English."""

    async def __call__(
        self, handler: NextHandler, event: TelegramObject, data: dict[str, Any]
    ) -> Any:
        update_id = event.update_id if isinstance(event, Update) else None
        with bound(update_id=update_id):  # every log line of this update carries its id
            sender: TelegramUser | None = data.get("event_from_user")
            if sender is None or sender.is_bot:
                # Nobody to serve (an anonymous group admin, a channel, a bot): the handlers
                # of people's updates need their user; only updates that never name a sender
                # (a stopped draft) go on.
                if isinstance(event, Update) and event.event_type != "stopped_message_generation":
                    return None
                with use_language(None) as lang:
                    data["lang"] = lang
                    return await handler(event, data)
            user = await get_or_create_user(data["db"], sender.id, sender.language_code)
            seen = (sender.language_code or "")[:16]
            if seen and not user.language_chosen and seen != user.language_code:
                # Not chosen with /lang: the language follows the Telegram app's.
                if await accounts.follow_language(data["db"], user.id, seen):
                    user.language_code = seen
            data["user"] = user
            asker = set_asker(sender.id)  # the buttons sent meanwhile are theirs
            try:
                with use_language(user.language_code or sender.language_code) as lang:
                    data["lang"] = lang
                    return await handler(event, data)
            finally:
                reset_asker(asker)
