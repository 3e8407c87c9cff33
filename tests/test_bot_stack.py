"""The bot in a forum group, black-box: `cocoon up` as it runs (its own Redis, a worker with the
small model, the web server with the bot in webhook mode), Telegram faked at its HTTP boundary
by the stand-in Bot API that enforces Telegram's rules (tests/support/fake_telegram.py). A
mention in a topic is answered in that topic, as a reply to the asker; money stays out of the
group; nothing the bot sends is what Telegram would refuse."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.env import require_module
from tests.support.fake_telegram import BOT_USER, FakeTelegram
from tests.support.ops import (
    cocoon_up_with_bot,
    deliver_to_webhook,
    start_cocoon_up,
    stop_cocoon_up,
    wait_cocoon_up_ready,
)

require_module("llama_cpp")

pytestmark = [pytest.mark.engine, pytest.mark.slow]

BOT_TOKEN = "4242:group-stack-token"
WEBHOOK_SECRET = "group-stack-secret"
USER = 777_000_222
GROUP = -100_777_000
TOPIC = 7


def group_message(message_id: int, text: str, **extra: Any) -> dict[str, Any]:
    return {
        "update_id": 92_000_000 + message_id,
        "message": {
            "message_id": message_id,
            "date": int(time.time()),
            "chat": {"id": GROUP, "type": "supergroup", "title": "Q", "is_forum": True},
            "from": {"id": USER, "is_bot": False, "first_name": "Ann", "language_code": "en"},
            "message_thread_id": TOPIC,
            "is_topic_message": True,
            "text": text,
            **extra,
        },
    }


async def test_a_mention_in_a_forum_topic_is_answered_there_and_money_stays_private(
    tmp_path: Path,
) -> None:
    telegram = FakeTelegram()
    await telegram.start()
    place = cocoon_up_with_bot(
        tmp_path, telegram.url, token=BOT_TOKEN, secret=WEBHOOK_SECRET, user=USER
    )
    base, data, env = place.base, place.data, place.env
    log = tmp_path / "up.log"
    up = start_cocoon_up(env, tmp_path, log)
    mention = "@" + str(BOT_USER["username"])

    def to_group() -> list[dict[str, Any]]:
        return [
            params
            for method, params in telegram.calls
            if method in {"sendMessage", "editMessageText"}
            and str(params.get("chat_id")) == str(GROUP)
        ]

    async def until(done: Any, what: str) -> None:
        deadline = time.monotonic() + 180
        while not done():
            assert time.monotonic() < deadline, (what, telegram.calls[-5:], log.read_text()[-3000:])
            assert up.poll() is None, log.read_text()
            await asyncio.sleep(0.3)

    try:
        await wait_cocoon_up_ready(up, log, base, str(data / "local-api-key"))
        async with aiohttp.ClientSession() as http:

            async def deliver(update: dict[str, Any]) -> None:
                await deliver_to_webhook(http, base, WEBHOOK_SECRET, telegram, update)

            entity = {"type": "mention", "offset": 0, "length": len(mention)}
            await deliver(group_message(11, f"{mention} what is 2+2?", entities=[entity]))
            await until(
                lambda: any("tokens" in str(p.get("text")) for p in to_group()), "the answer"
            )
            sent = [p for method, p in telegram.calls if method == "sendMessage"]
            assert sent and all(str(p.get("chat_id")) == str(GROUP) for p in sent)
            assert all(str(p.get("message_thread_id")) == str(TOPIC) for p in sent)
            assert all(p["reply_parameters"]["message_id"] == 11 for p in sent)

            before = len(to_group())
            balance = {"type": "bot_command", "offset": 0, "length": len("/balance")}
            await deliver(group_message(12, "/balance", entities=[balance]))
            await until(lambda: len(to_group()) > before, "the answer to /balance")
            told = to_group()[-1]
            assert "private chat" in str(told["text"])
            button = told["reply_markup"]["inline_keyboard"][0][0]
            assert button["url"] == f"https://t.me/{BOT_USER['username']}"
            assert "GRAM" not in str(told["text"])  # no balance in the group
        assert not telegram.refused, telegram.refused
    finally:
        stop_cocoon_up(up)
        await telegram.stop()
