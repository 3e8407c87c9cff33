"""The bot's commands, payments, notifications and Telegram errors, with Telegram faked at the
session layer only (tests/support/bot.py) and the real database and Redis behind the bot.
Chat turns with a real worker are in test_bot_chat.py; the provider's path in
test_bot_provider.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import select

from backend import accounts
from backend.apikeys import list_keys
from backend.attestation import store
from backend.db import Database
from backend.dispatch import WorkerProof
from backend.models import Hold, HoldState, TonWallet, TurnRecord
from backend.notifications import NOTIFY_DEPOSIT, NOTIFY_PAYOUT_CONFIRMED, notify
from backend.settings import Settings
from bot.app import running_bot
from bot.context import Conversation, LastTurn
from tests.support.bot import (
    ADMIN,
    ALICE,
    TON,
    Harness,
    bot_settings,
    record_turn,
    running_harness,
)
from tests.support.bot_fakes import (
    FakeTelegram,
    feed,
    message_update,
    payment_update,
    pre_checkout_update,
)
from workers import registry

# ------------------------------------------------------------------ start, help, language


async def test_start_greets_in_the_telegram_language_and_keeps_the_referral(bot: Harness) -> None:
    await bot.send("/start ref-tonfans", language="fr")
    text = bot.last().text
    assert "Cocoon" in text and "Bonjour" in text
    user = await bot.user()
    assert user.referrer == "ref-tonfans"
    await bot.send("/start other")  # a later deep link does not replace the first
    assert (await bot.user()).referrer == "ref-tonfans"


async def test_help_lists_commands_and_admin_commands_only_for_admins(bot: Harness) -> None:
    await bot.send("/help")
    text = bot.last().text
    assert "/model" in text and "/withdraw" in text and "/stats" not in text
    await bot.send("/help", user=ADMIN)
    assert "/stats" in bot.last().text


async def test_lang_switches_the_language_of_every_later_reply(bot: Harness) -> None:
    await bot.send("/lang")
    keyboard = bot.last().reply_markup.inline_keyboard
    assert [row[0].callback_data for row in keyboard] == ["lang:en", "lang:ru", "lang:fr"]
    assert keyboard[0][0].text.startswith("✓")
    await bot.press("lang:ru")
    assert "Русский" in bot.last("editMessageText").text
    await bot.send("/balance")
    assert "Баланс" in bot.last().text
    await bot.press("lang:xx")
    assert bot.last("answerCallbackQuery").show_alert


# ----------------------------------------------------------------------- model, balance


async def online_worker(bot: Harness, worker_id: str, model: str) -> None:
    """A worker of ``model`` in the registry (what a node's heartbeat keeps there)."""
    from workers import registry

    info = registry.WorkerInfo(
        worker_id=worker_id, model=model, engine="instant", engine_version="1",
        box_public_key="A" * 44, verify_key="A" * 44, capacity=4,
    )  # fmt: skip
    await registry.register(bot.app.services.redis, info, ttl_s=30)


async def test_model_keyboard_shows_prices_and_marks_the_current_model(bot: Harness) -> None:
    models = dict(bot.settings.models)
    models["big-model"] = models["smollm2-135m"].model_copy(
        update={"prompt": 1_500_000_000, "completion": 3 * TON}
    )
    models["offline-model"] = models["smollm2-135m"]
    bot.settings.models = models  # the same object the dispatcher holds
    await bot.send("/model")
    assert "No model has a worker online" in bot.last().text
    await online_worker(bot, "w-small", "smollm2-135m")
    await online_worker(bot, "w-big", "big-model")
    await bot.send("/model")
    rows = bot.last().reply_markup.inline_keyboard
    labels = [row[0].text for row in rows]
    assert len(labels) == 2  # the model with no worker is not offered
    assert labels[0].startswith("✓ smollm2-135m") and "0.02 GRAM" in labels[0]
    assert "development TEE" in labels[0]
    assert "1.5 GRAM" in labels[1] and "3 GRAM" in labels[1] and not labels[1].startswith("✓")
    await bot.press(rows[1][0].callback_data)
    assert (await bot.user()).model == "big-model"
    rows = bot.last("editMessageReplyMarkup").reply_markup.inline_keyboard
    assert rows[1][0].text.startswith("✓ big-model")
    await bot.press("model:unknown")
    assert bot.last("answerCallbackQuery").show_alert


async def test_start_says_what_the_operator_sees_on_the_bot_path(bot: Harness) -> None:
    await bot.send("/start")
    text = bot.last().text
    assert "in plaintext" in text and "Sealed in this page" in text  # and where to go instead
    assert "not the operator" not in text


async def test_balance_shows_exact_ton(bot: Harness) -> None:
    await bot.send("/start")
    user = await bot.user()
    await bot.ledger.credit_deposit(user.id, 1_234_500_000, "dep:1")
    await bot.send("/balance")
    assert "1.2345 GRAM" in bot.last().text


# ---------------------------------------------------------------------------- usage


async def test_usage_lists_recent_turns_and_totals(bot: Harness) -> None:
    await bot.send("/usage")
    assert "No messages yet" in bot.last().text
    user = await bot.user()
    await bot.ledger.credit_deposit(user.id, TON, "dep:usage")
    await record_turn(bot.ledger, user.id, 3_000)
    await record_turn(bot.ledger, user.id, 4_000)
    await bot.send("/usage")
    text = bot.last().text
    assert text.count("smollm2-135m · 11 + 22") == 2
    assert "0.000003 GRAM" in text and "2" in text and "0.000007 GRAM" in text


@pytest.mark.parametrize(
    ("language", "expected"),
    [
        ("en", ["1 answer,", "2 answers,", "5 answers,"]),
        ("ru", ["1 ответ,", "2 ответа,", "5 ответов,"]),
        ("fr", ["1 réponse,", "2 réponses,", "5 réponses,"]),
    ],
)
async def test_counts_take_the_plural_their_language_wants(
    bot: Harness, language: str, expected: list[str]
) -> None:
    await bot.send("/start", language=language)
    user = await bot.user()
    await bot.ledger.credit_deposit(user.id, TON, "dep:plurals")
    made = 0
    for total, words in zip((1, 2, 5), expected, strict=True):
        while made < total:
            await record_turn(bot.ledger, user.id, 1_000)
            made += 1
        await bot.send("/usage", language=language)
        assert words in bot.last().text


async def test_the_language_follows_telegram_until_one_is_chosen(bot: Harness) -> None:
    await bot.send("/balance", language="en")
    assert bot.last().text.startswith("Balance")
    await bot.send("/balance", language="ru")  # the Telegram app switched to Russian
    assert bot.last().text.startswith("Баланс")
    assert (await bot.user()).language_code == "ru"  # notifications speak it too
    await bot.press("lang:fr", language="ru")
    await bot.send("/balance", language="ru")  # chosen: Telegram's language no longer leads
    assert bot.last().text.startswith("Solde")
    await bot.send("/forget")
    await bot.press("forget:yes")
    await bot.send("/balance", language="en")  # forgotten: it follows Telegram again
    assert bot.last().text.startswith("Balance")


async def test_forget_leaves_a_providers_statistics_as_they_were(bot: Harness) -> None:
    provider_tg = 777
    await bot.send("/provider", user=provider_tg)
    provider = await bot.user(provider_tg)
    await bot.send("/start")
    alice = await bot.user()
    await bot.ledger.credit_deposit(alice.id, TON, "dep:forget")
    await record_turn(bot.ledger, alice.id, 5_000, provider_id=provider.id)
    await bot.send("/earnings", user=provider_tg)
    before = bot.last().text
    assert "from 1 job" in before
    await bot.send("/forget")
    await bot.press("forget:yes")
    await bot.send("/usage")
    assert "No messages yet" in bot.last().text  # nothing of hers is linked to her any more
    await bot.send("/earnings", user=provider_tg)
    assert bot.last().text == before


# --------------------------------------------------------------------------- privacy


async def test_privacy_reports_the_last_replys_worker_plainly_dev(bot: Harness) -> None:
    await bot.send("/privacy")
    assert "No answer" in bot.last().text
    contexts = bot.app.services.contexts
    await contexts.save(
        ALICE,
        Conversation(
            messages=[{"role": "user", "content": "hi"}],
            last=LastTurn(
                "t1",
                "smollm2-135m",
                WorkerProof("w-abc", "dev", "llama-cpp", "0.3", "ab12cd", receipt_id="t1"),
            ),
        ),
    )
    record = registry.AttestationRecord(
        worker_id="w-abc",
        tee="dev",
        box_public_key="x",
        verify_key="y",
        model="smollm2-135m",
        attested_at=time.time(),
        expires_at=time.time() + 3600,
        image="cocoon-worker 1.2.0",
        measurements={"mrtd": "f" * 96},
        engine="llama-cpp",
        engine_version="0.3",
    )
    await registry.write_attestation(bot.app.services.redis, record)
    await bot.send("/privacy")
    text = bot.last().text
    assert "development TEE" in text and "NOT hardware-attested" in text
    assert "cocoon-worker 1.2.0" in text and "f" * 16 + "…" in text and "f" * 17 not in text
    assert "ab12cd" in text and "llama-cpp 0.3" in text
    assert "Receipt t1: signed by the worker's attested key, verified" in text
    assert "in plaintext" in text and "Sealed in this page" in text  # the bot path, honestly
    # No receipt verified for the answer: nothing says "verified".
    unverified = LastTurn(
        "t2", "smollm2-135m", WorkerProof("w-abc", "dev", "llama-cpp", "0.3", "x")
    )
    await contexts.save(
        ALICE, Conversation(messages=[{"role": "user", "content": "hi"}], last=unverified)
    )
    await bot.send("/privacy")
    text = bot.last().text
    assert "Receipt: none was verified" in text and "verified" not in text.replace(
        "none was verified", ""
    )


# ---------------------------------------------------------------------------- forget


async def test_forget_asks_then_deletes_personal_data_but_not_the_balance(bot: Harness) -> None:
    await bot.send("/start")
    await bot.send("/apikey new laptop")
    user = await bot.user()
    await bot.ledger.credit_deposit(user.id, TON, "dep:forget")
    await bot.app.services.contexts.save(
        ALICE, Conversation(messages=[{"role": "user", "content": "x"}])
    )
    await bot.send("/forget")
    buttons = [b.callback_data for b in bot.last().reply_markup.inline_keyboard[0]]
    assert buttons == ["forget:yes", "forget:no"]
    await bot.press("forget:no")
    assert len(await list_keys(bot.db, user.id)) == 1
    await bot.press("forget:yes")
    assert await list_keys(bot.db, user.id) == []
    assert (await bot.app.services.contexts.load(ALICE)).messages == []
    assert (await bot.ledger.balances(user.id)).available == TON
    assert "deleted" in bot.last("editMessageText").text


# ---------------------------------------------------------------------------- API keys


async def test_apikey_create_list_revoke(bot: Harness) -> None:
    from backend.apikeys import user_for_key

    await bot.send("/apikey")
    assert "no API keys" in bot.last().text
    await bot.send("/apikey new laptop")
    reply = bot.last()
    key = reply.text.split("<code>")[1].split("</code>")[0]
    user = await bot.user()
    assert await user_for_key(bot.db, key) == user.id
    assert "https://cocoon.example/v1" in reply.text
    await bot.send("/apikey")
    rows = bot.last().reply_markup.inline_keyboard
    revoke = rows[1][0].callback_data
    assert revoke.startswith("apikey:revoke:") and "laptop" in bot.last().text
    await bot.press(revoke)
    assert await user_for_key(bot.db, key) is None
    await bot.press(revoke)
    assert "already" in bot.last("answerCallbackQuery").text
    await bot.press("apikey:new")
    assert "<code>cc-" in bot.last().text


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
    async with bot.db.session() as session, session.begin():
        session.add(
            TonWallet(
                user_id=provider.id, purpose="payout", address="0:" + "ab" * 32, public_key="00"
            )
        )
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


# ------------------------------------------------------------------------------- admin


async def test_admin_commands_only_for_admins(bot: Harness) -> None:
    await bot.send("/stats")
    assert "do not know that command" in bot.last().text
    await bot.send("/stats", user=ADMIN)
    text = bot.last().text
    assert "Users: 2" in text and "Workers online: 0" in text
    await bot.send("/prices", user=ADMIN)
    assert "smollm2-135m: 0.02 GRAM / 0.08 GRAM, context 2048 tokens" in bot.last().text


# ---------------------------------------------------------------------- abuse and limits


async def test_too_long_prompt_and_rate_limit_get_clear_messages(
    settings: Settings, redis_url: str
) -> None:
    s = bot_settings(settings, max_prompt_chars=20, rate_limit_per_minute=2)
    db = Database.from_settings(s)
    await db.upgrade()
    tg = FakeTelegram()
    try:
        async with running_bot(s, session=tg, db=db, outbox_interval_s=None) as app:
            harness = Harness(app, tg, s)
            await harness.send("x" * 21)
            assert "too long: 21 characters, and the limit is 20" in harness.last().text
            for _ in range(2):
                await harness.send("hello")
                assert "Not enough balance" in harness.last().text
            await harness.send("hello")
            assert "Too many messages: up to 2 a minute" in harness.last().text
    finally:
        await db.close()


async def test_insufficient_balance_says_how_much_and_holds_nothing(bot: Harness) -> None:
    await bot.send("What is TON?")
    text = bot.last().text
    assert "Not enough balance" in text and "you have 0 GRAM" in text and "/topup" in text
    async with bot.db.session() as session:
        assert not list(await session.scalars(select(Hold).where(Hold.state == HoldState.OPEN)))


async def test_non_text_messages_get_a_hint(bot: Harness) -> None:
    await feed(
        bot.app.dp,
        bot.app.bot,
        message_update(ALICE, None, location={"latitude": 1.0, "longitude": 2.0}),
    )
    assert "text only" in bot.last().text


# --------------------------------------------------------------------- Telegram errors


async def test_flood_wait_is_honoured_then_the_message_goes_out(bot: Harness) -> None:
    bot.tg.fail("sendMessage", 429, "Too Many Requests: retry after 1", retry_after=1)
    started = time.monotonic()
    await bot.send("/help")
    assert time.monotonic() - started >= 1
    assert len(bot.tg.calls("sendMessage")) == 2  # refused once, then sent
    assert "/model" in bot.last().text


async def test_blocked_and_not_modified_are_quiet(bot: Harness, caplog) -> None:
    bot.tg.fail("sendMessage", 403, "Forbidden: bot was blocked by the user")
    await bot.send("/help")  # no exception escapes the dispatcher
    bot.tg.fail("editMessageText", 400, "Bad Request: message is not modified")
    await bot.press("lang:en")
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_an_unexpected_error_is_logged_without_the_message_text(
    bot: Harness, caplog, monkeypatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(accounts, "usage", broken)
    await bot.send("/usage")
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert errors and "RuntimeError" in errors[0].getMessage()


async def test_usage_of_another_user_is_never_shown(bot: Harness) -> None:
    await bot.send("/start", user=504)
    other = await bot.user(504)
    await bot.ledger.credit_deposit(other.id, TON, "dep:other")
    await record_turn(bot.ledger, other.id, 5_000)
    await bot.send("/usage")
    assert "No messages yet" in bot.last().text
    async with bot.db.session() as session:
        assert len(list(await session.scalars(select(TurnRecord)))) == 1


async def test_without_a_public_url_the_bot_prints_the_port_really_served(
    settings: Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cocoon up --port 18732`` on all addresses: /apikey and /addworker name that port."""
    from backend import stack

    seen: list[Settings] = []

    class Recorded:
        def __init__(self, s: Settings, shutdown: object) -> None:
            seen.append(s)

        def serve(self, host: str, port: int) -> None:
            pass

    def run_command(run: Any, grace: float, announce: Any = None) -> int:
        run(None)
        return 0

    monkeypatch.setattr(stack, "LocalStack", Recorded)
    monkeypatch.setattr(stack, "run_command", run_command)
    s = bot_settings(settings, public_url=None, web_host="0.0.0.0")
    assert await asyncio.to_thread(stack.run_stack, s, port=18732) == 0
    async with running_harness(seen[0]) as harness:
        await harness.send("/apikey create")
        assert "http://127.0.0.1:18732/v1" in harness.last().text
        await harness.send("/provider")
        await harness.send("/addworker")
        assert "--register-url http://127.0.0.1:18732 --token" in harness.last().text
        assert "8080" not in harness.tg.all_text()


# ---------------------------------------------------------------------------- webhook


async def test_webhook_mode_mounts_in_the_web_app_and_checks_the_secret(
    settings: Settings, redis_url: str
) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from backend.web import create_app
    from bot.webhook import WEBHOOK_PATH
    from tests.support.bot_fakes import stopped_update

    s = bot_settings(
        settings, bot_mode="webhook", public_url=None, webhook_secret=SecretStr("s3cret-token")
    )
    db = Database.from_settings(s)
    await db.upgrade()
    await db.close()
    client = TestClient(TestServer(create_app(s)))
    await client.start_server()
    try:
        update = stopped_update(ALICE, 5)  # nothing runs: the bot answers nothing
        for headers in ({}, {"X-Telegram-Bot-Api-Secret-Token": "wrong"}):
            response = await client.post(WEBHOOK_PATH, json=update, headers=headers)
            assert response.status == 401
        response = await client.post(
            WEBHOOK_PATH, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": "s3cret-token"}
        )
        assert response.status == 200
    finally:
        await client.close()
    polling = create_app(bot_settings(settings))  # polling mode: no webhook route
    assert not [r for r in polling.router.routes() if r.resource.canonical == WEBHOOK_PATH]


# ------------------------------------------------------------------ menu and command line


async def test_the_command_menu_is_set_in_every_language(bot: Harness) -> None:
    from bot.commands import set_commands

    await set_commands(bot.app.bot)
    calls = {c.language_code: c for c in bot.tg.calls("setMyCommands")}
    assert set(calls) == {None, "en", "ru", "fr"}
    names = [c.command for c in calls["ru"].commands]
    assert names[:3] == ["start", "help", "new"] and "withdraw" in names and "stats" not in names
    ru = {c.command: c.description for c in calls["ru"].commands}
    assert ru["balance"] == "ваш баланс"
    assert {c.command: c.description for c in calls["fr"].commands}["balance"] == "votre solde"
    from bot.commands import set_menu_button

    await set_menu_button(bot.app.bot, "https://cocoon.example/app")
    button = bot.last("setChatMenuButton").menu_button
    assert button.web_app.url == "https://cocoon.example/app" and button.text == "Wallet"


def test_cocoon_bot_needs_a_token(tmp_path, monkeypatch, capsys) -> None:
    from backend.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COCOON_BOT_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["bot"])
    assert exited.value.code == 1 and "COCOON_BOT_TOKEN" in capsys.readouterr().err
