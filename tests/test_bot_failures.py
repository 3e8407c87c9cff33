"""An update whose handling fails is never silent: the person hears, in their language, that it
was not done and nothing was charged (Telegram failed here: the stand-in refuses a request)."""

from __future__ import annotations

from tests.support.bot import Harness


async def test_a_failed_update_tells_the_user_in_their_language(bot: Harness) -> None:
    bot.tg.fail("sendMessage", 500, "Internal Server Error")
    await bot.send("/balance", language="ru")  # the reply fails: no exception escapes
    assert bot.tg.texts()[-1].startswith("Извините, у нас что-то пошло не так")
    assert "Ничего не списано" in bot.tg.texts()[-1]


async def test_a_failed_button_press_is_told_after_its_answer(bot: Harness) -> None:
    await bot.send("/lang")
    bot.tg.fail("editMessageText", 500, "Internal Server Error")
    await bot.press("lang:fr")  # answered first, then the edit fails
    assert "Nothing was charged" in bot.tg.texts()[-1]  # in the language it was pressed in
