"""The bot's commands (start, help, language, model, balance, usage, privacy, forget, API keys),
with Telegram faked at the session layer only (tests/support/bot.py) and the real database and
Redis behind the bot. Payments and notifications are in test_bot_payments.py; admin commands,
limits, Telegram errors, webhook mode and the command menu in test_bot_operation.py; chat turns
with a real worker in test_bot_chat.py; the provider's path in test_bot_provider.py."""

from __future__ import annotations

import time

import pytest

from backend.apikeys import list_keys
from backend.dispatch import WorkerProof
from bot.context import Conversation, LastTurn
from tests.support.bot import (
    ADMIN,
    ALICE,
    TON,
    Harness,
    record_turn,
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
