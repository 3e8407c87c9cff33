"""The stand-in Bot API refuses what Telegram refuses (tests/support/telegram_rules.py), with
Telegram's words, so the bot's tests see the errors the bot would meet."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiogram import Bot
from aiogram.exceptions import TelegramBadRequest
from aiogram.types import InlineKeyboardButton, InlineKeyboardMarkup

from tests.support.bot_fakes import TOKEN, FakeTelegram


@pytest.fixture
async def tg_bot() -> AsyncIterator[Bot]:
    bot = Bot(TOKEN, session=FakeTelegram())
    yield bot
    await bot.session.close()


def keyboard(**button: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(inline_keyboard=[[InlineKeyboardButton(text="x", **button)]])


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda b: b.send_message(1, "x" * 4097), "message is too long"),
        (lambda b: b.send_message(1, "<b>" + "x" * 4096 + "</b>", parse_mode="HTML"), None),
        (lambda b: b.send_message(1, "<b>bold", parse_mode="HTML"), "can't parse entities"),
        (lambda b: b.send_message(1, "<table>", parse_mode="HTML"), "Unsupported start tag"),
        (lambda b: b.send_message(1, "a &nbsp; b", parse_mode="HTML"), "Unsupported HTML entity"),
        (lambda b: b.send_message(1, " "), "message text is empty"),
        (
            lambda b: b.send_message(1, "x", reply_markup=keyboard(callback_data="d" * 65)),
            "BUTTON_DATA_INVALID",
        ),
        (
            lambda b: b.send_message(1, "x", reply_markup=keyboard(url="ton://transfer/EQ")),
            "BUTTON_URL_INVALID",
        ),
        (lambda b: b.send_message_draft(chat_id=-100, draft_id=1, text="x"), "TEXTDRAFT_PEER"),
        (lambda b: b.answer_callback_query("q", text="x" * 201), "MESSAGE_TOO_LONG"),
    ],
)
async def test_what_telegram_refuses_is_refused(
    tg_bot: Bot, call: object, words: str | None
) -> None:
    if words is None:
        await call(tg_bot)  # type: ignore[operator]  # 4096 visible characters: accepted
        return
    with pytest.raises(TelegramBadRequest) as refused:
        await call(tg_bot)  # type: ignore[operator]
    assert words in refused.value.message


async def test_an_edit_that_changes_nothing_is_not_modified(tg_bot: Bot) -> None:
    sent = await tg_bot.send_message(1, "hello")
    await tg_bot.edit_message_text(text="hello!", chat_id=1, message_id=sent.message_id)
    with pytest.raises(TelegramBadRequest) as refused:
        await tg_bot.edit_message_text(text="hello!", chat_id=1, message_id=sent.message_id)
    assert "message is not modified" in refused.value.message
