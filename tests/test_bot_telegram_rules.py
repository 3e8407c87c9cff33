"""Both stand-in Bot APIs refuse what Telegram refuses (tests/support/telegram_rules.py), with
Telegram's words, so the bot's tests see the errors the bot would meet: the session-layer one
(in-process tests) and the HTTP server (the bot as its own process), each test run on both."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import TelegramBadRequest, TelegramRetryAfter
from aiogram.types import InlineKeyboardButton, InlineKeyboardMarkup, ReplyParameters

from tests.support import bot_fakes, fake_telegram
from tests.support.bot_fakes import TOKEN, callback_update, message_update


class Clock:
    """Time for flood control, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class StandIn:
    bot: Bot
    saw: Callable[[dict[str, Any]], None]
    clock: Clock


@pytest.fixture(params=["session", "http"])
async def tg(request: pytest.FixtureRequest) -> AsyncIterator[StandIn]:
    clock = Clock()
    if request.param == "session":
        session = bot_fakes.FakeTelegram(clock)
        bot = Bot(TOKEN, session=session)
        yield StandIn(bot, session.rules.saw, clock)
        await bot.session.close()
        return
    server = fake_telegram.FakeTelegram(clock)
    url = await server.start()
    bot = Bot(TOKEN, session=AiohttpSession(api=TelegramAPIServer.from_base(url)))
    try:
        yield StandIn(bot, server.saw, clock)
    finally:
        await bot.session.close()
        await server.stop()


@pytest.fixture
async def tg_bot(tg: StandIn) -> Bot:
    return tg.bot


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
        (lambda b: b.send_message(1, "x", message_thread_id=5), "message thread not found"),
        (
            lambda b: b.send_message(1, "x", reply_parameters=ReplyParameters(message_id=77)),
            "message to be replied not found",
        ),
        (lambda b: b.edit_message_text("x", chat_id=1, message_id=77), "message to edit not found"),
        (lambda b: b.delete_message(1, 77), "message to delete not found"),
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


async def test_replies_topics_edits_and_answers_follow_what_telegram_delivered(
    tg: StandIn,
) -> None:
    bot, group = tg.bot, -100900
    asked = message_update(
        7, "hi", chat_id=group, chat_type="supergroup", message_thread_id=4, is_topic_message=True
    )
    tg.saw(asked)
    mid = asked["message"]["message_id"]
    # A reply in the asker's topic: accepted; the same reply in another chat: refused.
    await bot.send_message(
        group, "yes", message_thread_id=4, reply_parameters=ReplyParameters(message_id=mid)
    )
    with pytest.raises(TelegramBadRequest, match="message to be replied not found"):
        await bot.send_message(-100901, "yes", reply_parameters=ReplyParameters(message_id=mid))
    with pytest.raises(TelegramBadRequest, match="message to be replied not found"):
        await bot.send_message(group, "x", reply_parameters=ReplyParameters(message_id=mid + 99))
    anyway = ReplyParameters(message_id=mid + 99, allow_sending_without_reply=True)
    await bot.send_message(group, "sent without the reply", reply_parameters=anyway)
    with pytest.raises(TelegramBadRequest, match="message thread not found"):
        await bot.send_message(group, "x", message_thread_id=5)
    # Only the bot's own messages can be edited.
    with pytest.raises(TelegramBadRequest, match="message can't be edited"):
        await bot.edit_message_text("x", chat_id=group, message_id=mid)
    # A callback query is answered once.
    pressed = callback_update(7, "data", chat_id=group)
    tg.saw(pressed)
    query = pressed["callback_query"]["id"]
    await bot.answer_callback_query(query)
    with pytest.raises(TelegramBadRequest, match="query is too old"):
        await bot.answer_callback_query(query, text="again")


async def test_flood_control_says_when_to_retry(tg: StandIn) -> None:
    bot, clock = tg.bot, tg.clock
    # A group: 20 new messages a minute.
    for n in range(20):
        await bot.send_message(-100902, f"m{n}")
        clock.now += 1
    with pytest.raises(TelegramRetryAfter) as waited:
        await bot.send_message(-100902, "one too many")
    assert waited.value.retry_after == 40  # the first of the 20 was 40 s before the minute ends
    clock.now += 40
    await bot.send_message(-100902, "after the wait")
    # A private chat: a burst of five, then one a second.
    for n in range(5):
        await bot.send_message(3, f"p{n}")
    with pytest.raises(TelegramRetryAfter) as waited:
        await bot.send_message(3, "too fast")
    assert waited.value.retry_after == 1
    clock.now += 1
    await bot.send_message(3, "in time")
    # All chats: 30 a second.
    clock.now += 100
    for chat in range(100, 130):
        await bot.send_message(chat, "broadcast")
    with pytest.raises(TelegramRetryAfter):
        await bot.send_message(131, "the 31st this second")
