"""Living with the Bot API's limits: harmless errors kept quiet (flood waits are honoured by the
client itself: :mod:`backend.telegram`).

* "message is not modified" (an edit with the same text) is not an error.
* "bot was blocked by the user" (403) ends what the bot was doing for that user, logged at
  INFO without the message's content.
* Any other failure is logged and told to the person, in their language (:func:`tell_failed`):
  never silence. A handler that already told them what happened (a turn's runner: what the
  undelivered answer cost) marks the error with :func:`mark_told`.
* A Stars payment whose crediting failed is kept for a retry
  (:mod:`backend.accounts.stars_pending`).
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from aiogram import Bot
from aiogram.exceptions import (
    TelegramBadRequest,
    TelegramForbiddenError,
)
from aiogram.types import Chat, ErrorEvent, Update
from aiogram.types import User as TelegramUser
from redis.asyncio import Redis as AsyncRedis

from backend.accounts import stars_pending
from bot.i18n import N_, _, use_language

log = logging.getLogger("cocoon.bot")

TOLD = "cocoon: the user was told"  # the note of an error the user already heard about
FAILED = N_(
    "Sorry, something went wrong on our side and this was not done. Nothing was charged for "
    "it; please try again."
)
PAYMENT_DELAYED = N_(
    "Your payment arrived. An error on our side delayed crediting it: it will be credited "
    "automatically, and you will be told when it is. The payment's id: {charge_id}"
)


def not_modified(error: BaseException) -> bool:
    return isinstance(error, TelegramBadRequest) and "message is not modified" in error.message


def cannot_parse(error: BaseException) -> bool:
    return isinstance(error, TelegramBadRequest) and "can't parse entities" in error.message.lower()


def mark_told(error: BaseException) -> None:
    """Note on ``error`` that the user was already told what it means for them."""
    error.add_note(TOLD)


async def on_error(event: ErrorEvent, **data: Any) -> bool:
    """The dispatcher's last resort: quiet for the harmless Telegram errors, logged for the
    rest (the update's type only: never its text) and told to the person."""
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
    await keep_payment(event.update, data)
    if TOLD not in getattr(error, "__notes__", ()):
        await tell_failed(event.update, data)
    return True


async def keep_payment(update: Update, data: dict[str, Any]) -> None:
    """A Stars payment whose update failed is kept for the retry loop (Telegram never sends it
    again); when Redis fails too, the log keeps it (no secret in it) for the operator."""
    payment = update.message.successful_payment if update.message else None
    sender: TelegramUser | None = data.get("event_from_user")
    if payment is None or sender is None or payment.currency != "XTR":
        return
    record = stars_pending.PendingStars(
        payment.telegram_payment_charge_id,
        sender.id,
        payment.total_amount,
        payment.invoice_payload,
    )
    redis: AsyncRedis | None = data.get("redis")
    try:
        if redis is None:
            raise RuntimeError("no Redis")
        await stars_pending.keep(redis, record)
    except Exception as error:
        log.error(
            "a Stars payment is NOT credited and could not be kept (%s): credit it with "
            "cocoon stars credit --record '%s'",
            type(error).__name__,
            record.to_json(),
        )
        return
    log.warning("a Stars payment is not credited yet: kept for a retry (cocoon stars pending)")


async def tell_failed(update: Update, data: dict[str, Any]) -> None:
    """Tell the person whose update failed, in their language: a button's press as an alert,
    a private message in the chat (a group's messages are not all for the bot: not there)."""
    bot: Bot | None = data.get("bot")
    sender: TelegramUser | None = data.get("event_from_user")
    chat: Chat | None = data.get("event_chat")
    user = data.get("user")  # the database's, when the failure came after it was read
    if bot is None or sender is None:
        return
    language = getattr(user, "language_code", None) or sender.language_code
    try:
        with use_language(language):
            payment = update.message.successful_payment if update.message else None
            text = (
                _(PAYMENT_DELAYED).format(charge_id=payment.telegram_payment_charge_id)
                if payment
                else _(FAILED)
            )
            if update.callback_query is not None:
                try:  # refused when the handler answered the press before failing
                    await bot.answer_callback_query(update.callback_query.id, text, True)
                    return
                except TelegramBadRequest:
                    pass
            if chat is not None and chat.type == "private":
                await bot.send_message(chat.id, text, parse_mode=None)
    except Exception as error:  # Telegram itself is failing: the log keeps the failure
        log.warning("could not tell a user their update failed: %s", type(error).__name__)
