"""The Mini App's browser test stack, shared by the browser test modules: ``cocoon web`` on
loopback (real Redis and SQLite), a local TON Center with the deposit watcher, a fake Bot API
for Stars invoices, and one headless Chromium for the module."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from backend import accounts, appkeys
from backend.db import Database
from backend.ledger import Ledger, TurnUsage
from backend.models import WorkerState
from backend.settings import AttestationSettings, Settings, TonSettings
from backend.ton.localnet import LocalTonCenter, LocalTonCenterServer
from backend.ton.toncenter import TonCenter
from backend.ton.watcher import DepositWatcher
from backend.users import get_or_create_user
from backend.web import create_app
from tests.support.env import TEST_REDIS_URL
from tests.support.miniapp_browser import CHROMIUM, CHROMIUM_ARGS, require_browser
from tests.support.miniapp_helpers import BOT_TOKEN, DEPOSIT, TON, FakeBotApi
from tests.support.ops import free_port

VIEWPORT = {"width": 360, "height": 720}  # a small phone: everything must fit


@dataclass
class Stack:
    origin: str
    settings: Settings
    db: Database
    ledger: Ledger
    net: LocalTonCenter
    browser: Any
    app: web.Application


def browser_module() -> tuple[list[pytest.MarkDecorator], Any, Any]:
    """What a Mini App browser test module starts with, as
    ``pytestmark, stack_fixture, context_fixture = browser_module()``: the module skipped
    without Chromium, Playwright or the npm packages (failed in CI: ``require_browser``), its
    tests on the module's event loop and marked ``browser``, the ``stack`` and ``context``
    fixtures."""
    require_browser()
    marks = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.browser]
    return marks, stack_fixture, context_fixture


@pytest_asyncio.fixture(scope="module", loop_scope="module", name="stack")
async def stack_fixture(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    import redis
    from playwright.async_api import async_playwright

    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.flushdb()
    except redis.RedisError as error:
        from tests.support.env import unavailable

        unavailable("Redis", error)
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    net = LocalTonCenter()
    bot_api = TestServer(FakeBotApi().create_app())
    await bot_api.start_server()
    async with LocalTonCenterServer(net) as ton_url:
        settings = Settings(
            _env_file=None,
            data_dir=tmp_path_factory.mktemp("miniapp") / "data",
            redis_url=TEST_REDIS_URL,
            bot_token=SecretStr(BOT_TOKEN),
            telegram_api_url=str(bot_api.make_url("")).rstrip("/"),
            public_url=origin,
            ton=TonSettings(
                api_url=ton_url, deposit_address=DEPOSIT, proof_domains=[f"127.0.0.1:{port}"]
            ),
            # The chat test's node registers directly (a dev worker): dispatched in dev mode.
            attestation=AttestationSettings(allow_dev=True),
        )
        runner = web.AppRunner(create_app(settings), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        app = runner.app
        db, ledger = app[appkeys.DATABASE], app[appkeys.LEDGER]
        await db.upgrade()
        stop = asyncio.Event()
        async with TonCenter(ton_url) as api:
            watcher = DepositWatcher(db, ledger, api, DEPOSIT, poll_interval_s=0.2)
            watching = asyncio.create_task(watcher.run(stop))
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(
                    executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
                )
                try:
                    yield Stack(origin, settings, db, ledger, net, browser, app)
                finally:
                    await browser.close()
                    stop.set()
                    await watching
        await runner.cleanup()
    await bot_api.close()
    client.flushdb()
    client.close()


@pytest_asyncio.fixture(loop_scope="module", name="context")
async def context_fixture(stack: Stack) -> AsyncIterator[Any]:
    context = await stack.browser.new_context(viewport=VIEWPORT, locale="en-US")
    context.set_default_timeout(15_000)
    yield context
    await context.close()


async def seeded_provider(stack: Stack, telegram_id: int, earned: int = 3 * TON) -> int:
    """A provider with a worker that served one turn (a customer paid ``earned`` for it)."""
    user = await get_or_create_user(stack.db, telegram_id, "en")
    if user.is_provider:
        return user.id
    await accounts.become_provider(stack.db, user.id)
    customer = await get_or_create_user(stack.db, telegram_id + 50_000)
    await stack.ledger.credit_deposit(customer.id, 2 * earned, f"dep:{telegram_id}")
    await stack.ledger.hold(customer.id, earned, f"turn-{telegram_id}")
    usage = TurnUsage("smollm2-135m", 12, 0, 30, "stop", worker_id=f"w-{telegram_id}", tee="dev")
    await stack.ledger.settle(
        f"turn-{telegram_id}", earned, provider_id=user.id, share_bps=10_000, usage=usage
    )
    await accounts.record_worker(
        stack.db,
        f"w-{telegram_id}",
        WorkerState.ATTESTED,
        provider_id=user.id,
        model="smollm2-135m",
        tee="dev",
        expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=20),
    )
    return user.id


def no_console_errors(page: Any, *, expected: tuple[str, ...] = ()) -> None:
    """No errors in the console, but for ``expected`` ones (the browser logs every refused
    request it made, such as a withdrawal the server answered 400)."""
    errors = [e for e in page.console_errors if not any(part in e for part in expected)]
    assert errors == [], errors
