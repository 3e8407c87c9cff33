"""The bot as its tests run it: ``running_bot`` with Telegram faked at the session layer
(tests/support/bot_fakes.py), pytonconnect's real connector (the TON Connect tests give it a
loopback bridge: tests/support/tonconnect_bridge.py), the real database and Redis; and a turn
recorded in the ledger as a served one would be."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import SecretStr

from backend.db import Database
from backend.dispatch import TurnRequest
from backend.ledger import Ledger, TurnUsage
from backend.models import User
from backend.settings import Settings
from backend.stack import DEV_DEPOSIT_ADDRESS
from backend.users import get_user
from bot.app import BotApp, running_bot
from bot.tonconnect import ConnectorFactory
from tests.support.bot_fakes import TOKEN, FakeTelegram, callback_update, feed, message_update

TON = 1_000_000_000
ADMIN = 900
ALICE = 501


@dataclass
class Harness:
    app: BotApp
    tg: FakeTelegram
    settings: Settings

    @property
    def db(self) -> Database:
        return self.app.services.db

    @property
    def ledger(self) -> Ledger:
        return self.app.services.ledger

    async def send(self, text: str | None, user: int = ALICE, **kw: Any) -> Any:
        return await feed(self.app.dp, self.app.bot, message_update(user, text, **kw))

    async def press(self, data: str, user: int = ALICE, **kw: Any) -> Any:
        return await feed(self.app.dp, self.app.bot, callback_update(user, data, **kw))

    def last(self, method: str = "sendMessage") -> Any:
        calls = self.tg.calls(method)
        assert calls, f"no {method} was sent; sent: {[r.__api_method__ for r in self.tg.requests]}"
        return calls[-1]

    async def user(self, telegram_id: int = ALICE) -> User:
        found = await get_user(self.db, telegram_id)
        assert found is not None
        return found


def bot_settings(settings: Settings, **values: Any) -> Settings:
    ton = settings.ton.model_copy(update={"deposit_address": DEV_DEPOSIT_ADDRESS})
    update: dict[str, Any] = {
        "bot_token": SecretStr(TOKEN),
        "admin_ids": [ADMIN],
        "public_url": "https://cocoon.example",
        "ton": ton,
        # No wallets list from the internet: pytonconnect's built-in one, at once.
        "tonconnect_wallets_url": "http://127.0.0.1:9/wallets-v2.json",
        **values,
    }
    return settings.model_copy(update=update)


@contextlib.asynccontextmanager
async def running_harness(
    s: Settings, tonconnect: ConnectorFactory | None = None
) -> AsyncIterator[Harness]:
    """The bot with settings ``s`` over a fresh database, Telegram faked, the outbox not polled
    (and TON Connect's connectors made by ``tonconnect`` when given)."""
    db = Database.from_settings(s)
    await db.upgrade()
    tg = FakeTelegram()
    try:
        async with running_bot(
            s, session=tg, db=db, outbox_interval_s=None, tonconnect=tonconnect
        ) as app:
            yield Harness(app, tg, s)
    finally:
        await db.close()


@pytest.fixture
async def bot(settings: Settings, redis_url: str) -> AsyncIterator[Harness]:
    async with running_harness(bot_settings(settings)) as harness:
        yield harness


def spy_on_turns(h: Harness, monkeypatch: pytest.MonkeyPatch) -> list[TurnRequest]:
    """Each turn the bot asks the backend for, in order (the real dispatcher still runs it)."""
    seen: list[TurnRequest] = []
    turns = h.app.services.turns
    real = turns.start_turn

    async def spy(request: TurnRequest, *args: Any, **kw: Any) -> Any:
        seen.append(request)
        return await real(request, *args, **kw)

    monkeypatch.setattr(turns, "start_turn", spy)
    return seen


async def record_turn(
    ledger: Ledger, user_id: int, cost: int, provider_id: int | None = None
) -> None:
    """A served turn of ``cost``, settled with the provider's 80 % share."""
    key = f"turn-{time.monotonic_ns()}"
    await ledger.hold(user_id, cost, key)
    await ledger.settle(
        key,
        cost,
        provider_id=provider_id,
        share_bps=8000,
        usage=TurnUsage(
            model="smollm2-135m",
            prompt_tokens=11,
            cached_prompt_tokens=0,
            completion_tokens=22,
            finish_reason="stop",
            worker_id="w-1",
            tee="dev",
        ),
    )
