"""Living with the Bot API's limits: harmless errors kept quiet (flood waits are honoured by the
client itself: :mod:`backend.telegram`).

* "message is not modified" (an edit with the same text) is not an error.
* "bot was blocked by the user" (403) ends what the bot was doing for that user, logged at
  INFO without the message's content.
"""

from __future__ import annotations

import logging
import traceback

from aiogram.exceptions import (
    TelegramBadRequest,
    TelegramForbiddenError,
)
from aiogram.types import ErrorEvent

log = logging.getLogger("cocoon.bot")


def not_modified(error: BaseException) -> bool:
    return isinstance(error, TelegramBadRequest) and "message is not modified" in error.message


def cannot_parse(error: BaseException) -> bool:
    return isinstance(error, TelegramBadRequest) and "can't parse entities" in error.message.lower()


async def on_error(event: ErrorEvent) -> bool:
    """The dispatcher's last resort: quiet for the harmless Telegram errors, logged for the
    rest (the update's type only: never its text)."""
    error = event.exception
    if not_modified(error):
        return True
    if isinstance(error, TelegramForbiddenError):
        log.info("a user blocked the bot or left the chat: %s", error.message)
        return True
    # The traceback's frames, never the exception's message: a message can quote user input.
    frames = "".join(traceback.format_tb(error.__traceback__))
    log.error(
        "update %s (%s) failed: %s\n%s",
        event.update.update_id,
        event.update.event_type,
        type(error).__name__,
        frames,
    )
    return True
