"""The bot as its tests run it: ``running_bot`` with Telegram faked at the session layer
(tests/support/bot_fakes.py), a TON Connect connector the test connects by hand, the real
database and Redis; and a turn recorded in the ledger as a served one would be."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import SecretStr

from backend.db import Database
from backend.ledger import Ledger, TurnUsage
from backend.models import User
from backend.settings import Settings
from backend.stack import DEV_DEPOSIT_ADDRESS
from backend.users import get_user
from bot.app import BotApp, running_bot
from tests.support.bot_fakes import TOKEN, FakeTelegram, callback_update, feed, message_update

TON = 1_000_000_000
ADMIN = 900
ALICE = 501


class FakeConnector:
    """pytonconnect's TonConnect as the bot uses it, without a bridge: the test connects."""

    def __init__(self, manifest_url: str, storage: object) -> None:
        self.manifest_url = manifest_url
        self.request: Any = None
        self.sent: list[dict[str, Any]] = []
        self.connected: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def connect(self, wallet: dict[str, Any], request: Any = None) -> str:
        # What pytonconnect's bridge provider reads of the wallet (its HTTP bridge, its link):
        # an entry without them fails there, so it fails here (tests/test_bot_tonconnect.py).
        if not str(wallet.get("bridge_url", "")).startswith("https://"):
            raise ValueError(f"no HTTP bridge for {wallet.get('name')}: bridge_url {wallet!r}")
        self.request = request
        return wallet["universal_url"] + "?v=2&id=test"

    def wait_for_connection(self) -> asyncio.Future[Any]:
        return self.connected

    async def send_transaction(self, transaction: dict[str, Any]) -> dict[str, Any]:
        self.sent.append(transaction)
        return {"boc": "te6c"}

    async def disconnect(self) -> None:
        pass


@dataclass
class Harness:
    app: BotApp
    tg: FakeTelegram
    settings: Settings
    connectors: list[FakeConnector] = field(default_factory=list)

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
        **values,
    }
    return settings.model_copy(update=update)


@contextlib.asynccontextmanager
async def running_harness(s: Settings) -> AsyncIterator[Harness]:
    """The bot with settings ``s`` over a fresh database, Telegram faked, the outbox not polled."""
    db = Database.from_settings(s)
    await db.upgrade()
    tg = FakeTelegram()
    connectors: list[FakeConnector] = []

    def factory(url: str, storage: object) -> FakeConnector:
        connectors.append(FakeConnector(url, storage))
        return connectors[-1]

    try:
        async with running_bot(
            s, session=tg, db=db, outbox_interval_s=None, tonconnect=factory
        ) as app:
            yield Harness(app, tg, s, connectors)
    finally:
        await db.close()


@pytest.fixture
async def bot(settings: Settings, redis_url: str) -> AsyncIterator[Harness]:
    async with running_harness(bot_settings(settings)) as harness:
        yield harness


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
