"""The bot in groups and forum topics (Telegram faked at the session layer, the rest real): money,
keys and personal data stay out of groups; buttons answer only the person who asked; the bot
answers /ask, a mention of itself or a reply to its own messages, in the asker's topic; admins
turn it off and on; "/" starts a command only when it is one."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from backend.models import ApiKey
from tests.support.bot import ALICE, Harness
from tests.support.bot_fakes import bot_message, callback_update, feed, message_update

GROUP = -100555
TOPIC = 77
BOB = 502


async def in_group(
    bot: Harness, text: str | None, user: int = ALICE, **extra: Any
) -> dict[str, Any]:
    update = message_update(user, text, chat_id=GROUP, chat_type="supergroup", **extra)
    await feed(bot.app.dp, bot.app.bot, update)
    return dict(update["message"])


def in_topic(topic: int = TOPIC) -> dict[str, Any]:
    """A message of a forum topic: Telegram points it at the topic's first message."""
    first = {
        "message_id": topic,
        "date": 0,
        "chat": {"id": GROUP, "type": "supergroup", "is_forum": True},
        "from": {"id": ALICE, "is_bot": False, "first_name": "Ada"},
        "forum_topic_created": {"name": "Questions", "icon_color": 7322096},
    }
    return {"message_thread_id": topic, "is_topic_message": True, "reply_to_message": first}


def mention(text: str, at: int = 0) -> list[dict[str, Any]]:
    return [{"type": "mention", "offset": at, "length": len("@cocoon_bot")}]


def sent_to_group(bot: Harness) -> list[Any]:
    return [r for r in bot.tg.calls("sendMessage") if r.chat_id == GROUP]


# ------------------------------------------------------------------- private matters


async def test_money_keys_and_personal_data_are_never_answered_in_a_group(bot: Harness) -> None:
    await bot.ledger.credit_deposit((await _user(bot)).id, 10**9, "dep:alice")
    for command in ("/apikey create", "/balance", "/usage", "/topup", "/forget", "/start"):
        bot.tg.clear()
        await in_group(bot, command)
        (reply,) = bot.tg.calls("sendMessage")
        assert reply.text == "That is between you and me: ask me in our private chat."
        button = reply.reply_markup.inline_keyboard[0][0]
        assert button.url == "https://t.me/cocoon_bot"
    async with bot.db.session() as session:
        assert not list(await session.scalars(select(ApiKey)))  # no key was made
    everything = bot.tg.all_text()
    user = await _user(bot)
    assert user.deposit_memo not in everything and "1 GRAM" not in everything


async def test_money_buttons_pressed_in_a_group_are_refused(bot: Harness) -> None:
    for data in ("topup:stars", "stars:50", "forget:yes", "apikey:new", "wd:1:x", "tcw:p"):
        await feed(bot.app.dp, bot.app.bot, callback_update(ALICE, data, chat_id=GROUP))
        answer = bot.last("answerCallbackQuery")
        assert answer.text == "This is for our private chat." and answer.show_alert
    assert not bot.tg.calls("sendInvoice") and not bot.tg.calls("sendMessage")


# ------------------------------------------------------------------- owned buttons


async def test_a_groups_buttons_answer_only_the_person_who_asked(bot: Harness) -> None:
    await in_group(bot, "/lang")
    shown = bot.tg.sent("sendMessage")[-1].message_id
    choice = bot.last().reply_markup.inline_keyboard[-1][0].callback_data
    assert choice.startswith("lang:") and choice != "lang:en"
    await feed(
        bot.app.dp, bot.app.bot, callback_update(BOB, choice, chat_id=GROUP, message_id=shown)
    )
    refused = bot.last("answerCallbackQuery")
    assert refused.text == "This button is for the person who asked." and refused.show_alert
    assert (await _user(bot, BOB)).language_code == "en"  # the choice did not happen
    await feed(
        bot.app.dp, bot.app.bot, callback_update(ALICE, choice, chat_id=GROUP, message_id=shown)
    )
    assert bot.last("answerCallbackQuery").text != refused.text
    # A button of a message the bot has no owner for (forged, or too old): refused too.
    await feed(bot.app.dp, bot.app.bot, callback_update(ALICE, choice, chat_id=GROUP, message_id=1))
    refused_again = bot.last("answerCallbackQuery").text  # in the language Alice just chose
    assert refused_again == "Ce bouton est pour la personne qui a demandé."


# ------------------------------------------------------------------------ triggers


async def test_a_mention_or_ask_gets_an_answer_in_the_askers_topic(bot: Harness) -> None:
    asked = await in_group(bot, "@cocoon_bot what is 2+2?", entities=mention(""), **in_topic())
    (reply,) = sent_to_group(bot)
    assert reply.message_thread_id == TOPIC
    assert reply.reply_parameters.message_id == asked["message_id"]
    assert "balance" in reply.text.lower()  # a turn was tried: Alice has no balance yet
    bot.tg.clear()
    asked = await in_group(bot, "/ask what is 2+2?", **in_topic(TOPIC + 1))
    (reply,) = sent_to_group(bot)
    assert reply.message_thread_id == TOPIC + 1
    assert reply.reply_parameters.message_id == asked["message_id"]


async def test_a_group_message_not_for_the_bot_gets_nothing(bot: Harness) -> None:
    other_bot = bot_message(GROUP, "I am another bot", 9, sender=31337, name="Other")
    await in_group(bot, "what is 2+2?")
    await in_group(bot, "what is 2+2?", reply_to_message=other_bot)
    await in_group(bot, "what is 2+2?", **in_topic())  # in a topic: a reply to its first message
    await in_group(bot, "/etc/hosts — what is this?")
    assert not bot.tg.calls("sendMessage")
    ours = bot_message(GROUP, "I am another bot", 9)
    await in_group(bot, "and 3+3?", reply_to_message=ours)
    assert len(sent_to_group(bot)) == 1  # a reply to this bot is a question


async def test_a_slash_that_is_no_command_is_a_question(bot: Harness) -> None:
    await bot.send("/etc/hosts — what is this?")
    assert "I do not know that command" not in bot.last().text
    await bot.send("/nosuchcommand")
    assert "I do not know that command" in bot.last().text


# --------------------------------------------------------------------- admin switch


def member(status: str, user: int) -> dict[str, Any]:
    person = {"id": user, "is_bot": False, "first_name": "X"}
    if status == "creator":
        return {"status": "creator", "user": person, "is_anonymous": False}
    return {"status": "member", "user": person}


async def test_group_admins_turn_the_bot_off_and_on(bot: Harness) -> None:
    bot.tg.reply("getChatMember", member("member", BOB))
    await in_group(bot, "/bot off", user=BOB)
    assert bot.last().text == "Only the group's admins can turn me on or off."
    bot.tg.reply("getChatMember", member("creator", ALICE))
    await in_group(bot, "/bot off")
    assert bot.last().text.startswith("I am off in this group")
    bot.tg.clear()
    await in_group(bot, "/ask what is 2+2?")
    await in_group(bot, "@cocoon_bot hi", entities=mention(""))
    assert not bot.tg.calls("sendMessage")  # off: silent
    bot.tg.reply("getChatMember", member("creator", ALICE))
    await in_group(bot, "/bot on")
    await in_group(bot, "/ask what is 2+2?")
    assert "balance" in bot.last().text.lower()


async def _user(bot: Harness, telegram_id: int = ALICE) -> Any:
    from backend.users import get_or_create_user

    return await get_or_create_user(bot.db, telegram_id)


async def test_an_unknown_or_stale_button_is_answered(bot: Harness) -> None:
    for data in ("nosuch", "model:ffffffffffffffff", "x" * 64, "lang:xx"):
        bot.tg.clear()
        await bot.press(data)
        (answer,) = bot.tg.calls("answerCallbackQuery")  # never a spinner left turning
        assert answer.text


async def test_a_photo_whose_caption_mentions_the_bot_is_a_question_in_its_topic(
    bot: Harness,
) -> None:
    """A photo captioned with a mention of the bot: for a model without vision, the caption
    alone is asked, told as a reply to the asker in the asker's topic; a photo that does not
    mention the bot gets nothing."""
    sizes = [{"file_id": "gp", "file_unique_id": "ugp", "width": 9, "height": 9, "file_size": 9}]
    await in_group(bot, None, photo=sizes, caption="just a cat", **in_topic())
    assert not sent_to_group(bot)
    asked = await in_group(
        bot,
        None,
        photo=sizes,
        caption="@cocoon_bot what is it?",
        caption_entities=mention(""),
        **in_topic(),
    )
    told, refused = sent_to_group(bot)  # the note, then the turn (no balance yet)
    assert told.text == "smollm2-135m does not see images, so I answer your caption alone."
    assert told.message_thread_id == TOPIC and refused.message_thread_id == TOPIC
    assert told.reply_parameters.message_id == asked["message_id"]
    assert "balance" in refused.text.lower()
