"""The bot's money: top-ups (Mini App, memo, USDT, Stars credited once), the notification outbox,
the provider's commands and withdrawals; Telegram faked at the session layer only
(tests/support/bot.py), the real database and Redis behind the bot."""

from __future__ import annotations

from sqlalchemy import select

from backend import accounts
from backend.attestation import store
from backend.notifications import NOTIFY_DEPOSIT, NOTIFY_PAYOUT_CONFIRMED, notify
from tests.support.bot import (
    ALICE,
    TON,
    Harness,
    record_turn,
)
from tests.support.bot_fakes import (
    feed,
    message_update,
    payment_update,
    pre_checkout_update,
)
from tests.support.turns import add_wallet

# ------------------------------------------------------------------------ top-up, Stars


async def test_topup_offers_the_mini_app_the_memo_and_stars(bot: Harness) -> None:
    await bot.send("/topup")
    reply = bot.last()
    user = await bot.user()
    assert user.deposit_memo in reply.text
    rows = reply.reply_markup.inline_keyboard
    assert rows[0][0].web_app.url == "https://cocoon.example/app"
    assert rows[-1][0].callback_data == "topup:stars"
    await bot.press("topup:stars")
    options = [row[0].callback_data for row in bot.last().reply_markup.inline_keyboard]
    assert "stars:100" in options
    await bot.press("stars:100")
    invoice = bot.last("sendInvoice")
    assert invoice.currency == "XTR" and invoice.prices[0].amount == 100
    assert invoice.provider_token is None
    rate = bot.settings.stars_nano_per_star
    assert invoice.payload == f"stars:{user.id}:100:{rate}"  # the rate the invoice shows
    await bot.press("stars:999999")
    assert bot.last("answerCallbackQuery").show_alert


async def test_topup_offers_usdt_at_its_rate_only_when_the_operator_takes_it(
    bot: Harness,
) -> None:
    await bot.send("/topup")
    assert "USDT" not in bot.last().text
    bot.settings.ton = bot.settings.ton.model_copy(
        update={"usdt_master": "0:" + "7E" * 32, "usdt_nano_per_micro": 400}
    )
    await bot.send("/topup")
    text = bot.last().text
    user = await bot.user()
    assert "Or send USDT (on TON) to the same address" in text and user.deposit_memo in text
    assert "1 USDT = 0.4 GRAM" in text


async def test_stars_are_credited_only_at_the_rate_the_bot_issues(bot: Harness) -> None:
    await bot.send("/start")
    user = await bot.user()
    rate = bot.settings.stars_nano_per_star
    inflated = f"stars:{user.id}:100:{rate * 10}"
    await feed(bot.app.dp, bot.app.bot, pre_checkout_update(ALICE, inflated, 100))
    assert bot.last("answerPreCheckoutQuery").ok is False  # not a rate the bot issues
    await feed(
        bot.app.dp, bot.app.bot, pre_checkout_update(ALICE, f"stars:{user.id}:100:{rate}", 100)
    )
    assert bot.last("answerPreCheckoutQuery").ok is True
    # Paid anyway (a rate changed between the two): credited at the rate the bot issues.
    await feed(bot.app.dp, bot.app.bot, payment_update(ALICE, inflated, 100, "charge-x"))
    assert (await bot.ledger.balances(user.id)).available == 100 * rate


async def test_stars_payment_is_credited_once_when_delivered_twice(bot: Harness) -> None:
    await bot.send("/start")
    user = await bot.user()
    payload = f"stars:{user.id}:100"
    await feed(bot.app.dp, bot.app.bot, pre_checkout_update(ALICE, payload, 100))
    assert bot.last("answerPreCheckoutQuery").ok is True
    await feed(bot.app.dp, bot.app.bot, pre_checkout_update(ALICE, payload, 99))  # tampered
    assert bot.last("answerPreCheckoutQuery").ok is False
    await feed(bot.app.dp, bot.app.bot, pre_checkout_update(ALICE, f"stars:{user.id + 1}:5", 5))
    assert bot.last("answerPreCheckoutQuery").ok is False
    bot.tg.clear()
    for _ in range(2):
        await feed(bot.app.dp, bot.app.bot, payment_update(ALICE, payload, 100, "charge-1"))
    credited = 100 * bot.settings.stars_nano_per_star
    assert (await bot.ledger.balances(user.id)).available == credited
    thanks = [t for t in bot.tg.texts() if "Stars" in t]
    assert len(thanks) == 1 and "0.4 GRAM" in thanks[0]
    assert await bot.app.outbox.drain_once() == 0  # told already, never twice

    # The operator changes the rate after an invoice went out: it is paid at its own rate.
    old_rate = bot.settings.stars_nano_per_star
    bot.settings.stars_nano_per_star = 3 * old_rate
    await feed(
        bot.app.dp, bot.app.bot, payment_update(ALICE, f"stars:{user.id}:10:{old_rate}", 10, "c-2")
    )
    assert (await bot.ledger.balances(user.id)).available == credited + 10 * old_rate


# ------------------------------------------------------------------------- notifications


async def test_outbox_tells_deposits_in_the_users_language_and_skips_blocked_users(
    bot: Harness,
) -> None:
    await bot.send("/start", language="ru")
    await bot.send("/start", user=502)
    alice, bob = await bot.user(), await bot.user(502)
    await bot.ledger.credit_deposit(alice.id, 2 * TON, "dep:a")
    await notify(bot.db, alice.id, NOTIFY_DEPOSIT, "dep:a", amount=2 * TON)
    await notify(bot.db, bob.id, NOTIFY_DEPOSIT, "dep:b", amount=TON)
    bot.tg.clear()
    # Alice's arrives (in Russian); Bob blocked the bot: skipped quietly, never retried.
    bot.tg.reply("sendMessage", message_update(ALICE, "sent")["message"])
    bot.tg.fail("sendMessage", 403, "Forbidden: bot was blocked by the user")
    assert await bot.app.outbox.drain_once() == 1
    to_alice, to_bob = bot.tg.calls("sendMessage")
    assert to_alice.chat_id == ALICE and to_bob.chat_id == 502
    assert "2 GRAM" in to_alice.text and "пришёл" in to_alice.text
    assert await bot.app.outbox.drain_once() == 0
    # Telegram down: the notification waits for the next round instead of being lost.
    await notify(bot.db, alice.id, NOTIFY_DEPOSIT, "dep:c", amount=TON)
    bot.tg.fail("sendMessage", 502, "Bad Gateway")
    assert await bot.app.outbox.drain_once() == 0
    assert await bot.app.outbox.drain_once() == 1


# ---------------------------------------------------------------------------- provider


async def test_provider_commands_without_a_worker(bot: Harness) -> None:
    await bot.send("/addworker")
    assert "/provider" in bot.last().text
    await bot.send("/provider")
    assert (await bot.user()).is_provider
    assert "No payout wallet" in bot.last().text
    assert bot.last().reply_markup.inline_keyboard[0][0].web_app.url.endswith("/app/provider")
    await bot.send("/addworker nosuchmodel")
    assert "Unknown model" in bot.last().text
    await bot.send("/addworker")
    text = bot.last().text
    assert "cocoon worker --model smollm2-135m --engine vllm" in text
    assert "--register-url https://cocoon.example --token cct_" in text
    token = "cct_" + text.split("--token cct_")[1].split("<")[0].strip()
    grant = await store.lookup_token(bot.app.services.redis, token)
    assert grant is not None and grant.provider_id == (await bot.user()).id
    await bot.send("/workers")
    assert "No workers" in bot.last().text
    await bot.send("/earnings")
    assert "0 GRAM" in bot.last().text


async def test_withdraw_validates_confirms_and_updates_the_status_message(bot: Harness) -> None:
    await bot.send("/provider")
    provider = await bot.user()
    await bot.send("/withdraw all")
    assert "payout wallet" in bot.last().text
    await add_wallet(bot.db, provider.id, "payout", "0:" + "ab" * 32, "00")
    # Earnings: a user's turn served by this provider (80 % of 2.5 GRAM).
    await bot.send("/start", user=503)
    payer = await bot.user(503)
    await bot.ledger.credit_deposit(payer.id, 5 * TON, "dep:payer")
    await record_turn(bot.ledger, payer.id, 2_500_000_000, provider_id=provider.id)
    await bot.send("/withdraw 0.5")
    assert "smallest withdrawal is 1 GRAM" in bot.last().text
    await bot.send("/withdraw 3")
    assert "more than your available earnings (2 GRAM)" in bot.last().text
    await bot.send("/withdraw 1,2.3")
    assert "positive number of GRAM" in bot.last().text
    await bot.send("/withdraw all")
    reply = bot.last()
    assert "Withdraw 2 GRAM to" in reply.text
    confirm, cancel = reply.reply_markup.inline_keyboard[0]
    await bot.press(cancel.callback_data)
    assert (await accounts.earnings(bot.ledger, provider.id)).available == 2 * TON
    await bot.press(confirm.callback_data, message_id=77)
    await bot.press(confirm.callback_data, message_id=77)  # a double tap pays once
    status = bot.last("editMessageText")
    assert "Payout #" in status.text and "requested" in status.text
    e = await accounts.earnings(bot.ledger, provider.id)
    assert e.available == 0 and e.pending == 2 * TON
    # The payout sender confirms it on chain: the status message changes in place.
    async with bot.db.session() as session:
        from backend.models import Payout

        payout = await session.scalar(select(Payout).where(Payout.provider_id == provider.id))
    await bot.ledger.confirm_payout(payout.id)
    await notify(
        bot.db,
        provider.id,
        NOTIFY_PAYOUT_CONFIRMED,
        f"payout:{payout.id}:confirmed",
        amount=payout.amount,
        data={"payout_id": payout.id},
    )
    bot.tg.clear()
    assert await bot.app.outbox.drain_once() == 1
    edit = bot.last("editMessageText")
    assert edit.message_id == 77 and "confirmed on chain" in edit.text
    await bot.send("/earnings")
    assert "Paid out: 2 GRAM" in bot.last().text
