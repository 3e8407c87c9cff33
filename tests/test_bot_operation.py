"""The bot in operation: admin commands, abuse and limits, Telegram's errors, webhook mode, the
command menu and `cocoon bot`'s command line; Telegram faked at the session layer only
(tests/support/bot.py), the real database and Redis behind the bot."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import select

from backend import accounts
from backend.db import Database
from backend.models import Hold, HoldState, TurnRecord
from backend.settings import Settings
from tests.support.bot import (
    ADMIN,
    ALICE,
    TON,
    Harness,
    bot_settings,
    record_turn,
    running_harness,
)
from tests.support.bot_fakes import feed, message_update

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
    async with running_harness(s) as harness:
        await harness.send("x" * 21)
        assert "too long: 21 characters, and the limit is 20" in harness.last().text
        for _ in range(2):
            await harness.send("hello")
            assert "Not enough balance" in harness.last().text
        await harness.send("hello")
        assert "Too many messages: up to 2 a minute" in harness.last().text


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
