"""An amount typed to the bot (/withdraw, /topup) is read with the one grammar,
backend.money.parse_amount, in the user's language: "1,000" from an English user is refused
in their words, never taken as 1 GRAM; "1,5" from a Russian user is one and a half."""

from __future__ import annotations

from sqlalchemy import select

from backend import accounts
from backend.models import Payout
from tests.support.bot import TON, Harness, record_turn
from tests.support.turns import add_wallet

PROVIDER = 520
PAYER = 521


async def _provider_with_earnings(bot: Harness, language: str) -> int:
    await bot.send("/provider", user=PROVIDER, language=language)
    provider = await bot.user(PROVIDER)
    await add_wallet(bot.db, provider.id, "payout", "0:" + "cd" * 32, "00")
    await bot.send("/start", user=PAYER)
    payer = await bot.user(PAYER)
    await bot.ledger.credit_deposit(payer.id, 5000 * TON, "dep:amounts")
    await record_turn(bot.ledger, payer.id, 2500 * TON, provider_id=provider.id)  # earns 2000
    return provider.id


async def test_withdraw_refuses_a_thousands_comma_in_english(bot: Harness) -> None:
    provider_id = await _provider_with_earnings(bot, "en")
    bot.tg.clear()
    await bot.send("/withdraw 1,000", user=PROVIDER, language="en")
    refusal = bot.last()
    assert "Write decimals with a point" in refusal.text and "1,000" in refusal.text
    assert refusal.reply_markup is None  # nothing to confirm: not "Withdraw 1 GRAM"
    assert "Withdraw 1 GRAM" not in bot.tg.all_text()
    await bot.send("/withdraw 1000", user=PROVIDER, language="en")
    assert "Withdraw 1000 GRAM to" in bot.last().text
    assert (await accounts.earnings(bot.ledger, provider_id)).available == 2000 * TON


async def test_withdraw_takes_a_decimal_comma_where_the_language_writes_one(bot: Harness) -> None:
    provider_id = await _provider_with_earnings(bot, "ru")
    await bot.send("/withdraw 1,5", user=PROVIDER, language="ru")
    offer = bot.last()
    assert "1.5 GRAM" in offer.text
    confirm, _cancel = offer.reply_markup.inline_keyboard[0]
    assert confirm.callback_data.startswith(f"wd:{1_500_000_000}:")
    await bot.press(confirm.callback_data, user=PROVIDER, language="ru")
    async with bot.db.session() as session:
        payout = await session.scalar(select(Payout).where(Payout.provider_id == provider_id))
    assert payout is not None and payout.amount == 1_500_000_000


async def test_topup_refuses_a_thousands_comma_in_the_users_words(bot: Harness) -> None:
    await bot.send("/topup 1,000", language="en")
    assert "Write decimals with a point" in bot.last().text
    assert "Amount:" not in bot.tg.all_text()
    await bot.send("/topup 1,5", language="fr")
    assert "Montant : 1.5 GRAM" in bot.last().text  # a comma is decimal in French
    await bot.send("/topup 0.0000000001", language="ru")
    assert "Не больше 9 знаков после точки" in bot.last().text
